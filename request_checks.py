"""
What a client may send serve.py, checked before anything runs: the JSON body, the
tools, the messages and the OpenAI options, each refused with a BadRequest (a 4xx
naming the problem) when the server cannot take it. The limits below bound the work
one request can make, so no body can crash or stall the server.
"""

import functools
import json
import math
import re
import sys

import wire

ROLES = ("system", "developer", "user", "assistant", "tool")
CHOICES = ("auto", "none", "required")

# Limits that bound the work one request can make before it is refused. The schema
# checks recurse (RecursionError near 100 nested objects) and cost ~1 ms per tool.
MAX_DEPTH = 32             # JSON nesting of a body: a schema 10 objects deep is ~25
MAX_TOOLS = 256            # a 512-token context holds ~30 small tools
MAX_TOOL_VALUES = 10_000   # JSON values in all tool definitions (~1 s of schema checks)
INLINE_BYTES = 16_384      # smaller bodies are checked on the event loop (< ~10 ms), larger in a process
MAX_TOP_LOGPROBS = 20      # OpenAI's own limit
MAX_STOP = 4               # stop sequences, as OpenAI
CHARS_PER_TOKEN = 32       # more than any token holds (sentencepiece pieces are <= 16 characters)

# Fields of a chat request the server reads; the rest are listed in x_nanotool.ignored.
USED_FIELDS = {"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "max_tokens",
               "max_completion_tokens", "n", "stream", "stream_options", "logprobs", "top_logprobs",
               "stop", "response_format", "logit_bias", "modalities", "audio", "functions", "function_call"}


