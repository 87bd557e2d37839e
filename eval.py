"""
Score a model on a test set: the four-number report and more.

    python eval.py --ckpt out/demo/best.pt                   # data dir's test.jsonl, ~1 min for the tiny model
    python eval.py --ckpt out/demo/best.pt --test_file my_set.jsonl --out my_eval.json
    python eval.py --ckpt out/demo/best.pt --no_constrain    # the raw model, without the answer grammar
    python eval.py --ckpt out/general/best.pt --retrieve_k 0 # catalogues whole (default: the 8 likeliest tools)

Decoding is constrained by default (sample.py), so valid is 100% by construction;
--no_constrain measures what the model itself gets right.

For each group of items (all / seen tools / unseen tools / no-call / multi-call):
    valid       output parses; its calls name catalogue tools with schema-valid
                arguments, or it is a no-call with a reason
    tool_acc    predicted multiset of tool names == gold multiset
    arg_acc     arguments right, among valid outputs with the right tools
    false_call  gold says no call, the model called a tool
    missed      gold has calls, the model declined
    exact       whole answer right: calls compared as a multiset (order-free)
    f1          call-level F1 (micro), over items with calls on either side
    reason_acc  gold says no call: the model declined with the right kind of reason
                (chit-chat / information request / missing argument / no tool fits)
plus latency p50/p95 per request. Then the same metrics broken down by the
number of tools in the catalogue (0, 1-2, 3-5, 6-10, 11+), the number of gold
calls (0, 1, 2, 3+) and the domain (items made by data.py carry one); every
wrong answer put in one error class (ERROR_CLASSES below: wrong tool, spurious
or missed call, missing / extra argument, wrong type / value, wrong reason, ...)
with examples, and the most frequent tool confusions. Constrained answers carry
a confidence: its calibration (accuracy per confidence bin, expected calibration
error) and the accuracy left when the model abstains below a threshold are
printed too. Writes all of it as JSON, and one line per item with the
prediction and its error class, for error analysis (utils/plots.py draws from both).

External sets (evaluation only, never trained on; loaders in evalsets.py):
    python eval.py --ckpt out/demo/best.pt --when2call evaldata/when2call/when2call_test_llm_judge.jsonl
    python eval.py --ckpt out/demo/best.pt --apibank evaldata/apibank/level-1-api.json

When2Call asks for a decision: call a tool, ask for missing information, or
decline. A call is "tool_call", a no-call whose reason is "missing argument" is
"request_for_info", any other no-call is "cannot_answer"; decision accuracy
compares that with the item's label, and exact call match is scored on its
tool_call items. API-Bank level-1 asks for the next API call in a dialogue,
scored by exact API name and arguments. Items that cannot be converted, and
prompts longer than the model's context, are counted and reported, not
silently dropped.

A model that reads the catalogue from the prompt sees, as in sample.py and serve.py,
only the --retrieve_k tools most related to the request when a catalogue is longer
(retrieve.py), and fewer when those would not leave room in the context for the
answer (Router.fit). A gold tool retrieval drops cannot be called: that item counts as the
model's error, and the report says on how many items it happened.

Compare result files (no model needed; differences from the first file):
    python eval.py --compare out/a/eval_test.json out/b/eval_test.json
"""

import argparse
import json
import os
import sys
from collections import Counter
from itertools import zip_longest

import numpy as np
from jsonschema import Draft202012Validator
from tqdm import tqdm

import wire
from evalsets import DECISIONS, format_intent_slot, intent_slot_scores, load_apibank, load_when2call
from model import CheckpointError
from runtime import die
from sample import Router


# -----------------------------------------------------------------------------
# scoring rules

