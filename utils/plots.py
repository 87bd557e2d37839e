"""
Pictures of a run: training curves, accuracy by catalogue size, calibration.

    python utils/plots.py --log out/demo/log.txt --eval out/demo/eval_test.json --out_dir out/demo/plots
    python utils/plots.py --log out/a/log.txt out/b/log.txt --out_dir out/plots     # two runs on one chart
    python utils/plots.py --pipeline docs/pipeline.png                              # the README's picture

Writes PNGs into --out_dir (matplotlib, no display needed):
    loss.png         train loss (every logged step) and val loss (each evaluation)
                     against the step, from train.py's / distill.py's log.txt
    by_n_tools.png   exact match and tool-name accuracy per number of tools in the
                     catalogue, from an eval.py result JSON (its "breakdowns")
    calibration.png  reliability diagram from the same JSON's "calibration" bins:
                     accuracy against mean confidence per bin, the diagonal a
                     perfectly calibrated model would sit on, and the items per bin
    pipeline.png     (--pipeline PATH) the project's pipeline, script by script, with
                     one request and its answer in the wire format; needs no run
An input that is missing or lacks what a plot needs is reported in one line and
that plot is skipped; the others are still drawn.
"""

import argparse
import json
import os
import re
import sys

import matplotlib
matplotlib.use("Agg")   # files only: works on a server without a display
import matplotlib.pyplot as plt   # noqa: E402  (must come after the backend is chosen)

# The two line shapes train.py's Logger writes (distill.py adds kl/ce fields after loss):
#   step 40 | loss 4.3012 | lr 2.00e-03 | dt 476ms | ...
#   val step 200 | val_loss 0.7012 | best 0.7012
TRAIN_LINE = re.compile(r"^step (\d+) \| loss ([-+0-9.eE]+|nan|inf)")
VAL_LINE = re.compile(r"^val step (\d+) \| val_loss ([-+0-9.eE]+|nan|inf)")


def read_log(path):
    """log.txt -> (train [(step, loss)], val [(step, val_loss)]), sorted by step.
    A resumed run appends to the log and repeats the steps after its last
    checkpoint; the later line wins, as that is the run that continued."""
    train, val = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = VAL_LINE.match(line) or TRAIN_LINE.match(line)
            if m:
                (val if m.re is VAL_LINE else train)[int(m.group(1))] = float(m.group(2))
    return sorted(train.items()), sorted(val.items())