class BadRequest(Exception):
    """Anything wrong with a request; becomes a 4xx whose message names the problem.
    code: OpenAI's machine-readable error code."""

    def __init__(self, message, param=None, status=400, code="invalid_value"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def __reduce__(self):          # raised in the checker process, pickled back whole
        return BadRequest, (self.message, self.param, self.status, self.code)


def error_body(message, status, param=None, code=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def kind_of(v):
    """JSON type name of a value, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def short(v, n=40):
    return json.dumps(v, ensure_ascii=False)[:n]


# -----------------------------------------------------------------------------
# request bodies: bytes -> a JSON object every later step can take

async def read_body(request, limit):
    """The body's bytes. The size is checked before reading when the client sends
    Content-Length, and while reading when it does not (chunked uploads)."""
    too_big = BadRequest(f"request body is over the limit of {limit} bytes (--max_request_bytes)",
                         status=413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _float(s):
    f = float(s)
    if not math.isfinite(f):       # 1e999: json reads it as inf, which JSON cannot send back
        raise BadRequest(f"request body: the number {s[:40]} is out of range", code="invalid_json")
    return f


def _int(s):
    try:
        return int(s)
    except ValueError:             # Python reads at most sys.get_int_max_str_digits() digits
        raise BadRequest(f"request body: an integer of {len(s)} digits is too long "
                         f"(the limit is {sys.get_int_max_str_digits()})", code="invalid_json") from None


def _constant(s):
    raise BadRequest(f"request body is not valid JSON ({s} is not a JSON value)", code="invalid_json")


# A lone surrogate can only arrive as a \\uD800-\\uDFFF escape (the UTF-8 decoder refuses
# the raw bytes), so bodies without one skip the per-string check.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def where(path):
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return (out if len(out) <= 80 else out[:80] + "...") or "the body"


def too_many_tools(param, n):
    return BadRequest(f"'{param}' has {n} tools; the limit is {MAX_TOOLS} (and far fewer fit in the model's "
                      "context)", param, code="limit_exceeded")


def load_json(body, tools_key=None):
    """Body bytes -> a JSON object that is nested at most MAX_DEPTH levels and holds only
    text Python can encode, or a BadRequest naming what is wrong and where."""
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:                           # UTF-8 only, as JSON on the wire must be (json.loads would also
        text = body.decode("utf-8-sig")   # take UTF-16, where the surrogate check below cannot look)
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8 text", code="invalid_json") from None
    try:
        data = json.loads(text, parse_float=_float, parse_int=_int, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                         code="invalid_json") from None
    except RecursionError:         # e.g. 100,000 nested '[': the stdlib parser recurses
        raise BadRequest(f"request body is nested too deeply (the limit is {MAX_DEPTH} levels)",
                         code="limit_exceeded") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {kind_of(data)}", code="invalid_json")
    tools = data.get(tools_key)
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:     # the cheapest refusal of the largest bodies
        raise too_many_tools(tools_key, len(tools))
    strings = SURROGATE_ESCAPE.search(text) is not None
    if strings or too_deep(data):  # the slow walk, which names where, only when it will find something
        check_values(data, strings)
    return data


def too_deep(data):
    """Whether data nests more than MAX_DEPTH levels: one level at a time, containers
    only, no paths kept (the body may be as deep as the parser allows)."""
    level = [data]
    for _ in range(MAX_DEPTH):
        level = [x for v in level for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (dict, list))]
        if not level:
            return False
    return True


def check_values(data, strings):
    """BadRequest naming where data nests too deeply or (strings) holds a lone surrogate."""
    stack = [(data, 1, ())]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadRequest(f"request body is nested more than {MAX_DEPTH} levels deep, the limit "
                                 f"(at {where(path)})", code="limit_exceeded")
            for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
                if strings and isinstance(k, str):
                    _check_text(k, path, "a key")
                stack.append((x, depth + 1, path + (k,)))
        elif strings and isinstance(v, str):
            _check_text(v, path, "text")


def _check_text(s, path, what):
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{where(path)}: {what} with a lone surrogate ({s[e.start]!r}), which is not "
                         "Unicode text", code="invalid_value") from None


# -----------------------------------------------------------------------------
# the fields of a request: explicit checks, so every message says which field is wrong

def parse_max_tokens(body, keys, cap):
    """The first of keys that is set, as a positive int capped at the server's limit."""
    for key in keys:
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadRequest(f"'{key}' must be a positive integer, got {short(v)}", key)
        return min(v, cap)
    return cap


def risky_pattern(pattern):
    """True if a regex repeats a group that itself repeats a variable number of times
    ("(a+)+", "(a{1,9})*"): the shape whose backtracking takes exponential time.
    jsonschema matches "pattern" with Python's re, which has no time limit, on the
    model's thread, against text the request supplies. (Overlapping alternatives,
    "(a|aa)+", are not caught.)"""
    import re._constants as C
    import re._parser as P         # private, but the only parser of re's own syntax
    try:
        tree = P.parse(pattern)
    except Exception:              # invalid: check_schema refuses it
        return False
    repeats = (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT)

    def walk(items, inside):
        for op, av in items:
            if op in repeats:
                lo, hi, sub = av
                if lo != hi and inside:
                    return True
                if walk(sub, inside or hi > 1):
                    return True
            elif op == C.SUBPATTERN:
                if walk(av[-1], inside):
                    return True
            elif op == C.BRANCH:
                if any(walk(b, inside) for b in av[1]):
                    return True
            elif op in (C.ASSERT, C.ASSERT_NOT):
                if walk(av[1], inside):
                    return True
        return False
    return walk(tree, False)


def schema_problem(tool):
    """What in a normalized tool the server will not take, or None: a dynamic or
    recursive reference (wire.normalize_tool inlines local "$ref"s; these it leaves,
    and they can never resolve once the schema is rebuilt) and regex patterns that
    can take exponential time."""
    stack = [tool["parameters"]]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
        elif isinstance(node, dict):
            for ref in ("$ref", "$dynamicRef", "$recursiveRef"):
                if ref in node:
                    return f"tool '{tool['name']}': '{ref}' is not supported; write the schema out in place"
            pats = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
            if isinstance(node.get("patternProperties"), dict):
                pats += list(node["patternProperties"])
            for p in pats:
                if risky_pattern(p):
                    return (f"tool '{tool['name']}': pattern {p[:60]!r} repeats a group that repeats, "
                            "which can take exponential time to match; write it without the nesting")
            stack += list(node.values())
    return None


@functools.lru_cache(maxsize=64)
def _normalize(blob, param):
    # Clients resend the same catalogue with every request, and checking the schemas
    # costs ~1 ms a tool: do each catalogue once. (No sort_keys: the order of the
    # properties is the order the model sees the arguments in.) -> (the tools, the
    # length of their prompt text, for check_fits)
    raw = json.loads(blob)
    if count_values(raw, MAX_TOOL_VALUES) > MAX_TOOL_VALUES:
        raise BadRequest(f"'{param}' holds more than {MAX_TOOL_VALUES} JSON values, the limit", param,
                         code="limit_exceeded")
    tools = wire.normalize_tools(raw)
    for t in tools:
        problem = wire.carry_problem(t) or schema_problem(t)
        if problem:
            raise wire.ToolError(problem)
    return tools, len(wire.render_tools(tools))


def count_values(v, limit):
    """JSON values in v, counting stops just past limit."""
    n, stack = 0, [v]
    while stack and n <= limit:
        x = stack.pop()
        n += 1
        if isinstance(x, dict):
            stack += x.values()
        elif isinstance(x, list):
            stack += x
    return n


def parse_tools(raw, param):
    """A request's tool definitions -> (normalized tools, the length of their prompt text)."""
    if raw is None:
        return [], 0
    if not isinstance(raw, list):
        raise BadRequest(f"'{param}' must be a list of tool definitions, got {kind_of(raw)}", param, code="invalid_type")
    if len(raw) > MAX_TOOLS:
        raise too_many_tools(param, len(raw))
    try:
        return _normalize(json.dumps(raw), param)
    except wire.ToolError as e:
        raise BadRequest(f"{param}: {e}", param, code="invalid_tool") from None
    except (TypeError, AttributeError) as e:   # wire.py misses a few shapes, e.g. "type": {...}
        raise BadRequest(f"{param}: malformed tool definition ({type(e).__name__}: {e})", param,
                         code="invalid_tool") from None


def parse_tool_choice(raw, tools):
    """OpenAI's tool_choice -> what Router.answer takes: auto | none | required | a tool name."""
    if raw is None:
        return "auto"
    if isinstance(raw, str) and raw in CHOICES:
        choice = raw
    elif isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict) \
            and isinstance(raw["function"].get("name"), str):
        choice = raw["function"]["name"]
        if choice not in {t["name"] for t in tools}:
            raise BadRequest(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
    else:
        raise BadRequest("tool_choice must be 'auto', 'none', 'required' or "
                         f'{{"type": "function", "function": {{"name": ...}}}}; got {short(raw, 60)}',
                         "tool_choice")
    if choice != "auto" and choice != "none" and not tools:
        raise BadRequest(f"tool_choice {short(raw, 60)} needs tools, and none were given", "tool_choice")
    return choice


def message_text(m, i):
    """A message's content as text: a string, or its text parts joined."""
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    if not isinstance(c, list):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts, "
                         f"got {kind_of(c)}", "messages", code="invalid_type")
    texts = []
    for j, part in enumerate(c):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f'messages[{i}].content[{j}]: only {{"type": "text", "text": "..."}} parts '
                             "are supported", "messages", code="unsupported_value")
        texts.append(part["text"])
    return " ".join(texts)     # requests are single-line text in training