def values_equal(a, b):
    """Type-aware equality: 5 == 5.0 (both numbers), but True != 1 and "5" != 5;
    lists in order, objects key by key."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def call_equal(a, b):
    return a["name"] == b["name"] and values_equal(a.get("arguments", {}), b.get("arguments", {}))


def matched_calls(pred, gold):
    """Size of the largest one-to-one matching of equal calls (multiset intersection)."""
    left = list(gold)
    n = 0
    for p in pred:
        for i, g in enumerate(left):
            if call_equal(p, g):
                n += 1
                del left[i]
                break
    return n


def score_item(pred, gold_calls, gold_reason=None):
    """pred: Router.answer result; gold_calls: list. -> dict of per-item outcomes."""
    parsed = pred["error"] is None or not pred["error"].startswith("unparseable")
    pcalls = pred["calls"] if parsed else []
    names_ok = parsed and Counter(c["name"] for c in pcalls) == Counter(c["name"] for c in gold_calls)
    m = matched_calls(pcalls, gold_calls)
    exact = parsed and m == len(pcalls) == len(gold_calls)
    calls_seen = [json.dumps(c, sort_keys=True) for c in pcalls]
    return {"valid": pred["valid"], "parsed": parsed, "names_ok": names_ok, "exact": exact,
            # the decision to stop, on its own: as many calls as the gold has; and
            # an answer that holds the same call twice (the decoder never writes one)
            "count_ok": parsed and len(pcalls) == len(gold_calls),
            "repeats": len(set(calls_seen)) < len(calls_seen),
            "matched": m, "n_pred": len(pcalls), "n_gold": len(gold_calls),
            "called": parsed and len(pcalls) > 0,
            # for gold no-calls: did the model decline for the right kind of reason?
            "reason_ok": (not gold_calls and not pcalls and parsed
                          and wire.reason_kind(pred["reason"]) == wire.reason_kind(gold_reason))}


def summarize(rows):
    """rows: list of (item, outcome, latency_ms) -> metrics dict."""
    def rate(num, den):
        return (sum(num) / len(den)) if den else None
    outs = [o for _, o, _ in rows]
    gold_call = [o for o in outs if o["n_gold"] > 0]
    gold_none = [o for o in outs if o["n_gold"] == 0]
    arg_pool = [o for o in gold_call if o["valid"] and o["names_ok"]]
    tp = sum(o["matched"] for o in outs)
    n_pred = sum(o["n_pred"] for o in outs)
    n_gold = sum(o["n_gold"] for o in outs)
    prec = tp / n_pred if n_pred else None
    rec = tp / n_gold if n_gold else None
    f1 = (2 * prec * rec / (prec + rec) if prec and rec else 0.0) if prec is not None and rec is not None else None
    lat = [l for _, _, l in rows]
    return {
        "n": len(rows),
        "valid": rate([o["valid"] for o in outs], outs),
        "tool_acc": rate([o["names_ok"] for o in outs], outs),
        "arg_acc": rate([o["exact"] for o in arg_pool], arg_pool),
        "false_call": rate([o["called"] for o in gold_none], gold_none),
        "missed": rate([o["parsed"] and not o["called"] for o in gold_call], gold_call),
        "exact": rate([o["exact"] for o in outs], outs),
        "count_ok": rate([o.get("count_ok", False) for o in outs], outs),
        "repeats": rate([o.get("repeats", False) for o in outs], outs),
        "f1": f1,
        "reason_acc": rate([o["reason_ok"] for o in gold_none], gold_none),
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat else None,
        "latency_p95_ms": float(np.percentile(lat, 95)) if lat else None,
    }


GROUPS = {
    "all": lambda ex: True,
    "seen": lambda ex: ex.get("split", "seen") == "seen",
    "unseen": lambda ex: ex.get("split") == "unseen",
    "no-call": lambda ex: not ex["calls"],
    "multi-call": lambda ex: len(ex["calls"]) > 1,
}
for _d in DECISIONS:
    GROUPS[_d] = lambda ex, d=_d: ex.get("decision") == d


def groups_for(items):
    """GROUPS, with one group per test split the items name (seen / unseen tools;
    for a compiled catalogue, new-values / new-phrasing) in the order they come."""
    splits = list(dict.fromkeys(ex.get("split", "seen") for ex in items))
    out = {"all": GROUPS["all"]}
    out.update({s: (lambda ex, s=s: ex.get("split", "seen") == s) for s in splits})
    out.update({g: f for g, f in GROUPS.items() if g not in ("all", "seen", "unseen")})
    return out


def retrieval_report(preds):
    """Items whose catalogue retrieval cut (Router.retrieve_k), and those of them
    where a gold tool was not among the tools kept."""
    cut = [p for p in preds if p["retrieved"] is not None]
    dropped = sum(any(c["name"] not in p["retrieved"] for c in p["gold"]) for p in cut)
    return {"cut": len(cut), "gold_dropped": dropped}


def decision_of(pred):
    """A prediction -> call / ask / decline (When2Call's three labels), or unparseable."""
    if pred["error"] and pred["error"].startswith("unparseable"):
        return "unparseable"
    if pred["calls"]:
        return "tool_call"
    return "request_for_info" if wire.reason_kind(pred["reason"]) == "missing argument" else "cannot_answer"


def decision_report(rows, preds):
    """Accuracy of the call / ask / decline decision, per class, and the confusions."""
    pairs = [(ex["decision"], p["decision"]) for (ex, _, _), p in zip(rows, preds) if "decision" in ex]
    fit = [(ex["decision"], p["decision"]) for (ex, _, _), p in zip(rows, preds)
           if "decision" in ex and not p["too_long"]]
    if not pairs:
        return None
    confusion = {g: dict(Counter(p for gg, p in pairs if gg == g)) for g in DECISIONS}
    per_class = {g: (confusion[g].get(g, 0) / sum(confusion[g].values())) if confusion[g] else None
                 for g in DECISIONS}
    return {"n": len(pairs), "accuracy": sum(g == p for g, p in pairs) / len(pairs),
            "per_class": per_class, "confusion": confusion,
            "too_long": sum(p["too_long"] for p in preds),
            # the same, over the items whose prompt fits the model's context
            "accuracy_fitting": sum(g == p for g, p in fit) / len(fit) if fit else None, "n_fitting": len(fit)}


# -----------------------------------------------------------------------------
# what went wrong: one class per wrong answer

# In precedence order: an answer is put in the first class that fits. The order
# follows the order in which the model decides: whether the prompt fit at all,
# whether the answer parses, which tools to call, which keys, then which values.
# An earlier mistake makes the later comparisons meaningless (the arguments of
# the wrong tool cannot be right), so it is the one counted.
ERROR_CLASSES = [
    "prompt too long",    # the prompt did not fit the model's context; nothing was decoded
    "unparseable",        # the output is not an answer at all (only without the grammar)
    "spurious call",      # called a tool where gold has none, or one call more than gold
                          # (the gold tool names are a strict sub-multiset of the predicted)
    "missed call",        # declined where gold calls, or left a gold call out (the
                          # predicted names are a strict sub-multiset of gold's)
    "wrong tool",         # otherwise different tool names (a swap, with or without more)
    "missing argument",   # right tools, but a key gold sets is absent
    "extra argument",     # right tools, a key gold does not set (hallucinated, or an
                          # optional one the request did not ask for)
    "wrong type",         # same key, the value's JSON type differs from gold's or the schema's
    "wrong value",        # same key and type, another value
    "wrong reason",       # gold and prediction both decline, with another kind of reason
]


def json_type(v):
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), "null")


