"""
Accuracy against training compute: read finished ablation runs, fit a trend, and
say what it predicts for a bigger budget.

    python utils/compute_curve.py out/ablate/compute_tiny_3m out/ablate/compute_tiny_9m \\
        out/ablate/compute_tiny_27m --metric unseen_exact \\
        --predict_tflops 400 --predict_hours 4 --out docs/compute_curve.png

Each folder is a utils/ablate.py output (<variant>-s<seed>/ with result.json and
best.pt). A run's compute is 6 x parameters x the tokens it trained on up to its
best.pt (train.py stores train_tokens in the checkpoint), the usual estimate of a
forward and backward pass. The trend is a power law in the error: log10(1 - acc)
= a + b * log10(FLOPs), fitted by least squares over every run. It says nothing of
model size on its own (a bigger model at the same FLOPs is one point on the same
line), so a prediction far beyond the measured range is a guess with a formula,
and printed as one. --predict_tflops T --predict_hours H: the FLOPs of H hours at T
sustained TFLOP/s (e.g. 40% of a 1,000 TFLOP/s bf16 GPU = 400).

Prints one line per run and the fit; --out also draws the points, the line and the
prediction (matplotlib, no display needed).
"""

import argparse
import glob
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from anywhere: the project's modules live one folder up
from runtime import die  # noqa: E402


def read_runs(folders, metric):
    """-> [{run, params, tokens, flops, minutes, acc}] of every finished run."""
    import torch
    from model import GPT, config_from_dict
    runs = []
    for folder in folders:
        results = sorted(glob.glob(os.path.join(folder, "*", "result.json")))
        if not results:
            die(f"{folder}: no finished run in it (no <variant>-s<seed>/result.json); is it a utils/ablate.py output?")
        for path in results:
            run = os.path.dirname(path)
            with open(path) as f:
                row = json.load(f)
            if row.get(metric) is None:
                die(f"{path}: no {metric!r} in it (these runs report {sorted(k for k, v in row.items() if v is not None)})")
            ckpt_path = os.path.join(run, "best.pt")
            if not os.path.isfile(ckpt_path):
                die(f"{run}: no best.pt (the compute comes from the checkpoint)")
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if not ckpt.get("train_tokens"):
                die(f"{ckpt_path}: trained before checkpoints recorded their tokens (train_tokens); train it again")
            with torch.device("meta"):    # the parameter count without allocating the weights
                params = GPT(config_from_dict(ckpt["model_config"])).num_params()
            runs.append({"run": os.path.relpath(run), "params": params, "tokens": ckpt["train_tokens"],
                         "flops": 6 * params * ckpt["train_tokens"], "minutes": row.get("minutes"),
                         "acc": row[metric]})
    return runs


def fit(runs):
    """Least squares of log10(1 - acc) on log10(FLOPs) -> (a, b)."""
    pts = [(math.log10(r["flops"]), math.log10(max(1 - r["acc"], 1e-6))) for r in runs]
    if len({x for x, _ in pts}) < 2:
        die("a trend needs runs at two different budgets at least")
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - b * mx, b


def predict(a, b, flops):
    return 1 - 10 ** (a + b * math.log10(flops))


def draw(runs, a, b, metric, out, target=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["flops"] for r in runs]
    ax.scatter(xs, [100 * r["acc"] for r in runs], label="runs")
    hi = max(xs + ([target] if target else []))
    line = [min(xs) * 10 ** (i / 20 * math.log10(hi / min(xs))) for i in range(21)]
    ax.plot(line, [100 * predict(a, b, x) for x in line], "--", label=f"fit: 1 - acc = 10^{a:.2f} FLOPs^{b:.3f}")
    if target:
        ax.scatter([target], [100 * predict(a, b, target)], marker="*", s=120, label="prediction")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6 x parameters x tokens)")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="utils/ablate.py output folders")
    p.add_argument("--metric", default="unseen_exact", help="a key of the runs' result.json (default unseen_exact)")
    p.add_argument("--predict_tflops", type=float, default=0, help="sustained TFLOP/s of the predicted run")
    p.add_argument("--predict_hours", type=float, default=0, help="hours of the predicted run")
    p.add_argument("--out", default=None, help="a PNG of the points, the fit and the prediction")
    args = p.parse_args(argv)
    if (args.predict_tflops > 0) != (args.predict_hours > 0):
        die("--predict_tflops and --predict_hours go together")
    runs = read_runs(args.folders, args.metric)
    for r in sorted(runs, key=lambda r: r["flops"]):
        print(f"{r['run']}: {r['params'] / 1e6:.2f}M parameters x {r['tokens']:,} tokens = {r['flops']:.2e} FLOPs"
              f" -> {args.metric} {100 * r['acc']:.1f}%")
    a, b = fit(runs)
    print(f"fit over {len(runs)} runs: log10(1 - {args.metric}) = {a:.3f} + {b:.4f} log10(FLOPs)")
    target = args.predict_tflops * 1e12 * args.predict_hours * 3600 if args.predict_hours else None
    if target:
        print(f"prediction: {args.predict_hours:g} h at {args.predict_tflops:g} TFLOP/s = {target:.2e} FLOPs "
              f"-> {args.metric} {100 * predict(a, b, target):.1f}% "
              f"({math.log10(target / max(r['flops'] for r in runs)):.1f} decades past the largest run: a guess)")
    if args.out:
        draw(runs, a, b, args.metric, args.out, target)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
