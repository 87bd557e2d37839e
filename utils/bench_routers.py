"""
Latency of trained routers side by side, in one run: each answers the same kind of
request one at a time (batch 1, constrained decoding, as serve.py does), and the
table gives p50 / p95 / mean per model, with how many answers came from the aux
heads' single pass.

    python utils/bench_routers.py --model atis=out/atis/best.pt:data/atis/test.jsonl \
        --model demo=out/demo/best.pt:data/demo/test.jsonl --n 300
    python utils/bench_routers.py --model general=out/general/best.pt:data/demo_general/test.jsonl --threads 1
    git worktree add out/before <commit> && python utils/bench_routers.py --model demo=out/demo/best.pt:data/demo/test.jsonl \
        --before out/before --threads 1        # this code and that checkout's, request by request

Each --model is NAME=CKPT:TEST_JSONL: the model and the requests it answers (the
items' own tools, or a compiled model's catalogue for items without tools). The
first 10 requests of each model are a warm-up (grammar memos, allocations) and not
timed. --threads sets torch's intra-op threads (batch-1 decoding is mostly
per-operation overhead: one thread is often faster than two). Writes --out (JSON).

--before DIR: another checkout of this project (an older commit) is timed too, side
by side in the same run: each code answers in a process of its own, and every item
goes to both in turn (alternating which goes first), so both see the same machine
load. The table then has a before and an after row per model, and how many answers
were the same, token for token.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere
import wire  # noqa: E402
from datadir import read_jsonl  # noqa: E402
from model import CheckpointError  # noqa: E402
from runtime import die  # noqa: E402
from sample import Router  # noqa: E402


def parse_model(text):
    name, _, rest = text.partition("=")
    ckpt, _, test = rest.rpartition(":")
    if not (name and ckpt and test):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CKPT:TEST_JSONL")
    return name, ckpt, test


def bench(router, items, n, warmup=10):
    """Answer warmup + n items one at a time -> timings of the n (ms) and how many
    the heads answered in one pass."""
    times, heads = [], 0
    for i, ex in enumerate(items[:warmup + n]):
        tools = wire.normalize_tools(ex["tools"]) if "tools" in ex else None
        t0 = time.perf_counter()
        ids, info = router.generate_constrained(tools, ex["request"], 128)
        dt = 1000 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(dt)
            heads += info["passes"] == 1
    return times, heads


# a process answering items of one test file with one code tree's Router: reads item
# numbers, writes {ms, passes, ids} per item
WORKER = """
import json, sys, time
tree, ckpt, test, threads = sys.argv[1:5]
sys.path.insert(0, tree)
import torch, wire
from datadir import read_jsonl
from sample import Router
if int(threads):
    torch.set_num_threads(int(threads))
router, items = Router(ckpt), read_jsonl(test)
print("ready", flush=True)
for line in sys.stdin:
    ex = items[int(line)]
    tools = wire.normalize_tools(ex["tools"]) if "tools" in ex else None
    t0 = time.perf_counter()
    with torch.no_grad():
        ids, info = router.generate_constrained(tools, ex["request"], 128)
    print(json.dumps({"ms": 1000 * (time.perf_counter() - t0), "passes": info["passes"], "ids": ids}), flush=True)
"""


def side_by_side(trees, ckpt, test, n, threads, warmup=10):
    """Each item to a worker per code tree in turn -> ({tree: (timings of the n, heads
    answered)}, how many of the warmup + n answers were the same in all trees)."""
    workers = {}
    for name, tree in trees.items():
        w = subprocess.Popen([sys.executable, "-c", WORKER, tree, ckpt, test, str(threads)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if w.stdout.readline().strip() != "ready":
            die(f"{tree}: the router did not load {ckpt} (see the error above)")
        workers[name] = w
    out, same = {name: ([], 0) for name in trees}, 0
    n_items = min(warmup + n, len(read_jsonl(test)))
    for i in range(n_items):
        answers = {}
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            workers[name].stdin.write(f"{i}\n")
            workers[name].stdin.flush()
            answers[name] = json.loads(workers[name].stdout.readline())
        same += len({tuple(a["ids"]) for a in answers.values()}) == 1
        if i >= warmup:
            for name, a in answers.items():
                times, heads = out[name]
                times.append(a["ms"])
                out[name] = (times, heads + (a["passes"] == 1))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    return out, same, n_items


def row(times, heads, **extra):
    times = sorted(times)
    return {"n": len(times), "p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "mean_ms": statistics.mean(times), "heads_share": heads / max(1, len(times)), **extra}


@torch.no_grad()   # timing only; a caller in the same process keeps its autograd
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=parse_model, action="append", required=True, metavar="NAME=CKPT:TEST")
    p.add_argument("--n", type=int, default=300, help="timed requests per model")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default="out/bench/routers.json")
    p.add_argument("--before", default=None, metavar="DIR",
                   help="another checkout of this project, timed side by side with this one")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    for name, ckpt, test in args.model:
        if not os.path.isfile(test):
            die(f"{test}: no such test file")
        if args.before:
            if not os.path.isfile(os.path.join(args.before, "sample.py")):
                die(f"{args.before}: not a checkout of this project (no sample.py)")
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            trees = {"before": os.path.abspath(args.before), "after": here}
            out, same, n_items = side_by_side(trees, os.path.abspath(ckpt), os.path.abspath(test), args.n, args.threads)
            for side, (times, heads) in out.items():
                rows[f"{name} {side}"] = r = row(times, heads, ckpt=ckpt, test=test, code=trees[side])
                print(f"{name + ' ' + side:18s} n {r['n']:4d}  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
                      f"mean {r['mean_ms']:7.1f} ms  heads answered {r['heads_share']:.0%}", flush=True)
            print(f"{name:18s} the same answer before and after: {same} of {n_items}", flush=True)
            rows[f"{name} after"]["same_answers"] = f"{same}/{n_items}"
            continue
        try:
            router = Router(ckpt)
        except (CheckpointError, ValueError) as e:
            die(str(e))
        times, heads = bench(router, read_jsonl(test), args.n)
        times.sort()
        rows[name] = {"ckpt": ckpt, "test": test, "n": len(times), "p50_ms": statistics.median(times),
                      "p95_ms": times[int(0.95 * (len(times) - 1))], "mean_ms": statistics.mean(times),
                      "heads_share": heads / max(1, len(times)), "compiled": router.catalogue is not None,
                      "params_M": router.model.num_params() / 1e6}
        r = rows[name]
        print(f"{name:12s} n {r['n']:4d}  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
              f"mean {r['mean_ms']:7.1f} ms  heads answered {r['heads_share']:.0%}  "
              f"({'compiled' if r['compiled'] else 'catalogue in the prompt'}, {r['params_M']:.2f}M)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"threads": torch.get_num_threads(), "models": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