def argument_errors(p, g, props):
    """The argument classes one predicted call shows against one gold call of the same tool."""
    pa, ga = p.get("arguments", {}), g.get("arguments", {})
    found = set()
    if set(ga) - set(pa):
        found.add("missing argument")
    if set(pa) - set(ga):
        found.add("extra argument")
    for k in set(pa) & set(ga):
        if values_equal(pa[k], ga[k]):
            continue
        declared = props.get(k, {}).get("type")
        off_schema = declared is not None and not Draft202012Validator({"type": declared}).is_valid(pa[k])
        found.add("wrong type" if json_type(pa[k]) != json_type(ga[k]) or off_schema else "wrong value")
    return found


def classify_error(pred, gold_calls, gold_reason=None, tools=None):
    """pred: Router.answer result -> None if the answer is right (exact, and for a
    no-call the right kind of reason), else the first class of ERROR_CLASSES it
    fits. tools (bare form) let a value outside its declared type count as a
    wrong type even when gold has none to compare with."""
    if pred.get("too_long"):
        return "prompt too long"
    if pred["error"] and pred["error"].startswith("unparseable"):
        return "unparseable"
    pcalls = pred["calls"]
    if not gold_calls:
        if pcalls:
            return "spurious call"
        return None if wire.reason_kind(pred["reason"]) == wire.reason_kind(gold_reason) else "wrong reason"
    pn, gn = Counter(c["name"] for c in pcalls), Counter(c["name"] for c in gold_calls)
    if pn != gn:
        if not gn - pn:
            return "spurious call"
        if not pn - gn:
            return "missed call"
        return "wrong tool"
    # Same tools: pair each gold call with the predicted call of that name that
    # differs from it least (several calls of one tool may come in any order).
    props_of = {t["name"]: t["parameters"].get("properties", {}) for t in tools or []}
    found, left = set(), list(pcalls)
    for g in gold_calls:
        props = props_of.get(g["name"], {})
        cands = [(len(argument_errors(p, g, props)), i) for i, p in enumerate(left) if p["name"] == g["name"]]
        _, i = min(cands)
        found |= argument_errors(left.pop(i), g, props)
    return next((c for c in ERROR_CLASSES if c in found), None)


