"""
The wire format: how tools, a request and an answer become text, and back.

Every script imports this module rather than re-implementing any of it, so the
text the model is trained on is byte-for-byte the text it sees at inference.

An example is rendered as

    <|tools|>{one line per tool}<|user|> {request}<|call|>name<|arg|> key: value<|arg|> key2: 5<|end|>

or, for a model with a compiled catalogue (one app's fixed tools, learnt into
the model, each tool name a single token), without the tool lines:

    <|user|> {request}<|call|>name<|arg|> key: value<|end|>

or, when no tool should be called,

    <|tools|>...<|user|> {request}<|nocall|>missing argument: order_id<|end|>

The prompt is everything up to and including the request; the answer starts at
the first <|call|> / <|nocall|> token (the model's first decision) and runs to
<|end|>. Loss is computed on the answer only. Several calls follow each other,
each starting with <|call|>.

Why not JSON arguments: sentencepiece glues a word to the space before it, so
"Paris" in "weather in Paris" is the piece "_Paris" but in {"city":"Paris"} it is
"Paris", a different token. A small model would have to learn that mapping for
every word before it could copy anything. Writing each value after ": " makes
the value's tokens identical in the request and in the answer, so copying is a
plain look-up. A string value is written raw (it runs to the next special token);
any other value is JSON (5, 2.5, true, ["a","b"]) and the tool's schema decides
how a value is read back. For the same reason, tool lines put a space before
every argument name.

A tool is rendered on one compact line, close to a function signature:

    track_order( order_id: str "Order number.", carrier?: ups|fedex) Get the status of an order.

`?` marks an optional argument; an enum is written as its values joined by `|`.
This costs roughly half the tokens of the JSON schema it stands for.
"""

import json
import re

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

# -----------------------------------------------------------------------------
# special tokens (registered in sentencepiece as user-defined symbols, so each
# is exactly one token id)

TOOLS = "<|tools|>"
USER = "<|user|>"
CALL = "<|call|>"
ARG = "<|arg|>"
NOCALL = "<|nocall|>"
END = "<|end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [TOOLS, USER, CALL, ARG, NOCALL, END, PAD]

# The reasons a no-call answer carries, so a caller can tell "ask the user for
# the order id" from "decline". MISSING is followed by the argument's name.
REASON_CHITCHAT = "chit-chat"
REASON_INFO = "information request"
REASON_NO_TOOL = "no tool fits"
REASON_MISSING = "missing argument: "

# \Z, not $: "$" also matches before a trailing newline, and "get_time\n" would pass
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}\Z")
JSON_TYPES = {"string", "integer", "number", "boolean", "array", "object", "null"}
SHORT_TYPE = {"string": "str", "integer": "int", "number": "num", "boolean": "bool",
              "array": "list", "object": "obj", "null": "null"}


class ToolError(ValueError):
    """A tool definition we cannot use; the message names the tool and the problem."""


class AnswerError(ValueError):
    """Model output that does not parse as an answer."""


# -----------------------------------------------------------------------------
# tools in: normalize, check, render

def normalize_tool(tool, index=0):
    """Accept an OpenAI function definition or the bare {name, description,
    parameters} form; return the bare form with the schema checked."""
    where = f"tool #{index}"
    if not isinstance(tool, dict):
        raise ToolError(f"{where}: expected a JSON object, got {type(tool).__name__}")
    if tool.get("type") == "function" or "function" in tool:
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}: 'function' must be an object with name, description, parameters")
        tool = fn
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise ToolError(f"{where}: missing 'name'")
    if not NAME_RE.match(name):
        raise ToolError(f"tool '{name}': name must be 1-64 characters of letters, digits, _ . -")
    where = f"tool '{name}'"
    desc = tool.get("description", "")
    if not isinstance(desc, str):
        raise ToolError(f"{where}: 'description' must be a string")
    params = tool.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise ToolError(f"{where}: 'parameters' must be a JSON Schema object")
    params = _resolve_refs({k: v for k, v in params.items() if k not in ("$defs", "definitions")}, params, where)
    if params.get("type", "object") != "object":
        raise ToolError(f"{where}: parameters.type must be 'object', got {params.get('type')!r}")
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise ToolError(f"{where}: parameters.properties must be an object")
    for pname, p in props.items():
        if not isinstance(p, dict):
            raise ToolError(f"{where}: parameter '{pname}' must be an object")
        if "type" not in p and "enum" not in p:
            raise ToolError(f"{where}: parameter '{pname}' has no 'type' (or 'enum')")
        ptypes = p.get("type", [])
        for t in ptypes if isinstance(ptypes, list) else [ptypes]:
            if not isinstance(t, str) or t not in JSON_TYPES:
                raise ToolError(f"{where}: parameter '{pname}' has unknown type {t!r}")
        if "enum" in p and (not isinstance(p["enum"], list) or not p["enum"]):
            raise ToolError(f"{where}: parameter '{pname}' has an empty or non-list 'enum'")
    required = params.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolError(f"{where}: parameters.required must be a list of names")
    for r in required:
        if r not in props:
            raise ToolError(f"{where}: required argument '{r}' is not among its properties")
    schema = {"type": "object", "properties": props, "required": required}
    for key in ("additionalProperties",):
        if key in params:
            schema[key] = params[key]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ToolError(f"{where}: invalid JSON Schema: {e.message}") from None
    return {"name": name, "description": desc.strip(), "parameters": schema}


