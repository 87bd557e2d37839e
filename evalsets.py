"""
External test sets written by others, turned into our test items (eval.py scores them).

    python eval.py --ckpt out/demo/best.pt --when2call evaldata/when2call/when2call_test_llm_judge.jsonl
    python eval.py --ckpt out/demo/best.pt --apibank evaldata/apibank/level-1-api.json
    python eval.py --ckpt out/demo/best.pt --apibank evaldata/apibank/level-1-api.json --apibank_request last

They are for evaluation only: never train on them or on anything derived from them.

Every loader returns (items, skipped): items in the form of our test.jsonl
({tools, request, calls, reason, kind, split}) and a Counter of the items that
could not be converted, by reason, so that nothing is dropped silently. A file
that is not of the expected kind at all raises ValueError (one clear line).

When2Call (NVIDIA): a decision per item, call / ask for missing information /
decline. Tools are in the BFCL dialect (formats.to_schema_tool).

API-Bank level-1 (Li et al., EMNLP 2023): a dialogue, 1-4 API descriptions in
the instruction, and the next API request, written as Python call syntax:
"API-Request: [ApiName(key='value', ...)]". What we do with it:
- API descriptions -> JSON Schema tools (formats.apibank_tool).
- The request the model sees is the whole dialogue so far, its turns joined by
  spaces ("User: ... AI: ... API-Request: [GetUserToken(...)]->{'token': ...}
  User: ..."), not only the last user utterance: the arguments are spread over
  several turns (the user id in one, the dates in the next), and a token the call
  needs is often only in an earlier API result. The last utterance alone loses
  them, so the item would be unanswerable; --apibank_request last scores that
  reading too. Turns are joined by spaces, not newlines, because our requests are
  single lines. The trailing "Generate API Request:" is dropped.
- The expected request -> {name, arguments}. Values are all quoted strings in the
  file (room_count='1', on='False'); each is typed by its schema (int 1, False,
  a list for attendees='['Ann', 'Bob']'), since that is what our model writes.
  31 of the 399 requests are not valid Python (unescaped quotes inside list
  values); they are split at ", key=" boundaries instead, like API-Bank's own
  regex parser does.
- Scored with our rules (exact API name and arguments), a stricter proxy than the
  official metric, which runs the call on API-Bank's simulators and compares
  results (date formats, for example, must match exactly here).
"""

import ast
import json
import re
from collections import Counter

import wire
from formats import apibank_tool, to_schema_tool

DECISIONS = ["tool_call", "request_for_info", "cannot_answer"]


class Skip(Exception):
    """An item we cannot use; the message is the reason it is counted under."""


# -----------------------------------------------------------------------------
# When2Call