def plot_loss(logs, path):
    """logs: {label: (train, val)} -> loss.png (log-scale y: the loss falls by orders)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, (train, val)) in enumerate(logs.items()):
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.5, lw=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.5, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_by_n_tools(bins, path, title):
    """bins: result["breakdowns"]["n_tools"] ({bin: metrics}) -> grouped bars."""
    labels = list(bins)
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for off, key, name in ((-0.2, "exact", "exact match"), (0.2, "tool_acc", "tool-name accuracy")):
        vals = [100 * (bins[b].get(key) or 0) for b in labels]
        ax.bar([x + off for x in xs], vals, width=0.4, label=name)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{b}\n(n={bins[b]['n']})" for b in labels])
    ax.set_xlabel("tools in the catalogue")
    ax.set_ylabel("%")
    ax.set_ylim(0, 115)
    ax.legend(loc="upper right", ncol=2, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_calibration(calib, path, title):
    """calib: result["calibration"] ({bins: [{lo, hi, n, confidence, accuracy}], ece})
    -> reliability diagram above, items per bin below."""
    bins = calib["bins"]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    width = [b["hi"] - b["lo"] for b in bins]
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
           edgecolor="k", alpha=0.7, label="accuracy (exact) in the bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3",
            label="at the bin's mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ece = calib.get("ece")
    ax.set_title(title + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.legend(loc="upper left", fontsize=8)
    axn.bar([b["lo"] for b in bins], [b["n"] for b in bins], width=width, align="edge", edgecolor="k")
    axn.set_xlabel("confidence")
    axn.set_ylabel("items")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The README's picture: one box per stage, the script that runs it, what comes out.
PIPELINE = [
    ("tools", "examples/tools.json\nassets/catalogue.json", "OpenAI function\ndefinitions, or one\napp's fixed catalogue"),
    ("data", "data.py\n(synth.py, teacher.py)", "requests + right calls\nin the wire format;\nheld-out test splits"),
    ("tokenizer", "data.py\n(sentencepiece)", "BPE pieces; each\nspecial token and\ncompiled tool one piece"),
    ("model", "model.py\ntrain.py", "1-26M transformer,\ncopy head, tagger and\nintent heads"),
    ("decoder", "sample.py\ngrammar.py", "greedy, constrained:\nevery answer a valid\ncall or a no-call"),
    ("report, server", "eval.py\nserve.py", "exact match, F1,\nlatency; an OpenAI-\ncompatible endpoint"),
]


def plot_pipeline(path):
    """The pipeline as six boxes left to right, with one request in the wire format below."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    fig, ax = plt.subplots(figsize=(13.6, 4.4))
    ax.set_xlim(0, 13.6)
    ax.set_ylim(0, 4.4)
    ax.axis("off")
    w, gap, y0, h = 1.95, 0.3, 1.45, 2.55
    colours = ["#dbe9f6", "#dbe9f6", "#dbe9f6", "#fde4c8", "#e2f0d9", "#e2f0d9"]
    for i, (name, script, what) in enumerate(PIPELINE):
        x = 0.2 + i * (w + gap)
        ax.add_patch(FancyBboxPatch((x, y0), w, h, boxstyle="round,pad=0.03,rounding_size=0.12",
                                    facecolor=colours[i], edgecolor="#333333", linewidth=1.2))
        ax.text(x + w / 2, y0 + h - 0.3, name, ha="center", va="center", fontsize=13, weight="bold")
        ax.text(x + w / 2, y0 + h - 0.85, script, ha="center", va="center", fontsize=9.5, linespacing=1.3,
                family="monospace", color="#1f4e79")
        ax.text(x + w / 2, y0 + 0.68, what, ha="center", va="center", fontsize=10, linespacing=1.3)
        if i:
            ax.add_patch(FancyArrowPatch((x - gap + 0.02, y0 + h / 2), (x - 0.02, y0 + h / 2),
                                         arrowstyle="-|>", mutation_scale=16, linewidth=1.5, color="#333333"))
    ax.text(0.25, 0.95, "what the model reads and writes (one compiled-catalogue request):", fontsize=10.5,
            color="#444444")
    ax.text(0.25, 0.5, "<|user|> Where's my order ORD-1234?<|call|>track_order<|arg|> order_id: ORD-1234<|end|>",
            fontsize=11, family="monospace")
    ax.text(0.25, 0.1, "-> {\"name\": \"track_order\", \"arguments\": {\"order_id\": \"ORD-1234\"}}",
            fontsize=11, family="monospace", color="#1f4e79")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", nargs="*", default=[], help="train.py / distill.py log.txt (several: one chart)")
    p.add_argument("--eval", default=None, help="eval.py result JSON")
    p.add_argument("--out_dir", default="out/plots")
    p.add_argument("--pipeline", default=None, metavar="PATH", help="draw the pipeline picture to PATH (PNG)")
    args = p.parse_args(argv)
    if args.pipeline:
        os.makedirs(os.path.dirname(os.path.abspath(args.pipeline)), exist_ok=True)
        plot_pipeline(args.pipeline)
        print(f"wrote {args.pipeline}")
        if not args.log and not args.eval:
            return
    if not args.log and not args.eval:
        p.error("nothing to draw: give --log and/or --eval (or --pipeline PATH)")

    def skip(what, why):
        print(f"skip {what}: {why}", file=sys.stderr)

    os.makedirs(args.out_dir, exist_ok=True)
    written = []
    logs = {}
    for path in args.log:
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        if not os.path.isfile(path):
            skip("loss.png", f"{path}: no such file")
            continue
        train, val = read_log(path)
        if train or val:
            logs[label if label not in logs else path] = (train, val)
        else:
            skip("loss.png", f"{path}: no 'step N | loss X' or 'val step N | val_loss X' lines")
    if logs:
        written.append(os.path.join(args.out_dir, "loss.png"))
        plot_loss(logs, written[-1])

    if args.eval:
        result = None
        try:
            with open(args.eval, encoding="utf-8") as f:
                result = json.load(f)
            if not isinstance(result, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            skip("by_n_tools.png and calibration.png", f"{args.eval}: no such file")
        except ValueError as e:   # json.JSONDecodeError is one
            skip("by_n_tools.png and calibration.png", f"{args.eval}: not an eval.py result ({e})")
            result = None
        if result is not None:
            title = os.path.basename(str(result.get("test_file", args.eval)))
            bins = (result.get("breakdowns") or {}).get("n_tools")
            if bins:
                written.append(os.path.join(args.out_dir, "by_n_tools.png"))
                plot_by_n_tools(bins, written[-1], f"accuracy by catalogue size: {title}")
            else:
                skip("by_n_tools.png", f"{args.eval} has no breakdowns.n_tools (made before eval.py had them?)")
            calib = result.get("calibration")
            if calib and calib.get("bins"):
                written.append(os.path.join(args.out_dir, "calibration.png"))
                plot_calibration(calib, written[-1], f"confidence: {title}")
            else:
                skip("calibration.png", f"{args.eval} has no calibration bins (run with --no_constrain?)")
    for w in written:
        print(f"wrote {w}")
    if not written:
        sys.exit(1)


if __name__ == "__main__":
    main()