def _resolve_refs(node, root, where, seen=()):
    """node with every local $ref ("#/$defs/X", "#/definitions/X" of root) replaced by
    what it points to. normalize_tool rebuilds the root schema without its definitions
    (and the schema is rendered for the model and sent to teachers that may not read
    $ref), so a $ref left in it would point nowhere. A recursive $ref cannot be
    inlined: refused."""
    if isinstance(node, list):
        return [_resolve_refs(x, root, where, seen) for x in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref)
        if not ref.startswith("#"):
            raise ToolError(f"{where}: $ref {ref!r} is not local; only '#/$defs/...' references are supported")
        if not m or not isinstance(root.get(m.group(1)), dict) or m.group(2) not in root[m.group(1)]:
            raise ToolError(f"{where}: $ref {ref!r} points to nothing in the tool's $defs")
        if ref in seen:
            raise ToolError(f"{where}: $ref {ref!r} is recursive; a recursive schema cannot be used")
        target = root[m.group(1)][m.group(2)]
        rest = {k: v for k, v in node.items() if k != "$ref"}   # siblings (a description) win
        return _resolve_refs({**target, **rest} if isinstance(target, dict) else target, root, where, seen + (ref,))
    return {k: _resolve_refs(v, root, where, seen) for k, v in node.items()}


def carry_problem(tool):
    """None if every argument name and fixed value of a tool (normalize_tool's form)
    can be written in an answer and read back unchanged, else a message naming the
    first that cannot. Such a tool is valid JSON Schema, so normalize_tool takes it,
    but the model could never call it as given: the grammar leaves out an argument
    name it cannot write (and a tool that requires one), and an enum value that
    reads back differently never validates. Servers refuse these tools up front."""

    def bad_text(s):
        if clean(s) != s:
            return "contains a special token (" + next(t for t in SPECIAL_TOKENS if t in s) + ")"
        if "\u2581" in s:     # sentencepiece's space symbol: decoded as a plain space
            return "contains U+2581, which the tokenizer reads back as a space"
        return None

    where = f"tool '{tool['name']}'"
    for key, prop in tool["parameters"].get("properties", {}).items():
        # an answer writes '<|arg|> key: value' and the grammar matches the key up to ':'
        why = "is empty" if not key else "contains ':'" if ":" in key else bad_text(key)
        if why:
            return f"{where}: argument name {key!r} {why}, so an answer cannot carry it"
        # every enum value and nested property name in the argument's schema
        stack = [(prop, True)]
        while stack:
            node, top = stack.pop()
            if isinstance(node, list):
                stack += [(x, False) for x in node]
                continue
            if not isinstance(node, dict):
                continue
            enum = node.get("enum")
            if isinstance(enum, list):
                raw = top and all(isinstance(v, str) for v in enum)   # written raw, not as JSON
                for v in enum:
                    text = v if raw else json.dumps(v, ensure_ascii=False)
                    why = bad_text(text)
                    if raw and not why:
                        why = "is empty" if not v else "ends with white space" if v != v.rstrip() else None
                    if why:
                        return f"{where}: argument '{key}' has enum value {v!r}, which {why}"
            props = node.get("properties")
            if isinstance(props, dict):
                for k in props:
                    why = bad_text(k)
                    if why:
                        return f"{where}: argument '{key}' has a property name {k!r}, which {why}"
            stack += [(v, False) for k, v in node.items() if k != "enum"]
    return None


