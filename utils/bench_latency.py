"""
Latency benchmark of one routed request, speed-up by speed-up, per preset.

    python utils/bench_latency.py                                  # tiny, small, 26m; ~10 min on a 2-core CPU
    python utils/bench_latency.py --presets 26m --n_requests 30 --out out/bench/latency.json

Random weights are fine for timing, but a random model would write anything, so
each request follows a fixed typical answer: at every free choice the decoder
takes the allowed token that continues the expected answer instead of the
argmax (same forward passes, same masks, same work). The catalogue is the
5 tools of examples/tools.json; the requests are single calls.

Rows, each adding one thing to the one above:
    a  no KV cache     every step re-runs the whole sequence
    b  KV cache        the prompt runs once, then one token per forward pass
    c  forced spans    tokens the grammar fixes are fed in the same pass as the one before
    d  prefix cache    the catalogue's KV cache is kept between requests
    d2 copy spec.      (fp32) the request's tokens after the last one are guessed, verified in the same pass
    e  int8            d with dynamic int8 linear layers
    f  int8 + spec.    everything on

The floor: a decode pass must read every weight once, so
    floor = passes x weight bytes / memory bandwidth + request tokens x 2 x params / matmul rate
with the bandwidth (a large tensor copy) and the fp32 matmul rate measured in the same run.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

# run from anywhere: the project's modules live one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wire
from datadir import DataDirError, load_meta
from runtime import die
from model import GPT, config_from_preset, config_dict
from sample import Router

REQUESTS = [   # request, expected answer
    ("Where's my order ORD-1234?", [{"name": "track_order", "arguments": {"order_id": "ORD-1234"}}]),
    ("what's the weather like in Lisbon", [{"name": "get_current_weather", "arguments": {"city": "Lisbon"}}]),
    ("set a timer for 12 minutes", [{"name": "set_timer", "arguments": {"minutes": 12}}]),
    ("text Maria that I'm running late",
     [{"name": "send_text_message", "arguments": {"recipient": "Maria", "message": "I'm running late"}}]),
    ("play Yellow by Coldplay", [{"name": "play_song", "arguments": {"song": "Yellow", "artist": "Coldplay"}}]),
]

VARIANTS = {   # the int8 rows use the int8 model
    "a no KV cache": dict(use_cache=False, forced_spans=False, prefix_cache=False, speculate=False),
    "b KV cache": dict(use_cache=True, forced_spans=False, prefix_cache=False, speculate=False),
    "c + forced spans": dict(use_cache=True, forced_spans=True, prefix_cache=False, speculate=False),
    "d + prefix cache": dict(use_cache=True, forced_spans=True, prefix_cache=True, speculate=False),
    "d2 + copy spec.": dict(use_cache=True, forced_spans=True, prefix_cache=True, speculate=True),
    "e + int8": dict(use_cache=True, forced_spans=True, prefix_cache=True, speculate=False),
    "f int8 + spec.": dict(use_cache=True, forced_spans=True, prefix_cache=True, speculate=True),
}


def follow(router, target_text):
    """A choice rule (Router.choose, in place of the argmax) that writes
    target_text: of the allowed tokens, the one covering the longest piece of
    what is still to come (a walk down the vocabulary trie, so choosing costs
    next to nothing) -> its index in allowed."""
    target = target_text.encode()
    vocab = router.vocab

    def index(allowed, t):
        return int((allowed == t).nonzero()[0])

    def choose(scores, allowed, out):
        done = b"".join(s.encode() if isinstance(s, str) else bytes([s])
                        for t in out for s in vocab.symbols(t))
        rest = target[len(done):]
        for sym, i in vocab.special_id.items():
            if rest.startswith(sym.encode()) and bool((allowed == i).any()):
                return index(allowed, i)
        candidates, node = [], vocab.root
        for b in rest:
            node = node.children.get(b)
            if node is None:
                break
            candidates += node.ids
        for t in reversed(candidates):              # longest first
            if bool((allowed == t).any()):
                return index(allowed, t)
        return 0
    return choose


def measure_bandwidth(mb=256, reps=5):
    """GB/s of a large tensor copy (read + write), the best of a few."""
    x = torch.empty(mb * (1 << 20) // 4, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best / 1e9


def measure_matmul(n=1024, reps=10):
    """GFLOP/s of an fp32 n x n matmul, the best of a few."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def make_checkpoint(preset, data_dir, path):
    meta = load_meta(data_dir)
    torch.manual_seed(0)
    config = config_from_preset(preset, vocab_size=meta["vocab_size"])
    model = GPT(config)
    torch.save({"model": model.state_dict(), "model_config": config_dict(config), "step": 0,
                "data_dir": data_dir, "tokenizer_sha256": meta["tokenizer_sha256"]}, path)
    return model.num_params()