def load_when2call(path):
    """When2Call JSONL -> (our test items, {reason: count} of items that could not be used)."""
    items, skipped = [], Counter()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                decision = row["correct_answer"]
                if decision not in DECISIONS:
                    raise KeyError(decision)
                tools = [to_schema_tool(json.loads(t) if isinstance(t, str) else t) for t in row["tools"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a When2Call item ({type(e).__name__}: {e})") from None
            except (wire.ToolError, ValueError) as e:
                skipped[f"tool not convertible: {str(e)[:70]}"] += 1
                continue
            calls = [json.loads(row["answers"]["tool_call"])] if decision == "tool_call" else []
            if calls and wire.validate_answer({"calls": calls, "reason": None}, tools):
                skipped["expected call does not validate against its own tools"] += 1
                continue
            reason = {"request_for_info": wire.REASON_MISSING + "?",
                      "cannot_answer": wire.REASON_NO_TOOL}.get(decision)
            items.append({"tools": tools, "request": row["question"], "calls": calls, "reason": reason,
                          "kind": decision, "decision": decision, "split": "when2call"})
    return items, skipped


# -----------------------------------------------------------------------------
# API-Bank level-1

APIBANK_CALL = re.compile(r"^\s*(?:API-Request:\s*)?\[\s*([A-Za-z_]\w*)\((.*)\)\s*\]\s*$", re.S)


def apibank_tools(instruction):
    """The API descriptions (one JSON object per line after "API descriptions:") -> tools."""
    if "API descriptions:" not in instruction:
        raise Skip("no API descriptions in the instruction")
    tools = []
    for line in instruction.split("API descriptions:", 1)[1].splitlines():
        if line.strip():
            try:
                tools.append(apibank_tool(json.loads(line)))
            except json.JSONDecodeError:
                raise Skip("an API description is not JSON") from None
            except ValueError as e:   # wire.ToolError is a ValueError
                raise Skip(f"API not convertible: {str(e)[:70]}") from None
    names = [t["name"] for t in tools]
    if not tools or len(set(names)) != len(names):
        raise Skip("no API descriptions, or one API described twice")
    return tools


def split_arguments(body):
    """The text inside ApiName(...) -> {key: raw value}. Python syntax first (it gets
    escaped quotes right); when that fails (unescaped quotes in list values), cut at
    each ", key=" and strip one pair of quotes, as API-Bank's regex parser does."""
    try:
        node = ast.parse(f"f({body})", mode="eval").body
        if node.args:
            raise Skip("expected request has a positional argument")
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError):
        pass
    marks = list(re.finditer(r"(?:^|,)\s*([A-Za-z_]\w*)\s*=", body))
    if not marks or marks[0].start() != 0:
        raise Skip("expected request is not [ApiName(key='value', ...)]")
    args = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        raw = body[m.end():nxt.start() if nxt else len(body)].strip()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]
        args[m.group(1)] = raw
    return args


def type_value(raw, prop):
    """A raw value (a string, mostly) -> the Python value its schema asks for.
    Raises ValueError if it does not read as that type."""
    t = prop.get("type")
    if isinstance(raw, str) and t in ("integer", "number", "boolean", "array", "object"):
        s = raw.strip()
        if t == "integer":
            if not re.fullmatch(r"[-+]?\d+", s):
                raise ValueError(s)
            return int(s)
        if t == "number":
            return float(s)   # ValueError if it is not a number
        if t == "boolean":
            if s.lower() not in ("true", "false"):
                raise ValueError(s)
            return s.lower() == "true"
        try:
            v = ast.literal_eval(s)
        except (SyntaxError, ValueError):
            raise ValueError(s) from None
        if not isinstance(v, list if t == "array" else dict):
            raise ValueError(s)
        return v
    if t == "string" and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)
    return raw


def parse_apibank_call(text, tools):
    """'API-Request: [ApiName(key='value', ...)]' -> {"name", "arguments"}, values
    typed by the tool's schema and the call validated against it. Raises Skip(reason)."""
    m = APIBANK_CALL.match(text)
    if not m:
        raise Skip("expected request is not [ApiName(key='value', ...)]")
    name, body = m.group(1), m.group(2).strip()
    tool = next((t for t in tools if t["name"] == name), None)
    if tool is None:
        raise Skip("expected API is not among the described APIs")
    props = tool["parameters"]["properties"]
    args = {}
    for k, raw in (split_arguments(body) if body else {}).items():
        if k not in props:
            raise Skip(f"expected call uses an argument its API does not declare: {name}.{k}")
        try:
            args[k] = type_value(raw, props[k])
        except ValueError:
            raise Skip(f"expected value does not read as its declared type: {name}.{k}") from None
    call = {"name": name, "arguments": args}
    err = wire.validate_call(call, {name: tool})
    if err:
        raise Skip(f"expected call does not validate against its API: {err[:70]}")
    return call


def apibank_request(dialogue, mode="dialogue"):
    """The dialogue in an item's input -> the request our model sees (see the docstring)."""
    turns = [t.strip() for t in dialogue.splitlines()
             if t.strip() and not t.strip().startswith("Generate API Request")]
    if mode == "last":
        turns = [t for t in turns if t.startswith("User:")][-1:]
    if not turns:
        raise Skip("empty dialogue")
    return " ".join(turns)


