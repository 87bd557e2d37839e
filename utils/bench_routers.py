"""
Latency of trained routers side by side, in one run: each answers the same kind of
request one at a time (batch 1, constrained decoding, as serve.py does), and the
table gives p50 / p95 / mean per model, with how many answers came from the aux
heads' single pass.

    python utils/bench_routers.py --model atis=out/atis/best.pt:data/atis/test.jsonl \
        --model demo=out/demo/best.pt:data/demo/test.jsonl --n 300
    python utils/bench_routers.py --model general=out/general/best.pt:data/demo_general/test.jsonl --threads 1

Each --model is NAME=CKPT:TEST_JSONL: the model and the requests it answers (the
items' own tools, or a compiled model's catalogue for items without tools). The
first 10 requests of each model are a warm-up (grammar memos, allocations) and not
timed. --threads sets torch's intra-op threads (batch-1 decoding is mostly
per-operation overhead: one thread is often faster than two). Writes --out (JSON).
"""

import argparse
import json
import os
import statistics
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


@torch.no_grad()   # timing only; a caller in the same process keeps its autograd
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=parse_model, action="append", required=True, metavar="NAME=CKPT:TEST")
    p.add_argument("--n", type=int, default=300, help="timed requests per model")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default="out/bench/routers.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    for name, ckpt, test in args.model:
        if not os.path.isfile(test):
            die(f"{test}: no such test file")
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
