"""
Training throughput per preset on this machine: tokens/s, achieved GFLOP/s, and
that as a fraction of what a plain fp32 matmul reaches in the same run.

    python utils/bench_throughput.py                                 # tiny, small, 26m: ~1-3 min on 2 CPU cores
    python utils/bench_throughput.py --presets tiny --steps 3        # a quick check, ~15 s
    python utils/bench_throughput.py --data_dir data/demo            # + padding of real batches, unpacked vs --pack
    python utils/bench_throughput.py --batch_tokens 8192 --steps 10  # bigger steps, longer timing

Prints a markdown table (one row per preset) to stdout; writes nothing.

One step is train.py's step on a random model of the preset in fp32: a batch of
--batch_tokens tokens as rows of block_size, each row packed with examples of
64-320 random tokens (the layout of train.py --pack: block-diagonal causal mask,
positions restarting at 0 per example), cross-entropy on the last quarter of each
example (its "answer"), forward, backward, gradient clipping, AdamW. The first
--warmup steps are not timed (allocation, kernel selection).

FLOPs per step, the usual estimate (Kaplan et al. 2020, sec. 2.1; PaLM, app. B):

    6 * N_body * tokens             every weight matrix but the embedding: per token
                                    2 FLOPs per weight forward (a multiply and an
                                    add), 4 backward (gradients of input and weight)
  + 6 * V * C * answer_tokens       the output projection (tied to the embedding),
                                    which train.py runs on answer positions only
  + 12 * n_layer * C * T * tokens   attention: scores Q K^T and the sum over V are
                                    2 * T * C FLOPs each per token per layer forward,
                                    x3 with backward; T is the full row, since the
                                    masked kernel computes all T x T scores, however
                                    few of them the mask keeps

Not counted: the embedding lookup, norms, softmax, RoPE, the optimizer (O(N)
per step, not per token). So this is the matmul work the hardware did, not
"useful" work: attention across masked-out examples is counted.

The reference is the best of --matmul_reps fp32 (n x n) @ (n x n) products
(2 n^3 FLOPs), measured just before each preset, so a machine that gets busier
during the run moves both numbers. docs/design.md records ~120-150 GFLOP/s for
this matmul on the 2-core box, and ~110 GFLOP/s training a 23.6M GPT.
"""

import argparse
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