def load_apibank(path, request="dialogue"):
    """API-Bank level-1 JSON (a list of {file, id, instruction, input, expected_output})
    -> (our test items, {reason: count} of items that could not be converted)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: not an API-Bank file (expected a JSON list of samples)")
    items, skipped = [], Counter()
    for n, row in enumerate(rows):
        try:
            instruction, dialogue, expected = row["instruction"], row["input"], row["expected_output"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: sample #{n} is not an API-Bank sample "
                             "(needs instruction, input, expected_output)") from None
        try:
            tools = apibank_tools(instruction)
            call = parse_apibank_call(expected, tools)
            text = apibank_request(dialogue, request)
        except Skip as e:
            skipped[str(e)] += 1
            continue
        items.append({"tools": tools, "request": text, "calls": [call], "reason": None, "kind": "single",
                      "split": "apibank", "source": f"{row.get('file')}#{row.get('id')}"})
    return items, skipped


# -----------------------------------------------------------------------------
# intent / slot sets (ATIS): the literature's three numbers

# From the papers' own tables, on the same ATIS test split (evaldata/atis/README.md).
PUBLISHED_ATIS = [
    ("Slot-Gated BiLSTM (Goo et al. 2018)", "no", 93.6, 94.8, 82.2),
    ("Stack-Propagation (Qin et al. 2019)", "no", 96.9, 95.9, 86.5),
    ("JointBERT (Chen et al. 2019)", "BERT-base, 110M", 97.5, 96.1, 88.2),
    ("Stack-Propagation + BERT (Qin et al. 2019)", "BERT-base", 97.5, 96.1, 88.6),
]


def predicted_chunks(words, calls):
    """A predicted answer -> (intent label or None, set of (slot, first word, end)).
    Each argument value is placed at the first span of the utterance's words that
    it equals and no other slot took; a value found nowhere is a chunk at (-1, -1),
    always wrong, as conlleval would count a chunk of the wrong words."""
    if not calls:
        return None, set()
    # several calls of one tool are one intent with a repeated slot (formats.intent_slot_example)
    intent = "#".join(dict.fromkeys(c["name"].replace("__", "#") for c in calls))
    taken, chunks = set(), set()
    for c in calls:
        for key, value in c["arguments"].items():
            vw = str(value).split()
            spot = (-1, -1)
            for a in range(len(words) - len(vw) + 1):
                if vw and words[a:a + len(vw)] == vw and not taken & set(range(a, a + len(vw))):
                    spot = (a, a + len(vw))
                    break
            taken |= set(range(*spot))
            chunks.add((key, *spot))
    return intent, chunks


def intent_slot_scores(items, preds):
    """items with "intent" and "slots" (formats.intent_slot_example), preds with
    "pred" (the predicted calls) -> intent accuracy, span-level slot F1 (a chunk is right when its type
    and its exact words match) and sentence accuracy (intent and every slot right),
    over every item, as fractions."""
    n = len(items)
    ok_intent = ok_sentence = tp = n_pred = n_gold = 0
    for ex, p in zip(items, preds):
        words = ex["request"].split()
        intent, chunks = predicted_chunks(words, p["pred"])
        gold = {tuple(s) for s in ex["slots"]}
        tp += len(chunks & gold)
        n_pred, n_gold = n_pred + len(chunks), n_gold + len(gold)
        ok_intent += intent == ex["intent"]
        ok_sentence += intent == ex["intent"] and chunks == gold
    prec, rec = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return {"n": n, "intent_acc": ok_intent / n, "slot_f1": 2 * prec * rec / max(prec + rec, 1e-12),
            "slot_precision": prec, "slot_recall": rec, "sentence_acc": ok_sentence / n}


def format_intent_slot(scores, label="this model"):
    rows = [(name, pre, a, f, s) for name, pre, a, f, s in PUBLISHED_ATIS]
    rows.append((label, "no", 100 * scores["intent_acc"], 100 * scores["slot_f1"], 100 * scores["sentence_acc"]))
    lines = [f"{'model':46s} {'pretrained':16s} {'intent acc':>10s} {'slot F1':>8s} {'sentence acc':>12s}"]
    lines += [f"{n:46s} {p:16s} {a:10.1f} {f:8.1f} {s:12.1f}" for n, p, a, f, s in rows]
    return "\n".join(lines)