def show(calls, reason=None):
    """Calls in one short line, for examples: name(key="value", n=5); ..."""
    if not calls:
        return f"no call: {reason}"
    return "; ".join(c["name"] + "(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}"
                                                 for k, v in c.get("arguments", {}).items()) + ")"
                     for c in calls)


def error_report(records, n_examples=3):
    """records: the predictions file's lines (with error_class) -> counts per class,
    a few examples of each, and the tool confusions: for each wrong-tool answer, the
    gold names the prediction lacks paired in order with the names it has instead
    (an unpaired one pairs with "(none)"); the 10 most frequent pairs."""
    counts = Counter(r["error_class"] for r in records if r["error_class"])
    examples, confusions = {}, Counter()
    for r in records:
        c = r["error_class"]
        if c and len(examples.setdefault(c, [])) < n_examples:
            got = (f"unparseable: {r['text'][:100]!r}" if c == "unparseable"
                   else "nothing: the prompt is longer than the context" if c == "prompt too long"
                   else show(r["pred"], r["pred_reason"]))
            examples[c].append({"request": r["request"][:300], "gold": show(r["gold"], r["gold_reason"]),
                                "pred": got})
        if c == "wrong tool":
            gn, pn = Counter(x["name"] for x in r["gold"]), Counter(x["name"] for x in r["pred"])
            for pair in zip_longest((gn - pn).elements(), (pn - gn).elements(), fillvalue="(none)"):
                confusions[pair] += 1
    return {"n_wrong": sum(counts.values()), "n": len(records),
            "counts": {c: counts[c] for c in ERROR_CLASSES if counts[c]},
            "examples": {c: examples[c] for c in ERROR_CLASSES if c in examples},
            "confusions": [{"gold": g, "pred": p, "n": n} for (g, p), n in confusions.most_common(10)]}


def format_errors(rep, n_show=2):
    lines = [f"errors: {rep['n_wrong']} of {rep['n']} answers wrong (not exact, or declined "
             f"for the wrong kind of reason), by first problem:"]
    for c, n in rep["counts"].items():
        lines.append(f"  {c:18s} {n:5d} {100 * n / rep['n']:6.1f}%")
        for e in rep["examples"][c][:n_show]:
            req = e["request"] if len(e["request"]) <= 70 else e["request"][:67] + "..."
            lines.append(f"      {req!r}\n        gold {e['gold'][:110]}\n        got  {e['pred'][:110]}")
    if rep["confusions"]:
        lines.append("  tool confusions (gold -> predicted): " + ", ".join(
            f"{c['gold']} -> {c['pred']} {c['n']}" for c in rep["confusions"]))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# breakdowns: the same metrics per bin of one property of the item