def weight_bytes(model):
    """Bytes a forward pass reads: fp32 parameters, int8 packed linear weights."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            n += m.weight().numel()   # one byte per weight
    return n


def run_variant(router, tools, kw, n_requests, warmup=2):
    """-> latencies (ms), forward passes, tokens, all answers right."""
    lat, passes, ntok, ok = [], [], [], True
    for i in range(warmup + n_requests):
        request, calls = REQUESTS[i % len(REQUESTS)]
        target = wire.render_answer(calls)
        router.choose = follow(router, target)
        t0 = time.perf_counter()
        ids, info = router.generate_constrained(tools, request, 64, **kw)
        text = router.sp.decode(ids)
        parsed = wire.parse_answer(text, tools)
        err = wire.validate_answer(parsed, tools)
        ms = 1000 * (time.perf_counter() - t0)
        ok &= err is None and text == target
        if i >= warmup:
            lat.append(ms)
            passes.append(info["passes"])
            ntok.append(len(ids))
    return lat, passes, ntok, ok


@torch.no_grad()   # timing only; a caller in the same process keeps its autograd
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,26m")
    p.add_argument("--data_dir", default="data/demo", help="tokenizer and vocab size (python data.py makes it)")
    p.add_argument("--n_requests", type=int, default=20, help="timed requests per row (after 2 warm-up)")
    p.add_argument("--n_requests_nocache", type=int, default=5, help="row a is slow: fewer requests")
    p.add_argument("--out", default="out/bench/latency.json")
    args = p.parse_args(argv)
    try:
        load_meta(args.data_dir)
    except DataDirError as e:
        die(f"{e} (the benchmark needs its tokenizer)")
    tools = wire.load_tools(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tools.json"))

    bw, mm = measure_bandwidth(), measure_matmul()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"copy bandwidth {bw:.1f} GB/s; fp32 matmul {mm:.1f} GFLOP/s")
    results = {"machine": {"threads": torch.get_num_threads(), "bandwidth_gbs": bw, "matmul_gflops": mm,
                           "torch": torch.__version__}, "presets": {}}
    tmp = tempfile.mkdtemp()
    for preset in args.presets.split(","):
        ckpt = os.path.join(tmp, f"{preset}.pt")
        n_params = make_checkpoint(preset, args.data_dir, ckpt)
        routers = {"fp32": Router(ckpt, args.data_dir), "int8": Router(ckpt, args.data_dir, quantize="int8")}
        prompt_len = len(routers["fp32"].encode_prompt(tools, REQUESTS[0][0]))
        n_request_tok = len(routers["fp32"].sp.encode(REQUESTS[0][0]))
        rows = {}
        print(f"\n{preset}: {n_params / 1e6:.1f}M parameters; prompt {prompt_len} tokens "
              f"({len(tools)} tools), answers of {len(routers['fp32'].sp.encode(wire.render_answer(REQUESTS[0][1])))}"
              f"-{max(len(routers['fp32'].sp.encode(wire.render_answer(c))) for _, c in REQUESTS)} tokens")
        print(f"  {'row':18s} {'p50 ms':>8s} {'p95 ms':>8s} {'passes':>7s} {'floor ms':>9s}  right")
        for name, kw in VARIANTS.items():
            router = routers["int8" if "int8" in name else "fp32"]
            n = args.n_requests_nocache if name.startswith("a") else args.n_requests
            lat, passes, ntok, ok = run_variant(router, tools, kw, n)
            wb = weight_bytes(router.model)
            # prefill work: the whole prompt, or only the request with the prefix cache
            prefill_tok = n_request_tok if kw["prefix_cache"] else prompt_len
            floor = np.mean(passes) * wb / (bw * 1e9) * 1000 + prefill_tok * 2 * n_params / (mm * 1e9) * 1000
            rows[name] = {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                          "passes": float(np.mean(passes)), "tokens": float(np.mean(ntok)),
                          "floor_ms": float(floor), "weight_mb": wb / 1e6, "all_right": ok, "n": n}
            r = rows[name]
            print(f"  {name:18s} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['passes']:7.1f} {floor:9.1f}  {ok}")
        results["presets"][preset] = {"params": n_params, "prompt_tokens": prompt_len, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
