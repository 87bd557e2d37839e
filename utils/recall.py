"""
The retriever alone (retrieve.py): how often it keeps the tools the gold answer calls.

    python utils/recall.py --jsonl data/general/val.jsonl --variants --pooled          # choose a variant
    python utils/recall.py --jsonl data/general/test.jsonl --pooled \
        --apibank evaldata/apibank/level-1-api.json \
        --when2call evaldata/when2call/when2call_test_llm_judge.jsonl --out out/recall.json  # report

For each set (our items by their split: seen / unseen tools; API-Bank level-1;
When2Call) and each k in --k, over the items with at least one gold call:
    recall      share of gold calls whose tool is among the k tools kept
    all_kept    share of items with every gold tool kept
    cut         items whose catalogue is longer than k (the others keep every
                tool, so their recall is 1 by construction), and the recall
                over the calls of those items alone
Items without a gold call (no-call items, When2Call's request_for_info and
cannot_answer) have nothing to recall and are skipped, and counted.

--pooled also scores every request against the union of its set's tools (one
catalogue of every distinct tool name in the set): a long catalogue, as an app
with many tools would send. --variants scores each retriever variant (VARIANTS:
fields indexed, the plural stemmer, BM25's k1 and b) instead of retrieve.py's
default alone; choose on our validation split, then report the external sets
once (they are for evaluation only: never tune on them). Runs in seconds.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
import retrieve  # noqa: E402
from datadir import read_jsonl  # noqa: E402
from evalsets import load_apibank, load_when2call  # noqa: E402
from runtime import die  # noqa: E402

F = retrieve.FIELDS


def plural_s(text):
    """retrieve.words with the tiniest stemmer: orders -> order, entries -> entry
    (not address, status, bus). Measured as a variant; it did not win."""
    return [w[:-3] + "y" if len(w) > 4 and w.endswith("ies") else
            w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")) else w
            for w in retrieve.words(text)]


VARIANTS = {      # name -> retrieve.Index keyword arguments; "chosen" is retrieve.py's default
    "chosen": {},
    "first: stemmed, no enums/stoplist": dict(fields=F[:4], stop=(), split=plural_s),
    "- enum values": dict(fields=F[:4]),
    "- parameter descriptions": dict(fields=("name", "description", "param_names", "enums")),
    "name + description only": dict(fields=("name", "description")),
    "- stopwords": dict(stop=()),
    "+ plural stemmer": dict(split=plural_s),
    "name counted twice": dict(fields=("name",) + F),
    "k1 0.9, b 0.4": dict(k1=0.9, b=0.4),
    "k1 1.5, b 0.9": dict(k1=1.5, b=0.9),
    "k1 2.0, b 0.75": dict(k1=2.0),
    "b 0 (no length normalization)": dict(b=0.0),
}


def load_sets(args):
    """-> [(set name, items with tools, request, calls)]; ours split by their "split" field."""
    sets = []
    for path in args.jsonl or []:
        items = read_jsonl(path)
        for split in sorted({ex.get("split", "all") for ex in items}):
            sets.append((f"{os.path.basename(path)} {split}", [ex for ex in items if ex.get("split", "all") == split]))
    if args.apibank:
        sets.append(("API-Bank level-1", load_apibank(args.apibank)[0]))
    if args.when2call:
        sets.append(("When2Call", load_when2call(args.when2call)[0]))
    return sets


def pool(items):
    """Every distinct tool of a set (the first definition of each name), as one catalogue."""
    seen = {}
    for ex in items:
        for t in ex["tools"]:
            seen.setdefault(t["name"], t)
    return list(seen.values())


def recall(items, ks, kw, pooled=None):
    """Recall of the gold tools at each k -> {k: {recall, all_kept, cut, recall_cut, calls}};
    pooled: one catalogue every request is scored against instead of its own."""
    index = retrieve.Index(pooled, **kw) if pooled else None
    out = {}
    for k in ks:
        calls = kept = items_all = cut = cut_calls = cut_kept = 0
        for ex in items:
            idx = index or retrieve.Index(ex["tools"], **kw)
            names = {t["name"] for t in idx.top_k(ex["request"], k)}
            hits = [c["name"] in names for c in ex["calls"]]
            calls, kept, items_all = calls + len(hits), kept + sum(hits), items_all + all(hits)
            if len(idx.tools) > k:
                cut, cut_calls, cut_kept = cut + 1, cut_calls + len(hits), cut_kept + sum(hits)
        out[k] = {"recall": kept / calls, "all_kept": items_all / len(items), "calls": calls,
                  "cut": cut, "recall_cut": cut_kept / cut_calls if cut_calls else None}
    return out


def pct(v):
    return "    -" if v is None else f"{100 * v:5.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl", nargs="*", default=None, help="our items (data.py's val.jsonl / test.jsonl)")
    p.add_argument("--apibank", default=None, metavar="JSON", help="API-Bank level-1 (level-1-api.json)")
    p.add_argument("--when2call", default=None, metavar="JSONL", help="When2Call (when2call_test_llm_judge.jsonl)")
    p.add_argument("--k", default="3,5,8", help="comma-separated numbers of tools kept")
    p.add_argument("--pooled", action="store_true", help="also score each request against all of its set's tools")
    p.add_argument("--variants", action="store_true", help="score every variant in VARIANTS, not only the default")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    try:
        ks = [int(k) for k in args.k.split(",")]
        sets = load_sets(args)
    except (ValueError, OSError) as e:
        die(str(e))
    if not sets:
        die("give at least one of --jsonl, --apibank, --when2call")
    variants = VARIANTS if args.variants else {"chosen": {}}
    result = []
    print(f"{'set':28s} {'variant':34s} {'catalogue':>10s} {'items':>6s} {'calls':>6s} {'skipped':>7s}   "
          + "   ".join(f"recall@{k} all@{k}  cut@{k} (recall)" for k in ks))
    for name, items in sets:
        scored = [ex for ex in items if ex["calls"]]
        if not scored:
            print(f"{name}: no item with a gold call")
            continue
        for how, catalogue in [("own", None)] + ([("pooled", pool(items))] if args.pooled else []):
            for variant, kw in variants.items():
                r = recall(scored, ks, kw, catalogue)
                size = "own" if catalogue is None else f"{len(catalogue)} tools"
                print(f"{name:28s} {variant:34s} {size:>10s} {len(scored):6d} {r[ks[0]]['calls']:6d} "
                      f"{len(items) - len(scored):7d}   "
                      + "   ".join(f"   {pct(r[k]['recall'])} {pct(r[k]['all_kept'])} {r[k]['cut']:6d} ({pct(r[k]['recall_cut'])})"
                                  for k in ks))
                result.append({"set": name, "catalogue": how, "n_tools": len(catalogue) if catalogue else None,
                               "variant": variant, "items": len(scored),
                               "skipped_no_call": len(items) - len(scored), "at": r})
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