def tools_bin(n):
    return "0" if n == 0 else "1-2" if n <= 2 else "3-5" if n <= 5 else "6-10" if n <= 10 else "11+"


BREAKDOWNS = {   # name -> (item -> bin or None to leave it out, the bins' order or None: sorted)
    "n_tools": (lambda ex: tools_bin(len(ex["tools"])), ["0", "1-2", "3-5", "6-10", "11+"]),
    "n_calls": (lambda ex: ["0", "1", "2", "3+"][min(len(ex["calls"]), 3)], ["0", "1", "2", "3+"]),
    # test items made by data.py carry the domain of their gold tool ("no call"
    # for no-calls); external sets have none and are left out of this one
    "domain": (lambda ex: ex.get("domain"), None),
}


def breakdowns(rows):
    """rows: (item, outcome, latency) -> {breakdown: {bin: summarize(rows in the bin)}}."""
    out = {}
    for name, (key, order) in BREAKDOWNS.items():
        bins = {}
        for r in rows:
            b = key(r[0])
            if b is not None:
                bins.setdefault(b, []).append(r)
        if bins:
            out[name] = {b: summarize(bins[b]) for b in (order or sorted(bins)) if b in bins}
    return out


def format_breakdowns(bd):
    lines = [f"{'breakdown':10s} {'bin':22s} {'n':>6s} {'exact':>8s} {'tool_acc':>9s} {'n_calls ok':>11s} {'repeats':>8s}"]
    for name, bins in bd.items():
        for b, m in bins.items():
            lines.append(f"{name:10s} {b:22s} {m['n']:6d} {100 * m['exact']:7.1f}% {100 * m['tool_acc']:8.1f}% "
                         f"{100 * m['count_ok']:10.1f}% {100 * m['repeats']:7.1f}%")
    return "\n".join(lines)


def calibration(confs, correct, n_bins=10):
    """Reliability of the confidence: items binned by confidence, each bin's mean
    confidence against its accuracy; ECE = the size-weighted mean gap (Guo et al. 2017)."""
    bins = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = [(c, ok) for c, ok in zip(confs, correct) if lo <= c < hi or (b == n_bins - 1 and c == 1.0)]
        if sel:
            bins.append({"lo": lo, "hi": hi, "n": len(sel), "confidence": sum(c for c, _ in sel) / len(sel),
                         "accuracy": sum(ok for _, ok in sel) / len(sel)})
    n = len(confs)
    ece = sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins) if n else None
    return {"bins": bins, "ece": ece}


def abstention(confs, correct, thresholds=(0.0, 0.3, 0.5, 0.7, 0.9)):
    """Answer only when confidence >= t: what share is answered (coverage) and how
    many of those are right."""
    rows = []
    for t in thresholds:
        kept = [ok for c, ok in zip(confs, correct) if c >= t]
        rows.append({"threshold": t, "coverage": len(kept) / len(confs) if confs else None,
                     "accuracy": sum(kept) / len(kept) if kept else None})
    return rows


COLUMNS = ["n", "valid", "tool_acc", "arg_acc", "false_call", "missed", "exact", "f1",
           "reason_acc", "latency_p50_ms", "latency_p95_ms"]


