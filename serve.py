"""
Serve a trained router over HTTP: a small JSON endpoint and an OpenAI-compatible
chat-completions endpoint (streamed or not), so any OpenAI client or agent framework
can use the model to pick tool calls.

    python serve.py --ckpt out/demo/best.pt                        # http://127.0.0.1:8000
    python serve.py --ckpt out/demo/best.pt --quantize int8 --port 8080
    python serve.py --ckpt out/demo/best.pt --fallback openai --fallback_below 0.5   # needs OPENAI_API_KEY
    python serve.py --ckpt out/demo/best.pt --log_requests out/traffic.jsonl        # answers -> training data

    curl -s localhost:8000/tool-call -H 'Content-Type: application/json' -d '{"prompt": "Where is my order ORD-1234?", "available_functions": [{"name": "track_order", "description": "Get the status of an order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}], "max_tokens": 64}'

Endpoints
    POST /tool-call            {"prompt", "available_functions", "max_tokens"?, "tool_choice"?} ->
                               {"function_name", "parameters", "confidence", "calls", "no_tool_reason", "model"}
    POST /v1/chat/completions  OpenAI chat completions, n=1; "stream": true sends server-sent events
    GET  /v1/models            the one model id;   GET /health

The chat endpoint fronts a router, not a chat model:
  - the model answers the LAST user message only (earlier turns are not read);
  - if the last message is a tool result, the router's job for that turn is done: it
    answers finish_reason "stop" with the tool result(s) as content, without the model;
  - no tools -> the no-call "no tool fits", without the model;
  - finish_reason: "tool_calls" for calls, "stop" for a no-call (its reason is the
    content), "length" whenever the token budget cut the answer (what was complete by
    then is kept: the calls before the cut, or a decline "no tool fits");
  - identical calls in one answer are sent once;
  - decoding is greedy and constrained. temperature, top_p, seed, frequency_penalty and
    presence_penalty are checked (a bad value is a 400) and have no effect; logprobs /
    top_logprobs give the model's own log-probabilities of its answer tokens; stop cuts
    the text content (never a call); response_format json_*, logit_bias, functions,
    audio and n > 1 are refused. Fields the server does not use are listed in
    x_nanotool.ignored;
  - any "model" is answered by this one (the response names who answered), so an app
    changes only its base URL; with --strict_model another id gets a 404;
  - "stream": true: the answer is decided first (one routing decision, tens of ms),
    then sent as OpenAI chunks: the role, each call's id and name, its arguments, the
    finish reason, the usage if stream_options.include_usage, then [DONE].

Fallback (off by default): with --fallback gemini|openai, an answer whose confidence is
below --fallback_below (or that ran out of tokens) is asked of that teacher
(teacher.py); tool_choice "none" never is. The teacher's answer is used if it
passes teacher.clean_answer and honours tool_choice; otherwise (or on any teacher error)
the local answer stands. Every response has "x_nanotool": {"answered_by", "confidence",
...}; "confidence" is always the local model's.

Requests are checked in full before anything runs, against limits that keep every check
short: a body over --max_request_bytes (413), JSON nested over 32 levels, over 256 tools
or 10,000 JSON values in them, numbers Python cannot hold, lone surrogates, names and
enum values the answer format cannot carry, "$ref" and regex patterns that can take
exponential time. A large body is checked in a separate process, so neither the event
loop (and /health) nor the model waits for it.

Errors are OpenAI-style {"error": {"message", "type", "param", "code"}}: 4xx for anything
wrong with the request, never a traceback.

--log_requests PATH appends one JSON line per routing decision that is a usable label
(tool_choice auto, not cut by the token budget, not an invalid answer): the tools, the
request, the answer, who answered and the confidence, in the OpenAI chat form that
`data.py --import` reads. It stores your users' requests: off by default.
"""