def parse_messages(raw):
    """-> (the last user message's text, None), or (None, the trailing tool results)
    when the last message is a tool result."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list of messages", "messages",
                         code="missing_required_parameter" if raw is None else "invalid_type")
    texts = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object, got {kind_of(m)}", "messages", code="invalid_type")
        if m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}; "
                             f"got {short(m.get('role'))}", "messages")
        texts.append(message_text(m, i))
    if raw[-1]["role"] == "tool":
        n = len(raw)
        while n > 0 and raw[n - 1]["role"] == "tool":   # parallel calls give several results
            n -= 1
        return None, "\n".join(texts[n:]) or "done"
    users = [i for i, m in enumerate(raw) if m["role"] == "user"]
    if not users:
        raise BadRequest("'messages' has no user message; the model answers the last one", "messages")
    if not texts[users[-1]].strip():
        raise BadRequest(f"messages[{users[-1]}]: the last user message is empty", "messages")
    return texts[users[-1]], None


def parse_number(body, key, lo, hi):
    """A sampling number the greedy router does not use: checked, then ignored."""
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
        raise BadRequest(f"'{key}' must be a number from {lo} to {hi}, got {short(v)}", key)


def parse_options(body):
    """The OpenAI fields besides messages and tools -> the ones that change the answer."""
    if body.get("n") not in (None, 1):
        raise BadRequest(f"'n' must be 1 (one routing decision per request), got {short(body.get('n'), 20)}",
                         "n", code="unsupported_value")
    for key in ("stream", "logprobs", "parallel_tool_calls"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise BadRequest(f"'{key}' must be a boolean, got {kind_of(body[key])}", key, code="invalid_type")
    stream = bool(body.get("stream"))
    so = body.get("stream_options")
    if so is not None:
        if not stream:
            raise BadRequest("'stream_options' is only allowed with \"stream\": true", "stream_options")
        if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
            raise BadRequest(f'\'stream_options\' must be {{"include_usage": true|false}}, got {short(so)}',
                             "stream_options")
    for key, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1), ("frequency_penalty", -2, 2),
                        ("presence_penalty", -2, 2)):
        parse_number(body, key, lo, hi)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise BadRequest(f"'seed' must be a 64-bit integer, got {short(seed)}", "seed")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {short(top)}",
                             "top_logprobs")
        if not body.get("logprobs"):
            raise BadRequest("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them, "
                         f"got {short(body.get('stop'))}", "stop")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            raise BadRequest(f"response_format {fmt['type']!r} is not supported: the router answers with tool "
                             "calls; give the schema as a tool and force it with tool_choice",
                             "response_format", code="unsupported_value")
        raise BadRequest(f'\'response_format\' must be {{"type": "text"}}, got {short(fmt)}', "response_format")
    if body.get("logit_bias") not in (None, {}):
        raise BadRequest("'logit_bias' is not supported: decoding is constrained to valid answers",
                         "logit_bias", code="unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]) or body.get("audio") is not None:
        raise BadRequest("only text output is supported ('modalities', 'audio')", "modalities",
                         code="unsupported_parameter")
    for key in ("functions", "function_call"):
        if body.get(key) is not None:
            raise BadRequest(f"'{key}' is the deprecated form; send 'tools' and 'tool_choice'", key,
                             code="unsupported_parameter")
    if not isinstance(body.get("model", ""), str):
        raise BadRequest(f"'model' must be a string, got {kind_of(body['model'])}", "model", code="invalid_type")
    return {"stream": stream, "include_usage": bool((so or {}).get("include_usage")),
            "top_logprobs": (top or 0) if body.get("logprobs") else None, "stop": stop,
            "parallel": body.get("parallel_tool_calls", True) is not False,
            "ignored": sorted(k for k in body if k not in USED_FIELDS and body[k] is not None)}


def shortest_chars(tools, chars):
    """A lower bound on the length of the tools' prompt text: chars (the whole
    catalogue's, from parse_tools) for one tool or none; else the shortest tool's,
    as the router cuts a catalogue to the tools most related to the request that
    fit the context, one at the least (sample.Router.fit)."""
    if len(tools) <= 1:
        return chars
    return min(len(wire.render_tool(t)) for t in tools)


def check_fits(tools_chars, text, context, compiled=False):
    """Refuse a prompt that cannot fit the context by its length in characters alone,
    before the model spends ~0.7 s tokenizing a 1 MB request to find that out.
    tools_chars: the length of the tools' prompt text (parse_tools); compiled: the
    tools are in the model, not in the prompt."""
    chars = (0 if compiled else tools_chars) + len(text)
    if chars > CHARS_PER_TOKEN * context:
        raise BadRequest(f"prompt is {chars} characters, at least {chars // CHARS_PER_TOKEN} tokens; the model's "
                         f"context is {context}", "messages", code="context_length_exceeded")


def parse_chat(body, cap, context, only_model=None, compiled=False):
    """A chat-completions body (bytes) -> the job it asks for; BadRequest if anything is wrong.
    compiled: the model has its own catalogue (no tools: all of it)."""
    data = load_json(body, "tools")
    job = parse_options(data)
    if only_model is not None and data.get("model", only_model) != only_model:
        raise BadRequest(f"model {data['model']!r} does not exist here; this server has {only_model!r} "
                         "(GET /v1/models)", "model", status=404, code="model_not_found")
    job["text"], job["tool_result"] = parse_messages(data.get("messages"))
    job["tools"], chars = parse_tools(data.get("tools"), "tools")
    job["choice"] = parse_tool_choice(data.get("tool_choice"), job["tools"])
    job["max_tokens"] = parse_max_tokens(data, ["max_completion_tokens", "max_tokens"], cap)
    if job["tool_result"] is None:
        check_fits(shortest_chars(job["tools"], chars), job["text"], context, compiled)
    return job


def parse_flat(body, cap, context, compiled=False):
    """A /tool-call body (bytes) -> its job. compiled: available_functions may be
    left out (the model's own catalogue)."""
    data = load_json(body, "available_functions")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest(f"'prompt' must be a non-empty string, got {short(prompt)}", "prompt")
    if compiled and "available_functions" not in data:
        data["available_functions"] = []
    if "available_functions" not in data:
        raise BadRequest("'available_functions' is missing: give a list of tool definitions "
                         "(an empty list means no tool can be called)", "available_functions",
                         code="missing_required_parameter")
    tools, chars = parse_tools(data["available_functions"], "available_functions")
    check_fits(shortest_chars(tools, chars), prompt, context, compiled)
    return {"text": prompt, "tools": tools, "choice": parse_tool_choice(data.get("tool_choice"), tools),
            "max_tokens": parse_max_tokens(data, ["max_tokens"], cap)}
