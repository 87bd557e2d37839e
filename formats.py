"""
Examples from other people's datasets, turned into ours.

Two JSONL forms are read, one example per line, detected per line:

    {query, tools, answers}      xLAM / APIGen style: answers is a list of
                                 {name, arguments}; tools and answers may be JSON
                                 strings; parameters may be JSON Schema or the
                                 xLAM dialect {"p": {"type": "str, optional", ...}}
    {messages, tools}            OpenAI chat: the last user message before the first
                                 assistant message is the request; that assistant
                                 message's tool_calls are the answer

Tool dialects other people use are converted here too: xLAM/BFCL (to_schema_tool)
and API-Bank's API descriptions (apibank_tool, used by evalsets.py).

A line that cannot be used is counted under a reason and skipped; a bad line
never stops the import. Every imported call is validated against its tools.
"""

import json
import os
import re

import wire

XLAM_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer",
              "float": "number", "number": "number", "bool": "boolean", "boolean": "boolean",
              "dict": "object", "object": "object", "list": "array", "array": "array"}


class FormatError(ValueError):
    """A dataset file or folder we cannot read; the message names it and the problem."""


class Skip(Exception):
    """A line we cannot use; the message is the reason it is counted under."""


def _maybe_json(v):
    return json.loads(v) if isinstance(v, str) else v


def xlam_param(spec):
    """{'type': 'List[str], optional', 'description': ..., 'default': ...} ->
    (JSON Schema property, required?)"""
    t = str(spec.get("type", "string"))
    optional = "optional" in t.lower() or "default" in spec
    t = t.split(",")[0].strip()
    prop = {}
    inner = None
    if t.lower().startswith(("list[", "array[")):
        inner = XLAM_TYPES.get(t[t.index("[") + 1:-1].strip().lower())
        t = "list"
    jt = XLAM_TYPES.get(t.lower())
    if jt is None:
        raise ValueError(f"unknown parameter type {t!r}")
    prop["type"] = jt
    if jt == "array" and inner:
        prop["items"] = {"type": inner}
    if spec.get("description"):
        prop["description"] = str(spec["description"])
    if "enum" in spec:
        prop["enum"] = spec["enum"]
    return prop, not optional


def to_schema_tool(tool):
    """A tool in either dialect -> our bare form (wire.normalize_tool checks it)."""
    tool = tool.get("function", tool) if tool.get("type") == "function" else tool
    params = tool.get("parameters") or {}
    if params.get("type") in ("object", "dict") or "properties" in params:
        params = {**params, "type": "object"}
    else:   # xLAM dialect: {param: {type, description, default}}
        props, req = {}, []
        for k, spec in params.items():
            props[k], is_req = xlam_param(spec if isinstance(spec, dict) else {"type": spec})
            if is_req:
                req.append(k)
        params = {"type": "object", "properties": props, "required": req}
    params["properties"] = {k: fix_types(p) for k, p in params.get("properties", {}).items()}
    return wire.normalize_tool({"name": tool.get("name"), "description": tool.get("description", ""),
                                "parameters": params})