import argparse
import asyncio
import functools
import json
import math
import multiprocessing
import os
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import wire
from teacher import clean_answer

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
    stack = [(data, 1, ())]
    while stack:                   # iterative: the body may be as deep as the parser allows
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
    return data


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
def _normalize(blob):
    # Clients resend the same catalogue with every request, and checking the schemas
    # costs ~1 ms a tool: do each catalogue once. (No sort_keys: the order of the
    # properties is the order the model sees the arguments in.)
    tools = wire.normalize_tools(json.loads(blob))
    for t in tools:
        problem = wire.carry_problem(t) or schema_problem(t)
        if problem:
            raise wire.ToolError(problem)
    return tools


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
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(f"'{param}' must be a list of tool definitions, got {kind_of(raw)}", param, code="invalid_type")
    if len(raw) > MAX_TOOLS:
        raise too_many_tools(param, len(raw))
    if count_values(raw, MAX_TOOL_VALUES) > MAX_TOOL_VALUES:
        raise BadRequest(f"'{param}' holds more than {MAX_TOOL_VALUES} JSON values, the limit", param,
                         code="limit_exceeded")
    try:
        return _normalize(json.dumps(raw))
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


def check_fits(tools, text, context):
    """Refuse a prompt that cannot fit the context by its length in characters alone,
    before the model thread spends ~0.7 s tokenizing a 1 MB request to find that out."""
    chars = len(wire.render_tools(tools)) + len(text)
    if chars > CHARS_PER_TOKEN * context:
        raise BadRequest(f"prompt is {chars} characters, at least {chars // CHARS_PER_TOKEN} tokens; the model's "
                         f"context is {context}", "messages", code="context_length_exceeded")


def parse_chat(body, cap, context, only_model=None):
    """A chat-completions body (bytes) -> the job it asks for; BadRequest if anything is wrong."""
    data = load_json(body, "tools")
    job = parse_options(data)
    if only_model is not None and data.get("model", only_model) != only_model:
        raise BadRequest(f"model {data['model']!r} does not exist here; this server has {only_model!r} "
                         "(GET /v1/models)", "model", status=404, code="model_not_found")
    job["text"], job["tool_result"] = parse_messages(data.get("messages"))
    job["tools"] = parse_tools(data.get("tools"), "tools")
    job["choice"] = parse_tool_choice(data.get("tool_choice"), job["tools"])
    job["max_tokens"] = parse_max_tokens(data, ["max_completion_tokens", "max_tokens"], cap)
    if job["tool_result"] is None:
        check_fits(job["tools"], job["text"], context)
    return job


def parse_flat(body, cap, context):
    """A /tool-call body (bytes) -> its job."""
    data = load_json(body, "available_functions")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest(f"'prompt' must be a non-empty string, got {short(prompt)}", "prompt")
    if "available_functions" not in data:
        raise BadRequest("'available_functions' is missing: give a list of tool definitions "
                         "(an empty list means no tool can be called)", "available_functions",
                         code="missing_required_parameter")
    tools = parse_tools(data["available_functions"], "available_functions")
    check_fits(tools, prompt, context)
    return {"text": prompt, "tools": tools, "choice": parse_tool_choice(data.get("tool_choice"), tools),
            "max_tokens": parse_max_tokens(data, ["max_tokens"], cap)}


# -----------------------------------------------------------------------------
# the model's own probabilities of its answer (logprobs)