def format_table(groups):
    head = f"{'group':12s}" + "".join(f"{c.replace('latency_', '').replace('_ms', ' ms'):>11s}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for g, m in groups.items():
        cells = []
        for c in COLUMNS:
            v = m.get(c)
            if v is None:
                cells.append(f"{'-':>11s}")
            elif c == "n":
                cells.append(f"{v:>11d}")
            elif c.endswith("_ms"):
                cells.append(f"{v:>11.1f}")
            else:
                cells.append(f"{100 * v:>10.1f}%")
        lines.append(f"{g:12s}" + "".join(cells))
    return "\n".join(lines)


def load_items(path):
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                # an item without tools is for a compiled catalogue: the model's own
                ex["tools"] = wire.normalize_tools(ex["tools"]) if "tools" in ex else None
                assert isinstance(ex["request"], str) and isinstance(ex["calls"], list)
            except (json.JSONDecodeError, KeyError, AssertionError, wire.ToolError) as e:
                raise ValueError(f"{path}:{n}: not a test item ({type(e).__name__}: {e})") from None
            items.append(ex)
    return items


# -----------------------------------------------------------------------------
# --compare: result files side by side

COMPARE_METRICS = ["n", "valid", "tool_acc", "arg_acc", "false_call", "missed", "exact", "f1",
                   "reason_acc", "latency_p50_ms"]


def load_result(path):
    """An eval.py result JSON; ValueError with one clear line if it is not one."""
    res = wire.read_json(path)
    if not isinstance(res, dict) or not isinstance(res.get("groups"), dict):
        raise ValueError(f"{path}: not an eval.py result (it has no 'groups')")
    return res


def compare(paths):
    """Result files -> a table: one row per group metric, breakdown bin (exact) and
    error class (count), one column per file; every column after the first shows
    its difference from the first (percentage points for rates)."""
    results = [load_result(p) for p in paths]

    def union(lists):   # keys in the order they first appear
        return list(dict.fromkeys(k for keys in lists for k in keys))

    rows = []   # (label, kind, values)
    for g in union(r["groups"] for r in results):
        for m in COMPARE_METRICS:
            kind = "n" if m == "n" else "ms" if m.endswith("_ms") else "rate"
            rows.append((f"{g} {m.replace('latency_', '').replace('_ms', ' ms')}", kind, [r["groups"].get(g, {}).get(m) for r in results]))
    bds = [r.get("breakdowns") or {} for r in results]
    for name in union(bds):
        for b in union(bd.get(name, {}) for bd in bds):
            rows.append((f"{name}={b} exact", "rate", [bd.get(name, {}).get(b, {}).get("exact") for bd in bds]))
    decs = [r.get("decisions") or {} for r in results]
    rows.append(("decision accuracy", "rate", [d.get("accuracy") for d in decs]))
    errs = [(r.get("errors") or {}).get("counts", {}) for r in results]
    for c in union(errs):
        rows.append((f"errors: {c}", "n", [e.get(c, 0) for e in errs]))

    def cell(v, kind):
        if v is None:
            return "-"
        return f"{v:d}" if kind == "n" else f"{v:.1f}" if kind == "ms" else f"{100 * v:.1f}%"

    def delta(v, v0, kind):
        if v is None or v0 is None:
            return ""
        d = v - v0 if kind != "rate" else 100 * (v - v0)
        return f"({d:+d})" if kind == "n" else f"({d:+.1f})"

    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"[{i + 1}] {p}  ({r.get('ckpt')} on {r.get('test_file')}, {r.get('n_items')} items)"
             for i, (p, r) in enumerate(zip(paths, results))]
    lines += ["", (" " * width + f"{'[1]':>9s}" + "".join(f"{f'[{i + 1}]':>9s}{'':11s}"
                                                          for i in range(1, len(paths)))).rstrip()]
    for label, kind, vals in rows:
        if all(v is None for v in vals):
            continue
        lines.append(f"{label:{width}s}{cell(vals[0], kind):>9s}" + "".join(
            f"{cell(v, kind):>9s} {delta(v, vals[0], kind):10s}" for v in vals[1:]).rstrip())
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/demo/best.pt")
    p.add_argument("--data_dir", default=None, help="default: the checkpoint's")
    p.add_argument("--test_file", default=None, help="default: <data_dir>/test.jsonl")
    p.add_argument("--when2call", default=None, metavar="JSONL",
                   help="score the When2Call set (when2call_test_llm_judge.jsonl) instead")
    p.add_argument("--apibank", default=None, metavar="JSON",
                   help="score API-Bank level-1 (level-1-api.json) instead")
    p.add_argument("--apibank_request", choices=["dialogue", "last"], default="dialogue",
                   help="what of an API-Bank dialogue the model sees: all turns, or the last user turn")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="print these result files side by side (no model needed) and exit")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items")
    p.add_argument("--out", default=None, help="result JSON (default: next to the checkpoint)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_constrain", action="store_true", help="score the raw model, without the answer grammar")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    p.add_argument("--retrieve_k", type=int, default=8,
                   help="a catalogue in the prompt longer than this: only its k tools most related "
                   "to the request (retrieve.py); 0 = all")
    args = p.parse_args(argv)

    if args.compare:
        try:
            print(compare(args.compare))
        except ValueError as e:
            die(str(e))
        return
    if sum(x is not None for x in (args.test_file, args.when2call, args.apibank)) > 1:
        die("give one of --test_file, --when2call, --apibank")
    if args.retrieve_k < 0:
        die(f"--retrieve_k is a number of tools (0 = all), got {args.retrieve_k}")
    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize, args.retrieve_k)
    except (CheckpointError, ValueError) as e:
        die(str(e))
    data_dir = args.data_dir or router.ckpt["data_dir"]
    test_file = args.when2call or args.apibank or args.test_file or os.path.join(data_dir, "test.jsonl")
    if not os.path.isfile(test_file):
        die(f"{test_file}: no such test file")
    skipped = Counter()
    try:
        if args.when2call:
            items, skipped = load_when2call(test_file)
        elif args.apibank:
            items, skipped = load_apibank(test_file, args.apibank_request)
        else:
            items = load_items(test_file)
    except ValueError as e:
        die(str(e))
    if args.limit:
        items = items[:args.limit]
    if not items:
        die(f"{test_file}: no items")

    for ex in items:
        if ex["tools"] is None:
            if router.catalogue is None:
                die(f"{test_file}: items without tools need a model with a compiled catalogue")
            ex["tools"] = router.catalogue
    rows, preds = [], []
    for ex in tqdm(items, desc="eval", unit="item", mininterval=1 if sys.stderr.isatty() else 15):
        try:
            pred = router.answer(ex["tools"], ex["request"], args.max_new_tokens, not args.no_constrain)
        except ValueError as e:   # prompt longer than the context: counted, not truncated
            pred = {"calls": [], "reason": None, "valid": False, "error": f"unparseable: {e}",
                    "text": "", "tokens": 0, "latency_ms": 0.0, "too_long": True,
                    "confidence": None, "truncated": False}
        pred["too_long"] = pred.get("too_long", False)
        out = score_item(pred, ex["calls"], ex.get("reason"))
        rows.append((ex, out, pred["latency_ms"]))
        preds.append({"request": ex["request"], "gold": ex["calls"], "gold_reason": ex.get("reason"),
                      "pred": pred["calls"], "pred_reason": pred["reason"], "text": pred["text"],
                      "error": pred["error"], "exact": out["exact"], "split": ex.get("split"),
                      "kind": ex.get("kind"), "decision": decision_of(pred),
                      "too_long": pred["too_long"], "confidence": pred["confidence"],
                      "truncated": pred["truncated"], "dead_end": pred.get("dead_end", False),
                      "n_tools": len(ex["tools"]), "domain": ex.get("domain"),
                      "retrieved": pred.get("retrieved"),
                      "error_class": classify_error(pred, ex["calls"], ex.get("reason"), ex["tools"])})

    groups = {}
    for g, keep in groups_for(items).items():
        sel = [r for r in rows if keep(r[0])]
        if sel:
            groups[g] = summarize(sel)
    print(f"\n{args.ckpt} on {test_file} ({len(items)} items)\n")
    print(format_table(groups))
    decisions = decision_report(rows, preds)
    if decisions:
        print(f"\ndecision (call / ask / decline) accuracy {decisions['accuracy']:.1%} on {decisions['n']} items; "
              + ", ".join(f"{g} {v:.1%}" for g, v in decisions["per_class"].items() if v is not None)
              + f"; prompts longer than the context: {decisions['too_long']}"
              + (f"; on the {decisions['n_fitting']} that fit: {decisions['accuracy_fitting']:.1%}"
                 if decisions["n_fitting"] else ""))
        for g, row in decisions["confusion"].items():
            print(f"  gold {g:17s} -> " + ", ".join(f"{p} {n}" for p, n in sorted(row.items())))
    for why, n in skipped.items():
        print(f"skipped {n} item{'s' * (n != 1)}: {why}")
    retrieval = retrieval_report(preds)
    if retrieval["cut"]:
        print(f"retrieval (--retrieve_k {args.retrieve_k}) cut the catalogue of {retrieval['cut']} items; "
              f"it dropped a gold tool on {retrieval['gold_dropped']} of them (counted as the model's errors)")
    bd = breakdowns(rows)
    print("\n" + format_breakdowns(bd))
    if "domain" not in bd:
        print("(no domain breakdown: these items carry no 'domain' field)")
    errors = error_report(preds)
    print("\n" + format_errors(errors))
    intent_slot = None
    if all("slots" in ex and "intent" in ex for ex in items):   # an intent/slot set (data.py --intent_slot)
        intent_slot = intent_slot_scores(items, preds)
        intent_slot["train_minutes"] = router.ckpt.get("train_seconds", 0.0) / 60
        print(f"\nintent/slot scores over all {intent_slot['n']} items (the published rows are the papers' own):")
        print(format_intent_slot(intent_slot, f"this model ({intent_slot['train_minutes']:.1f} min of training)"))
    scored = [p for p in preds if p["confidence"] is not None]
    calib = abstain = None
    if scored:
        confs, correct = [p["confidence"] for p in scored], [p["exact"] for p in scored]
        calib, abstain = calibration(confs, correct), abstention(confs, correct)
        print(f"\nconfidence: expected calibration error {calib['ece']:.3f} over {len(scored)} items "
              f"(exact match vs confidence, 10 bins)")
        print("  bin        n   confidence  accuracy")
        for b in calib["bins"]:
            print(f"  {b['lo']:.1f}-{b['hi']:.1f} {b['n']:5d} {100 * b['confidence']:10.1f}% {100 * b['accuracy']:8.1f}%")
        print("  abstain below: " + ", ".join(
            f"{r['threshold']:.1f} -> answers {100 * r['coverage']:.0f}% at {100 * r['accuracy']:.1f}% exact"
            for r in abstain if r["accuracy"] is not None))
        n_cut = sum(p["truncated"] for p in preds)
        if n_cut:
            print(f"  {n_cut} answers ran out of tokens and were cut back to their last complete point")
        n_dead = sum(p["dead_end"] for p in preds)
        if n_dead:
            print(f"  {n_dead} of them at a dead end of the grammar (no token allowed): a bug in grammar.py")

    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".",
                                   f"eval_{os.path.splitext(os.path.basename(test_file))[0]}.json")
    result = {"ckpt": args.ckpt, "test_file": test_file, "n_items": len(items), "groups": groups,
              "decisions": decisions, "skipped": dict(skipped), "constrained": not args.no_constrain,
              "quantize": args.quantize, "calibration": calib, "abstention": abstain,
              "truncated": sum(p["truncated"] for p in preds), "dead_ends": sum(p["dead_end"] for p in preds),
              "breakdowns": bd, "errors": errors,
              "apibank_request": args.apibank_request if args.apibank else None,
              "retrieve_k": router.retrieve_k if router.catalogue is None else None, "retrieval": retrieval}
    if intent_slot:
        result.update(intent_slot)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(out)[0] + "_predictions.jsonl", "w", encoding="utf-8") as f:
        for r in preds:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"\nwrote {out} and {os.path.splitext(out)[0]}_predictions.jsonl")


if __name__ == "__main__":
    main()