def schema_difference(compiled, given):
    """Two tools' parameter schemas -> None if they take the same arguments the
    same way, else what differs ("has parameter 'x' more", ...), for a clear error
    when an app's tool no longer matches the one a model was compiled with.
    Descriptions may differ: only what a call must satisfy is compared."""
    strip = lambda node: ({k: strip(v) for k, v in node.items() if k not in ("description", "title")}
                          if isinstance(node, dict) else [strip(x) for x in node] if isinstance(node, list) else node)
    a, b = compiled.get("properties", {}), given.get("properties", {})
    for k in b:
        if k not in a:
            return f"has parameter '{k}' more"
    for k in a:
        if k not in b:
            return f"has parameter '{k}' less"
        if strip(a[k]) != strip(b[k]):
            return f"has parameter '{k}' of another schema"
    if sorted(compiled.get("required", [])) != sorted(given.get("required", [])):
        return "requires other parameters"
    return None


def normalize_tools(tools):
    """A list of tools in either form (or {"tools": [...]}) -> list of bare tools."""
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list):
        raise ToolError("tools must be a JSON list of tool definitions")
    out = [normalize_tool(t, i) for i, t in enumerate(tools)]
    names = [t["name"] for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ToolError(f"tool '{sorted(dup)[0]}': defined more than once")
    return out


def read_json(path, error=ValueError):
    """Read a JSON file; a missing, unreadable or malformed file raises `error`
    with one readable line naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None


def load_tools(path):
    """Read a tools JSON file; raises ToolError with a readable message."""
    return normalize_tools(read_json(path, ToolError))


def _render_type(p):
    if "enum" in p:
        return "|".join(json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
                        for v in p["enum"])
    t = p.get("type")
    if isinstance(t, list):
        return "|".join(SHORT_TYPE.get(x, x) for x in t)
    if t == "array":
        items = p.get("items", {})
        inner = _render_type(items) if isinstance(items, dict) and items else "any"
        return f"list[{inner}]"
    return SHORT_TYPE.get(t, str(t))


def render_tool(tool):
    """One tool (bare form) -> one compact line."""
    params = tool["parameters"]
    required = set(params.get("required", []))
    args = []
    for pname, p in params.get("properties", {}).items():
        s = f"{pname}{'' if pname in required else '?'}: {_render_type(p)}"
        if "default" in p:
            s += f"={json.dumps(p['default'], ensure_ascii=False)}"
        if p.get("description"):
            s += f' "{p["description"].strip()}"'
        args.append(s)
    line = f"{tool['name']}({''.join(' ' + a + ',' for a in args)[:-1]})"
    if tool.get("description"):
        line += " " + tool["description"]
    return line.replace("\n", " ")


def render_tools(tools):
    return "\n".join(render_tool(t) for t in tools)


def clean(text):
    """User text may not contain our special tokens (no injected calls)."""
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, " ")
    return text


# -----------------------------------------------------------------------------
# examples: prompt + answer text

def render_prefix(tools):
    """The part of every prompt that depends on the catalogue alone, up to and
    including <|user|>: the decoder computes it once per catalogue (its prefix cache).
    tools=None: a compiled catalogue, which lives in the model, not in the prompt."""
    if tools is None:
        return USER
    return f"{TOOLS}{clean(render_tools(tools))}{USER}"


def render_request(request):
    """The request as the prompt carries it: after one space, so that its first
    word is tokenized as every other word is ("_denver", not "denver"), and a value
    copied from the first word is the same token in the request and the answer."""
    return " " + clean(request.strip())


def render_prompt(tools, request):
    """The model's input: tools (None: compiled in) and request, ending right before the answer."""
    return render_prefix(tools) + render_request(request)


def render_value(v):
    return clean(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False, separators=(",", ":"))


# What each part of an answer is (data.py writes each token's to {split}_cls.bin, for analysis).
TOKEN_CLASSES = {"prompt": 0, "struct": 1, "name": 2, "key": 3, "value": 4, "reason": 5}


def answer_spans(calls, reason=None):
    """The answer as (text, class) spans; their texts joined are render_answer()."""
    if not calls:
        return [(NOCALL, "struct"), (reason or REASON_NO_TOOL, "reason"), (END, "struct")]
    spans = []
    for c in calls:
        spans += [(CALL, "struct"), (c["name"], "name")]
        for k, v in c.get("arguments", {}).items():
            spans += [(ARG, "struct"), (f" {k}", "key"), (": ", "struct"), (render_value(v), "value")]
    return spans + [(END, "struct")]


def render_answer(calls, reason=None):
    """calls: list of {name, arguments}. An empty list needs a no-call reason."""
    return "".join(text for text, _ in answer_spans(calls, reason))


def read_value(raw, prop):
    """Raw value text -> Python value, guided by the argument's schema: a string
    stays raw; anything else is read as JSON (and left raw if it is not, so that
    validation reports the wrong type)."""
    types = (prop or {}).get("type")
    types = types if isinstance(types, list) else [types]
    if "string" in types and len(types) == 1:
        return raw
    if prop and "enum" in prop and all(isinstance(e, str) for e in prop["enum"]):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_answer(text, tools=None):
    """Answer text (from the first <|call|>/<|nocall|> on, <|end|> optional)
    -> {"calls": [...], "reason": str|None}. tools (bare form) give each value
    its type; without them, values that read as JSON are taken as JSON.
    Raises AnswerError."""
    text = text.split(END, 1)[0].strip()
    if text.startswith(NOCALL):
        reason = text[len(NOCALL):].strip()
        if CALL in reason or ARG in reason:
            raise AnswerError("no-call answer contains a call")
        return {"calls": [], "reason": reason}
    if not text.startswith(CALL):
        raise AnswerError("answer starts with neither <|call|> nor <|nocall|>")
    by_name = {t["name"]: t for t in tools or []}
    calls = []
    for seg in text.split(CALL)[1:]:
        name, *parts = seg.split(ARG)
        name = name.strip()
        if not name:
            raise AnswerError("call without a tool name")
        props = by_name.get(name, {}).get("parameters", {}).get("properties", {})
        args = {}
        for part in parts:
            if not part.startswith(" ") or ": " not in part:
                raise AnswerError(f"argument of {name} is not ' key: value': {part[:40]!r}")
            key, raw = part[1:].split(": ", 1)
            if not key or key in args:
                raise AnswerError(f"empty or repeated argument name in {name}: {key!r}")
            args[key] = read_value(raw, props.get(key))
        calls.append({"name": name, "arguments": args})
    return {"calls": calls, "reason": None}


def reason_kind(reason):
    """Collapse a no-call reason to one of: chit-chat, information request,
    missing argument, no tool fits, other."""
    if reason is None:
        return None
    if reason.startswith(REASON_MISSING):
        return "missing argument"
    if reason in (REASON_CHITCHAT, REASON_INFO, REASON_NO_TOOL):
        return reason
    return "other"


# -----------------------------------------------------------------------------
# validation

def validate_call(call, tools_by_name):
    """Return None if the call names a catalogue tool and its arguments validate,
    else a short string saying what is wrong."""
    tool = tools_by_name.get(call.get("name"))
    if tool is None:
        return f"unknown tool {call.get('name')!r}"
    schema = tool["parameters"]
    args = call.get("arguments", {})
    # Arguments the schema does not declare are hallucinated unless the schema
    # explicitly allows extra properties.
    if schema.get("additionalProperties", False) is False:
        extra = set(args) - set(schema.get("properties", {}))
        if extra:
            return f"{tool['name']}: unknown argument {sorted(extra)[0]!r}"
    err = next(iter(Draft202012Validator(schema).iter_errors(args)), None)
    if err is not None:
        path = ".".join(str(p) for p in err.absolute_path)
        return f"{tool['name']}: {path + ': ' if path else ''}{err.message}"
    return None


def validate_answer(answer, tools):
    """None if the whole parsed answer is valid against the tools, else the first problem."""
    by_name = {t["name"]: t for t in tools}
    for c in answer["calls"]:
        err = validate_call(c, by_name)
        if err:
            return err
    if not answer["calls"] and not answer.get("reason"):
        return "no-call answer without a reason"
    return None