def answer_with_logprobs(router, tools, request, max_tokens, choice, top):
    """Router.answer's result, plus "logprobs": one OpenAI logprob entry per answer token
    (the wire-format tokens: <|call|>, the name's pieces, ...). The log-probability is
    the model's own over the whole vocabulary (no grammar mask), read from one forward
    pass over prompt + answer, with the `top` likeliest tokens at each position."""
    import torch
    ids, info = router.generate_constrained(tools, request, max_tokens, tool_choice=choice)
    text = router.sp.decode(ids)
    res = {"text": text, "tokens": len(ids), "confidence": info["confidence"], "truncated": info["truncated"],
           "calls": [], "reason": None, "valid": False, "error": None}
    try:                          # as Router.answer reads and checks it
        parsed = wire.parse_answer(text, tools)
        res.update(parsed, error=wire.validate_answer(parsed, tools))
        res["valid"] = res["error"] is None
    except wire.AnswerError as e:
        res["error"] = f"unparseable: {e}"
    prompt = router.encode_prompt(tools, request)
    seq = torch.tensor([prompt + ids[:-1]], dtype=torch.long, device=router.device)
    with torch.inference_mode():   # position t's logits predict token t+1
        logp = torch.log_softmax(router.model(seq)[0, len(prompt) - 1:].float(), dim=-1)   # (len(ids), V)
    chosen = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()
    best = logp.topk(top, dim=-1) if top else None
    res["logprobs"] = []
    for j, i in enumerate(ids):
        entry = token_entry(router.sp, i, chosen[j])
        entry["top_logprobs"] = [token_entry(router.sp, int(k), float(v)) for v, k in
                                 zip(best.values[j].tolist(), best.indices[j].tolist())] if top else []
        res["logprobs"].append(entry)
    return res


def token_entry(sp, i, logprob):
    """OpenAI's {token, logprob, bytes} for one sentencepiece id."""
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):              # <0xE2>: one byte of a character split by byte fallback
        return {"token": piece, "logprob": logprob, "bytes": [int(piece[3:5], 16)]}
    text = piece.replace("\u2581", " ")
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


# -----------------------------------------------------------------------------
# responses: pure functions of an answer dict
# (answer: calls, reason, confidence, answered_by, prompt_tokens, completion_tokens,
#  finish_reason, + extras)

def extension(ans):
    keys = ("answered_by", "confidence", "latency_ms", "truncated", "local_error", "fallback_error", "note",
            "duplicates_dropped", "ignored")
    return {k: ans[k] for k in keys if k in ans}


def finish_of(ans):
    return ans.get("finish_reason") or ("length" if ans.get("truncated") else
                                        "tool_calls" if ans["calls"] else "stop")


def chat_response(ans, stop=()):
    finish = finish_of(ans)
    if ans["calls"]:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in ans["calls"]]}
    else:
        content = ans["reason"]
        cuts = [content.find(s) for s in stop if s in content]
        if cuts:                  # stop applies to text: the content ends before the first one
            content, finish = content[:min(cuts)], "stop"
        message = {"role": "assistant", "content": content}
    usage = {"prompt_tokens": ans["prompt_tokens"], "completion_tokens": ans["completion_tokens"],
             "total_tokens": ans["prompt_tokens"] + ans["completion_tokens"]}
    logprobs = {"content": ans["logprobs"], "refusal": None} if ans.get("logprobs") is not None else None
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
            "created": int(time.time()), "model": ans["answered_by"],
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage, "x_nanotool": extension(ans)}