def fix_types(schema):
    """JSON Schema spells the xLAM/BFCL type names differently ('dict', 'float',
    'tuple', 'any'); rename them, all the way down."""
    if isinstance(schema, list):
        return [fix_types(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: fix_types(v) if k in ("properties", "items", "anyOf", "oneOf") else v for k, v in schema.items()}
    if "properties" in out and isinstance(out["properties"], dict):
        out["properties"] = {k: fix_types(v) for k, v in schema["properties"].items()}
    t = out.get("type")
    if t == "any":
        del out["type"]
    elif t == "tuple":
        out["type"] = "array"
    elif isinstance(t, str) and t in XLAM_TYPES:
        out["type"] = XLAM_TYPES[t]
    return out


# API-Bank does not mark required parameters; these phrases in a description
# are the only sign that one may be left out.
APIBANK_OPTIONAL = re.compile(r"\[optional\]|only needed|default is", re.I)


def apibank_tool(api):
    """An API-Bank API description {name, description, input_parameters: {p: {type,
    description}}, output_parameters} -> our bare form (wire.normalize_tool checks it).
    Its types are Python names: str, int, float, bool, list, list(str), dict.
    Every parameter is required unless its description says it is not ("[Optional]",
    "Only needed for the first call", "Default is ..."): the dialect has no required
    list, and the constrained decoder must not be free to stop before the arguments
    the API normally takes. output_parameters describe the result, which our model
    never sees, so they are dropped (they would only cost prompt tokens)."""
    if not isinstance(api, dict):
        raise ValueError("API description is not a JSON object")
    params = api.get("input_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{api.get('name')}: input_parameters is not an object")
    props, required = {}, []
    for k, spec in params.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{api.get('name')}: parameter {k!r} is not an object")
        # list(str) is xLAM's List[str]: reuse that reader
        ptype = re.sub(r"^(\w+)\((.*)\)$", r"\1[\2]", str(spec.get("type", "str")).strip())
        desc = str(spec.get("description", "")).strip()
        props[k], _ = xlam_param({"type": ptype, "description": desc})
        if not APIBANK_OPTIONAL.search(desc):
            required.append(k)
    return wire.normalize_tool({"name": api.get("name"), "description": api.get("description", ""),
                                "parameters": {"type": "object", "properties": props, "required": required}})


def from_xlam(row):
    tools = [to_schema_tool(t) for t in _maybe_json(row["tools"])]
    answers = _maybe_json(row["answers"])
    calls = [{"name": a["name"], "arguments": _maybe_json(a.get("arguments", {})) or {}} for a in answers]
    return tools, row["query"], calls, None


def from_openai_chat(row):
    tools = [to_schema_tool(t) for t in row["tools"]]
    request, msgs = None, row["messages"]
    for m in msgs:
        if m.get("role") == "user":
            request = m.get("content")
            if isinstance(request, list):   # content parts
                request = " ".join(p.get("text", "") for p in request if isinstance(p, dict))
        elif m.get("role") == "assistant" and request is not None:
            calls = [{"name": tc["function"]["name"], "arguments": _maybe_json(tc["function"].get("arguments")) or {}}
                     for tc in m.get("tool_calls") or []]
            reason = None
            if not calls:
                reason = (m.get("content") or "").strip().lower().rstrip(".")
                if wire.reason_kind(reason) in (None, "other"):
                    raise Skip("no_call_reason")
            return tools, request, calls, reason
    raise Skip("no_assistant_turn")


def import_jsonl(path):
    """-> (examples, counts). counts: ok plus one entry per reason a line was skipped."""
    examples, counts = [], {"ok": 0}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise TypeError
                conv = from_openai_chat if "messages" in row else from_xlam
                tools, request, calls, reason = conv(row)
                if not isinstance(request, str) or not request.strip():
                    raise Skip("empty_request")
                answer = {"calls": calls, "reason": reason}
                err = wire.validate_answer(answer, tools)
                if err:
                    raise Skip("invalid_call")
            except Skip as e:
                why = str(e)
            except json.JSONDecodeError:
                why = "not_json"
            except wire.ToolError:
                why = "bad_tool"
            except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                why = "bad_shape"
            else:
                why = "ok"
                examples.append({"kind": "multi" if len(calls) > 1 else "single" if calls else "imported_nocall",
                                 "tools": tools, "request": request, "calls": calls, "reason": reason,
                                 "source": "import"})
            counts[why] = counts.get(why, 0) + 1
    return examples, counts


# -----------------------------------------------------------------------------
# intent / slot sets (ATIS and any folder in its format) -> a compiled catalogue

INTENT_SLOT_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def read_intent_slot_split(folder, name):
    """{name}.seq.in (words), {name}.seq.out (one BIO tag per word), {name}.label
    (the intent) -> list of (words, tags, label); FormatError names a bad line."""
    paths = [os.path.join(folder, f"{name}.{ext}") for ext in ("seq.in", "seq.out", "label")]
    for p in paths:
        if not os.path.isfile(p):
            raise FormatError(f"{p}: missing (an intent/slot folder has {{train,valid,test}}.{{seq.in,seq.out,label}})")
    cols = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            cols.append([line.rstrip("\n") for line in f])
    if not len(cols[0]) == len(cols[1]) == len(cols[2]):
        raise FormatError(f"{folder}/{name}.*: the three files have {len(cols[0])}, {len(cols[1])} and "
                          f"{len(cols[2])} lines; they must be aligned line by line")
    rows = []
    for n, (text, tags, label) in enumerate(zip(*cols), 1):
        words, tags = text.split(), tags.split()
        if len(words) != len(tags) or not words or not label.strip():
            raise FormatError(f"{folder}/{name}.seq.*:{n}: {len(words)} words but {len(tags)} tags"
                              if len(words) != len(tags) else f"{folder}/{name}:{n}: empty utterance or label")
        rows.append((words, tags, label.strip()))
    return rows


def slot_spans(tags):
    """BIO tags -> [(slot type, first word, last word + 1)], as conlleval reads
    them: a chunk starts at B-x, or at I-x that does not continue an x chunk."""
    spans, cur = [], None
    for i, t in enumerate(tags + ["O"]):
        kind, _, typ = t.partition("-")
        if cur and not (kind == "I" and typ == cur[0]):
            spans.append((cur[0], cur[1], i))
            cur = None
        if kind in ("B", "I") and cur is None:
            cur = (typ, i)
    return spans


def intent_tool_name(label):
    """An intent label as a tool name: joint labels (a#b) become a__b."""
    return label.replace("#", "__")


def intent_slot_catalogue(rows):
    """Training rows -> tools: one per intent label, each taking every slot type of
    the training set as an optional string argument (in order of first
    appearance). Slots mean the same whatever the intent, and a test utterance
    often pairs an intent with a slot that training never paired it with (45 of
    ATIS's 893): a schema per intent would make those unanswerable."""
    labels, types = [], []
    for words, tags, label in rows:
        if label not in labels:
            labels.append(label)
        for typ, _, _ in slot_spans(tags):
            if typ not in types:
                types.append(typ)
    params = {"type": "object", "properties": {t: {"type": "string"} for t in types}}
    return [wire.normalize_tool({"name": intent_tool_name(label), "description": f"intent {label}",
                                 "parameters": params}) for label in labels]


def intent_slot_example(words, tags, label, split):
    """One utterance -> our example: a call of the intent's tool, its arguments the
    slots' words in the order they occur. A slot type that occurs again (two
    destinations: "to dallas and to denver") cannot be a second argument of the
    same name: it goes to a second call of the same tool, which holds the repeats."""
    calls = []
    for typ, a, b in slot_spans(tags):
        call = next((c for c in calls if typ not in c["arguments"]), None)
        if call is None:
            call = {"name": intent_tool_name(label), "arguments": {}}
            calls.append(call)
        call["arguments"][typ] = " ".join(words[a:b])
    calls = calls or [{"name": intent_tool_name(label), "arguments": {}}]
    return {"request": " ".join(words), "calls": calls, "reason": None,
            "kind": "single" if len(calls) == 1 else "multi", "split": split, "domain": label, "intent": label,
            "slots": [list(s) for s in slot_spans(tags)], "source": "intent_slot"}


def swap_slot_values(rows, copies, rng, reserved=()):
    """Training rows -> `copies` new rows per row, each slot's words replaced by
    the words of another slot of the same type drawn from the rows (tags
    rebuilt, B- then I-; the intent kept). A model that has seen "to <any
    city>" as the destination tags a city by its place in the request, not by
    the city: the values of a test set are often ones training never paired
    with that context, or never had. A new row equal to one in `reserved` (the
    val and test utterances) or to a training row is dropped."""
    pools = {}
    for words, tags, _ in rows:
        for typ, a, b in slot_spans(tags):
            pools.setdefault(typ, []).append(words[a:b])
    seen = {" ".join(w) for w, _, _ in rows} | set(reserved)
    out = []
    for _ in range(copies):
        for words, tags, label in rows:
            spans = slot_spans(tags)
            if not spans:
                continue
            new_w, new_t, at = [], [], 0
            for typ, a, b in spans:
                fill = rng.choice(pools[typ])
                new_w += words[at:a] + fill
                new_t += tags[at:a] + [f"B-{typ}"] + [f"I-{typ}"] * (len(fill) - 1)
                at = b
            new_w, new_t = new_w + words[at:], new_t + tags[at:]
            text = " ".join(new_w)
            if text not in seen:
                seen.add(text)
                out.append((new_w, new_t, label))
    return out


def load_intent_slot_dir(folder, swap_copies=0, rng=None):
    """An ATIS-format folder -> (tools from train, {train, val, test: examples}).
    Every utterance of valid and test is kept, even when its intent or a slot is
    not in the catalogue (it is then scored as wrong, never dropped). swap_copies:
    training rows added per training row with their slot values swapped
    (swap_slot_values)."""
    if not os.path.isdir(folder):
        raise FormatError(f"{folder}: no such folder")
    rows = {split: read_intent_slot_split(folder, name) for split, name in INTENT_SLOT_SPLITS.items()}
    tools = intent_slot_catalogue(rows["train"])
    if swap_copies:
        reserved = {" ".join(w) for split in ("val", "test") for w, _, _ in rows[split]}
        rows["train"] = rows["train"] + swap_slot_values(rows["train"], swap_copies, rng, reserved)
    out = {split: [intent_slot_example(*r, split="seen") for r in rs] for split, rs in rows.items()}
    return tools, out
