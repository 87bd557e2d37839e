"""
Score a model on a test set: the four-number report and more.

    python eval.py --ckpt out/demo/best.pt                   # data dir's test.jsonl, ~1 min for the tiny model
    python eval.py --ckpt out/demo/best.pt --test_file my_set.jsonl --out my_eval.json
    python eval.py --ckpt out/demo/best.pt --no_constrain    # the raw model, without the answer grammar

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
plus latency p50/p95 per request. Prints a table, writes JSON (and one line per
item with the prediction, for error analysis). Constrained answers carry a
confidence: its calibration (accuracy per confidence bin, expected calibration
error) and the accuracy left when the model abstains below a threshold are
printed too.

External sets (evaluation only, never trained on):
    python eval.py --ckpt out/demo/best.pt --when2call ../shared/eval/when2call/when2call_test_llm_judge.jsonl

When2Call asks for a decision: call a tool, ask for missing information, or
decline. A call is "tool_call", a no-call whose reason is "missing argument" is
"request_for_info", any other no-call is "cannot_answer"; decision accuracy
compares that with the item's label, and exact call match is scored on its
tool_call items. Tools in its BFCL dialect are converted to JSON Schema
(imports.to_schema_tool); items that cannot be converted, and prompts longer
than the model's context, are counted and reported, not silently dropped.
"""

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

import wire
from imports import to_schema_tool
from model import CheckpointError
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
    return {"valid": pred["valid"], "parsed": parsed, "names_ok": names_ok, "exact": exact,
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
DECISIONS = ["tool_call", "request_for_info", "cannot_answer"]
for _d in DECISIONS:
    GROUPS[_d] = lambda ex, d=_d: ex.get("decision") == d


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
                ex["tools"] = wire.normalize_tools(ex["tools"])
                assert isinstance(ex["request"], str) and isinstance(ex["calls"], list)
            except (json.JSONDecodeError, KeyError, AssertionError, wire.ToolError) as e:
                raise ValueError(f"{path}:{n}: not a test item ({type(e).__name__}: {e})") from None
            items.append(ex)
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/demo/best.pt")
    p.add_argument("--data_dir", default=None, help="default: the checkpoint's")
    p.add_argument("--test_file", default=None, help="default: <data_dir>/test.jsonl")
    p.add_argument("--when2call", default=None, metavar="JSONL",
                   help="score the When2Call set (when2call_test_llm_judge.jsonl) instead")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items")
    p.add_argument("--out", default=None, help="result JSON (default: next to the checkpoint)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_constrain", action="store_true", help="score the raw model, without the answer grammar")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    args = p.parse_args(argv)

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize)
    except (CheckpointError, ValueError) as e:
        die(str(e))
    data_dir = args.data_dir or router.ckpt["data_dir"]
    test_file = args.when2call or args.test_file or os.path.join(data_dir, "test.jsonl")
    if not os.path.isfile(test_file):
        die(f"{test_file}: no such test file")
    skipped = Counter()
    try:
        items, skipped = load_when2call(test_file) if args.when2call else (load_items(test_file), skipped)
    except ValueError as e:
        die(str(e))
    if args.limit:
        items = items[:args.limit]
    if not items:
        die(f"{test_file}: no items")

    rows, preds = [], []
    for ex in tqdm(items, desc="eval", unit="item", mininterval=1 if sys.stderr.isatty() else 15):
        try:
            pred = router.answer(ex["tools"], ex["request"], args.max_new_tokens, not args.no_constrain)
        except ValueError as e:   # prompt longer than the context: counted, not truncated
            pred = {"calls": [], "reason": None, "valid": False, "error": f"unparseable: {e}",
                    "text": "", "tokens": 0, "latency_ms": 0.0, "too_long": True,
                    "confidence": None, "truncated": False}
        out = score_item(pred, ex["calls"], ex.get("reason"))
        rows.append((ex, out, pred["latency_ms"]))
        preds.append({"request": ex["request"], "gold": ex["calls"], "gold_reason": ex.get("reason"),
                      "pred": pred["calls"], "pred_reason": pred["reason"], "text": pred["text"],
                      "error": pred["error"], "exact": out["exact"], "split": ex.get("split"),
                      "kind": ex.get("kind"), "decision": decision_of(pred),
                      "too_long": pred.get("too_long", False), "confidence": pred["confidence"],
                      "truncated": pred["truncated"]})

    groups = {}
    for g, keep in GROUPS.items():
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

    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".",
                                   f"eval_{os.path.splitext(os.path.basename(test_file))[0]}.json")
    result = {"ckpt": args.ckpt, "test_file": test_file, "n_items": len(items), "groups": groups,
              "decisions": decisions, "skipped": dict(skipped), "constrained": not args.no_constrain,
              "quantize": args.quantize, "calibration": calib, "abstention": abstain,
              "truncated": sum(p["truncated"] for p in preds)}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(out)[0] + "_predictions.jsonl", "w", encoding="utf-8") as f:
        for r in preds:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"\nwrote {out} and {os.path.splitext(out)[0]}_predictions.jsonl")


if __name__ == "__main__":
    main()