def stream_events(resp, include_usage):
    """A chat.completion (chat_response's dict) -> the server-sent events that stream it,
    in OpenAI's chunk format: the role, then each call's id, type and name with empty
    arguments followed by its arguments (or the text content), then the finish reason,
    the usage (if asked for), and [DONE]."""
    base = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"],
            "model": resp["model"], "system_fingerprint": None}
    choice = resp["choices"][0]
    msg, logprobs = choice["message"], choice["logprobs"]

    def chunk(delta, finish=None, lp=None, **extra):
        c = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra)
        if include_usage:
            c["usage"] = None     # OpenAI: null on every chunk but the last
        return c

    calls = msg.get("tool_calls") or []
    events = [chunk({"role": "assistant", "content": None if calls else ""})]
    for i, tc in enumerate(calls):
        fn = tc["function"]
        events.append(chunk({"tool_calls": [{"index": i, "id": tc["id"], "type": "function",
                                             "function": {"name": fn["name"], "arguments": ""}}]},
                            lp=logprobs if i == 0 else None))
        events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}))
    if not calls and msg["content"]:
        events.append(chunk({"content": msg["content"]}, lp=logprobs))
    events.append(chunk({}, finish=choice["finish_reason"], x_nanotool=resp["x_nanotool"]))
    if include_usage:
        events.append(dict(base, choices=[], usage=resp["usage"]))
    return [f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def tool_call_response(ans):
    first = ans["calls"][0] if ans["calls"] else None
    return {"function_name": first["name"] if first else None,
            "parameters": first["arguments"] if first else None,
            "confidence": ans["confidence"], "calls": ans["calls"], "no_tool_reason": ans["reason"],
            "model": ans["answered_by"], "x_nanotool": extension(ans)}


def dedupe(calls):
    """Identical calls (same name, same arguments) once each, in order."""
    seen, out = set(), []
    for c in calls:
        key = json.dumps([c["name"], c["arguments"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# -----------------------------------------------------------------------------
# learning from traffic: answers as training examples

class RequestLog:
    """Appends one JSON line per usable answer, in the OpenAI chat form formats.py reads
    ({"messages", "tools"}), with what the training data should know in "x_nanotool"."""

    def __init__(self, path):
        self.path, self.lock, self.failed = path, threading.Lock(), False
        open(path, "a", encoding="utf-8").close()     # fail at start, not on the first request

    def write(self, tools, request, ans, model_id, endpoint):
        assistant = {"role": "assistant", "content": None if ans["calls"] else ans["reason"]}
        if ans["calls"]:
            assistant["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {
                "name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for i, c in enumerate(ans["calls"])]
        line = json.dumps({
            "messages": [{"role": "user", "content": request}, assistant],
            "tools": [{"type": "function", "function": t} for t in tools],
            "x_nanotool": {"time": round(time.time(), 3), "endpoint": endpoint, "model": model_id,
                           "answered_by": ans["answered_by"], "confidence": ans["confidence"],
                           "finish_reason": finish_of(ans)}}, ensure_ascii=False)
        try:
            with self.lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:       # a full disk must not fail the request; say it once
            if not self.failed:
                print(f"serve: cannot append to {self.path} ({e}); requests are not being logged", file=sys.stderr)
            self.failed = True


# -----------------------------------------------------------------------------
# the app

def ask_teacher(teacher, tools, request, choice):
    """-> (answer {"calls", "reason"}, None) or (None, why it is not used)."""
    if choice not in CHOICES:          # a named tool: the teacher sees only that one
        tools = [t for t in tools if t["name"] == choice]
    try:                               # the teacher is held to the client's own tool_choice
        raw = teacher.ask(tools, request, tool_choice=choice)
    except Exception as e:             # whatever the teacher does, the local answer stands
        return None, f"{type(e).__name__}: {e}"
    ans, problem = clean_answer(raw, tools, request)
    if problem:
        return None, f"teacher answer rejected ({problem})"
    if choice != "auto" and not ans["calls"]:
        return None, f"teacher answered no call; tool_choice {choice!r} needs one"
    return ans, None


def create_app(router, model_id="nanotool", teacher=None, fallback_below=0.0,
               max_new_tokens=128, max_request_bytes=1_000_000, log_requests=None, strict_model=False):
    """The FastAPI app around one loaded Router. teacher: None, or an object with .id and
    .ask(tools, request, tool_choice) -> {"calls", "text"} (teacher.make_teacher gives one).
    log_requests: a JSONL path for the answers (see RequestLog), or None."""
    # The Router is not thread-safe (its KV prefix cache is rewound and overwritten by
    # every request), so all model calls run on this one thread, in arrival order. The
    # event loop stays free to parse requests and answer /health meanwhile.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    # Large bodies are parsed and checked in a process of their own: up to ~1 s of schema
    # checks for a body at the limits. On the event loop that would hold up every request;
    # on a thread too, nearly: the check holds the GIL, and the model's thread, which
    # gives the GIL up around every torch op, waits up to 5 ms to get it back each time
    # (measured: 2 clients sending 0.8 MB bodies cut the others' throughput 18-fold).
    checker = {"pool": None}
    log = RequestLog(log_requests) if log_requests else None
    created = int(time.time())
    context = router.model.config.block_size

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)
        if checker["pool"] is not None:   # waited for: a process left behind would outlive the server
            checker["pool"].shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="nanotool", lifespan=lifespan)

    async def checked(request, parse):
        """Read the body and parse + check it: inline when small, in the checker process when large."""
        body = await read_body(request, max_request_bytes)
        if len(body) <= INLINE_BYTES:
            return parse(body)
        if checker["pool"] is None:    # started on first use (~1 s); "spawn": forking a process
            # that runs torch threads can deadlock the child
            checker["pool"] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool = checker["pool"]
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, parse, body)
        except BrokenProcessPool:      # the process died (killed?): a new one for the next request
            if checker["pool"] is pool:
                checker["pool"] = None
            raise

    def run_local(tools, request, choice, max_tokens, top):
        if top is None:
            res = router.answer(tools, request, max_tokens, constrain=True, tool_choice=choice)
        else:
            res = answer_with_logprobs(router, tools, request, max_tokens, choice, top)
        res["prompt_tokens"] = len(router.encode_prompt(tools, request))
        return res

    def count_prompt(tools, text):
        return len(router.encode_prompt(tools, text))

    async def route(tools, request, choice, max_tokens, parallel=True, top=None, endpoint="chat"):
        """One routing decision -> answer dict (see chat_response)."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        if not tools:      # nothing could be called: no need to ask the model (counting is
            # sentencepiece only, thread-safe and off the GIL: not on the model's thread)
            n = await loop.run_in_executor(None, count_prompt, tools, request)
            ans = {"calls": [], "reason": wire.REASON_NO_TOOL, "confidence": 1.0, "truncated": False,
                   "prompt_tokens": n, "completion_tokens": 0,
                   "note": "no tools given: answered without the model"}
        else:
            try:
                res = await loop.run_in_executor(worker, run_local, tools, request, choice, max_tokens, top)
            except ValueError as e:    # the prompt does not fit the context, ...
                raise BadRequest(str(e), "messages",
                                 code="context_length_exceeded" if "context" in str(e) else "invalid_value") from None
            ans = {"calls": res["calls"], "reason": res["reason"], "confidence": res["confidence"],
                   "truncated": res["truncated"], "prompt_tokens": res["prompt_tokens"],
                   "completion_tokens": res["tokens"], "logprobs": res.get("logprobs")}
            if not res["valid"]:       # the grammar should make this unreachable; never send it on
                ans.update(calls=[], reason=wire.REASON_NO_TOOL, local_error=res["error"])
        ans["answered_by"] = model_id
        if teacher is not None and tools and choice != "none" and (ans["confidence"] < fallback_below
                                                                   or ans["truncated"] or "local_error" in ans):
            # a network call: off the model thread, so other requests keep being served
            better, why = await loop.run_in_executor(None, ask_teacher, teacher, tools, request, choice)
            if better is not None:     # the local tokens' logprobs do not describe this answer
                ans.update(calls=better["calls"], reason=better["reason"], answered_by=teacher.id, logprobs=None)
            else:
                ans["fallback_error"] = why
        calls = dedupe(ans["calls"])
        if len(calls) < len(ans["calls"]):
            ans["duplicates_dropped"] = len(ans["calls"]) - len(calls)
        ans["calls"] = calls
        local = ans["answered_by"] == model_id
        cut = local and ans["truncated"]
        ans["finish_reason"] = "length" if cut else "tool_calls" if calls else "stop"
        if log is not None and tools and choice == "auto" and not cut and not (local and "local_error" in ans):
            log.write(tools, request, ans, model_id, endpoint)
        if not parallel:
            ans["calls"] = ans["calls"][:1]
        ans["latency_ms"] = round(1000 * (time.perf_counter() - t0), 2)
        return ans

    @app.exception_handler(BadRequest)
    async def on_bad_request(request, e):
        return JSONResponse(error_body(e.message, e.status, e.param, e.code), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):      # unknown path, wrong method: same error shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", e.status_code,
                                       code=code), e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request, e):           # a bug: say so in one line (the log has the traceback)
        return JSONResponse(error_body(f"internal error ({type(e).__name__}: {e})", 500, code="internal_error"), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "context": context,
                "fallback": getattr(teacher, "id", None), "fallback_below": fallback_below if teacher else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "nanotool"}]}

    @app.post("/tool-call")
    async def tool_call(request: Request):
        job = await checked(request, functools.partial(parse_flat, cap=max_new_tokens, context=context))
        ans = await route(job["tools"], job["text"], job["choice"], job["max_tokens"], endpoint="tool-call")
        return tool_call_response(ans)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        job = await checked(request, functools.partial(parse_chat, cap=max_new_tokens, context=context,
                                                       only_model=model_id if strict_model else None))
        if job["tool_result"] is not None:
            # The call was made and its result is in: routing that turn is done. (A chat
            # model would now write prose from the result; this one passes it on.)
            n = await asyncio.get_running_loop().run_in_executor(None, count_prompt, job["tools"],
                                                                 job["tool_result"])
            ans = {"calls": [], "reason": job["tool_result"], "confidence": None, "answered_by": model_id,
                   "prompt_tokens": n, "completion_tokens": 0, "finish_reason": "stop",
                   "note": "last message is a tool result: nothing to route"}
        else:
            ans = await route(job["tools"], job["text"], job["choice"], job["max_tokens"], job["parallel"],
                              job["top_logprobs"])
        if job["ignored"]:
            ans["ignored"] = job["ignored"]
        resp = chat_response(ans, job["stop"])
        if job["stream"]:
            return StreamingResponse(iter(stream_events(resp, job["include_usage"])), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return resp

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/demo/best.pt")
    p.add_argument("--data_dir", default=None, help="default: the one recorded in the checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", default=None, help="model id in responses (default: nanotool-<ckpt dir>)")
    p.add_argument("--strict_model", action="store_true",
                   help="answer 404 to a request naming another model (default: any model name is served)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="answer token budget; caps max_tokens")
    p.add_argument("--max_request_bytes", type=int, default=1_000_000, help="larger bodies get a 413")
    p.add_argument("--fallback", choices=["gemini", "openai"], default=None,
                   help="send low-confidence answers to this teacher (off by default)")
    p.add_argument("--fallback_below", type=float, default=0.5, help="confidence threshold for --fallback")
    p.add_argument("--fallback_model", default=None, help="teacher model (default: teacher.py's)")
    p.add_argument("--fallback_base_url", default=None, help="teacher API base URL (default: the vendor's)")
    p.add_argument("--fallback_timeout", type=float, default=30.0, help="seconds per teacher request")
    p.add_argument("--log_requests", default=None, metavar="PATH",
                   help="append usable answers (with the users' requests) as JSONL for data.py --import")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    if args.max_new_tokens < 1 or args.max_request_bytes < 1:
        die("--max_new_tokens and --max_request_bytes must be positive")
    if not 0.0 <= args.fallback_below <= 1.0:
        die(f"--fallback_below is a confidence between 0 and 1, got {args.fallback_below}")
    teacher = None
    if args.fallback:
        from teacher import TeacherError, make_teacher
        try:
            teacher = make_teacher(args.fallback, args.fallback_model, args.fallback_base_url,
                                   timeout=args.fallback_timeout)
        except TeacherError as e:
            die(str(e))
    from model import CheckpointError
    from sample import Router
    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize)
    except (CheckpointError, ValueError, OSError) as e:
        die(str(e))
    model_id = args.model_name or "nanotool-" + os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
    try:
        app = create_app(router, model_id, teacher, args.fallback_below, args.max_new_tokens,
                         args.max_request_bytes, args.log_requests, args.strict_model)
    except OSError as e:
        die(f"--log_requests {args.log_requests}: cannot append to it ({e.strerror})")
    fallback = f"{teacher.id} below {args.fallback_below}" if teacher else "off"
    print(f"serve: {model_id} from {args.ckpt} (context {router.model.config.block_size}) on "
          f"http://{args.host}:{args.port}; config {json.dumps(vars(args))}; fallback {fallback}")
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