import sys
# run from anywhere: the project's modules live one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, PRESETS, config_from_preset
from datadir import DataDirError, Split, load_meta, packed_layout, padding_fraction
from runtime import die
from train import answer_loss, make_optimizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,26m", help="comma-separated presets to measure")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per preset")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch_tokens", type=int, default=4096,
                   help="tokens per step, as rows of block_size (train.py's default batch of 16 "
                   "examples of ~250 tokens is ~4k tokens)")
    p.add_argument("--vocab_size", type=int, default=4096, help="vocabulary (from meta.json with --data_dir)")
    p.add_argument("--matmul_n", type=int, default=1024, help="size of the reference square matmul")
    p.add_argument("--matmul_reps", type=int, default=5)
    p.add_argument("--data_dir", default=None, help="also report padding of this data's training batches")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    for name in args.presets:
        if name not in PRESETS:
            p.error(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return args


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(n, reps, device):
    """Best of reps fp32 (n, n) @ (n, n) products, in GFLOP/s (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b   # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def packed_batch(rows, T, vocab, rng):
    """rows x T random tokens, each row filled with examples of 64-320 tokens (the
    last one cut to fit) -> x, y, m, Layout as train.Split.batch gives for --pack;
    m marks the last quarter of each example as its answer."""
    tokens = torch.from_numpy(rng.integers(8, vocab, (rows, T + 1)))
    pos = np.zeros((rows, T), dtype=np.int64)
    seg = np.zeros((rows, T), dtype=np.int64)
    prev = np.zeros((rows, T), dtype=np.int64)
    m = np.zeros((rows, T), dtype=np.float32)
    for b in range(rows):
        at, k = 0, 1
        while at < T:
            n = min(int(rng.integers(64, 321)), T - at)
            pos[b, at:at + n] = np.arange(n)
            seg[b, at:at + n] = k
            prev[b, at:at + n] = np.arange(at - 1, at + n - 1)
            prev[b, at] = -1                               # an example's first token has no predecessor
            m[b, at + n - max(1, n // 4):at + n] = 1.0
            at, k = at + n, k + 1
    layout = packed_layout(torch.from_numpy(pos), torch.from_numpy(seg), torch.from_numpy(prev))
    return tokens[:, :-1], tokens[:, 1:], torch.from_numpy(m), layout


def step_flops(model, tokens, answer_tokens, T):
    """The estimate in the docstring, for one step."""
    c = model.config
    embed = model.embed.weight.numel()                          # V * C, tied with the output projection
    body = sum(p.numel() for p in model.parameters() if p.dim() == 2) - embed
    return 6 * body * tokens + 6 * embed * answer_tokens + 12 * c.n_layer * c.n_embd * T * tokens


def measure(name, args, rng):
    config = config_from_preset(name, vocab_size=args.vocab_size)
    T = config.block_size
    rows = max(1, args.batch_tokens // T)
    torch.manual_seed(args.seed)
    model = GPT(config).to(args.device).train()
    opt = make_optimizer(model, SimpleNamespace(lr=1e-3, weight_decay=0.1, beta2=0.95), args.device)
    x, y, m, layout = packed_batch(rows, T, config.vocab_size, rng)
    x, y, m = x.to(args.device), y.to(args.device), m.to(args.device)
    layout = type(layout)(*(t.to(args.device) for t in layout))
    peak = matmul_gflops(args.matmul_n, args.matmul_reps, args.device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(args.device)
        t = time.perf_counter()
        loss = answer_loss(model, x, y, m, layout)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    dt = sum(times) / len(times)
    gflops = step_flops(model, x.numel(), int(m.sum()), T) / dt / 1e9
    return dict(preset=name, params=model.num_params(), rows=rows, T=T, dt=dt, tps=x.numel() / dt,
                gflops=gflops, peak=peak, loss=loss.item())


def report_padding(args, block_sizes):
    """Padding of real training batches (16 examples, as train.py's default), one
    example per row vs packed, with and without train.py's length_window."""
    for T in sorted(block_sizes):
        plain = Split(args.data_dir, "train", T)
        packed = Split(args.data_dir, "train", T, pack=True, seed=args.seed)
        rows = max(1, round(16 * len(packed) / packed.n_examples))
        parts = []
        for window in (256, 0):
            parts.append(f"length_window {window}: {padding_fraction(plain, 16, window, 1337):.1%} one example "
                         f"per row -> {padding_fraction(packed, rows, window, 1337):.1%} packed")
        print(f"padding of {args.data_dir} batches, block_size {T} ({packed.n_examples / len(packed):.2f} "
              f"examples per packed row): " + "; ".join(parts))


def main(argv=None):
    args = parse_args(argv)
    if args.data_dir:
        try:
            args.vocab_size = load_meta(args.data_dir)["vocab_size"]
        except DataDirError as e:
            die(str(e))
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, fp32; "
          f"{args.steps} timed steps after {args.warmup} warm-up, ~{args.batch_tokens} tokens per step, "
          f"vocab {args.vocab_size}; matmul reference {args.matmul_n}^2, best of {args.matmul_reps}")
    print()
    print("| preset | params | batch (rows x T) | s/step | tokens/s | GFLOP/s | matmul GFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for name in args.presets:
        r = measure(name, args, rng)
        assert np.isfinite(r["loss"]), f"{name}: non-finite loss"
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['rows']} x {r['T']} | {r['dt']:.2f} | "
              f"{r['tps']:,.0f} | {r['gflops']:.1f} | {r['peak']:.1f} | {r['gflops'] / r['peak']:.0%} |", flush=True)
    if args.data_dir:
        print()
        report_padding(args, {config_from_preset(n).block_size for n in args.presets})


if __name__ == "__main__":
    main()
