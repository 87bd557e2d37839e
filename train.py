"""
Train a tool-calling model from scratch on the token files data.py wrote.

    python train.py                                           # tiny preset on data/demo, CPU, ~8 min
    python train.py --preset small --max_steps 6000 --out_dir out/small
    python train.py --resume --out_dir out/demo               # continue exactly where it stopped
    python train.py --preset 26m --device cuda --batch_size 64   # GPU: bf16 autocast picked automatically
    python train.py --pack                                    # several whole examples per row, no cross-talk

Several processes (DistributedDataParallel; torchrun sets RANK, LOCAL_RANK, WORLD_SIZE):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train.py --device cpu   # CPU, gloo
    torchrun --standalone --nproc_per_node 4 train.py --preset 26m --device cuda       # 4 GPUs, nccl

Each process draws its own micro-batches, so one optimizer step sees
batch_size x grad_accum x nproc examples; the gradients are averaged over the
processes once per step. Rank 0 alone prints, logs and writes checkpoints.

Ctrl-C or SIGTERM (a scheduler, or torchrun passing either on) finishes the
current step, saves last.pt once and exits with status 130; a second one quits
at once without saving.

Writes to --out_dir: best.pt (lowest val loss), last.pt (latest, for --resume),
log.txt (one line per step, and a val line per evaluation).

One explicit loop, top to bottom: sample a batch -> forward -> loss on the answer
tokens only -> backward (accumulated) -> clip -> AdamW step with the learning
rate for this step. The learning rate and the batch are pure functions of the
step number, so --resume continues exactly as if never stopped.
"""

import argparse
import bisect
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (FFN_KINDS, GPT, PRESETS, CheckpointError, Layout, config_dict, config_from_dict,
                   config_from_preset, load_checkpoint, save_checkpoint)
from wire import TOKEN_CLASSES


def arg_parser(doc=__doc__):
    """train.py's flags; distill.py adds its own to the same parser."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/demo")
    p.add_argument("--out_dir", default="out/demo")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    # model overrides (None = take the preset's value)
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_head", type=int)
    p.add_argument("--n_embd", type=int)
    p.add_argument("--n_hidden", type=int)
    p.add_argument("--block_size", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--smear_keys", action="store_const", const=True, default=None,
                   help="smeared keys (see model.py); the presets turn them on")
    p.add_argument("--no_smear_keys", dest="smear_keys", action="store_const", const=False,
                   help="plain keys, for A/B comparisons")
    p.add_argument("--ffn", choices=list(FFN_KINDS), default=None,
                   help="MLP sub-block: gelu (default), swiglu (same parameters) or none (see model.py)")
    p.add_argument("--n_kv_head", type=int, default=None,
                   help="key/value heads: grouped-query attention (0: one per query head)")
    p.add_argument("--qk_norm", action="store_const", const=True, default=None,
                   help="RMSNorm on each head's queries and keys before RoPE")
    p.add_argument("--no_qk_norm", dest="qk_norm", action="store_const", const=False)
    # optimisation
    p.add_argument("--batch_size", type=int, default=16,
                   help="examples per micro-batch (with --share_prefix: rows of a group each, "
                   "as many as hold about this many examples)")
    p.add_argument("--length_window", type=int, default=256,
                   help="draw each batch from this many examples of similar length (0: uniform)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--share_prefix", action="store_const", const=True, default=None,
                   help="train on rows of examples that share one tool prefix (default: on when "
                   "the data dir has groups, see data.py --group)")
    p.add_argument("--no_share_prefix", dest="share_prefix", action="store_const", const=False,
                   help="one example per row")
    p.add_argument("--pack", action="store_true",
                   help="pack several whole examples into each row of up to block_size tokens, each "
                   "attending to itself only (less padding; not with --share_prefix)")
    p.add_argument("--class_weights", type=parse_class_weights, default=None, metavar="CLASS=W,...",
                   help="loss weight per answer-token class, e.g. name=2,value=3 "
                   "(classes: struct, name, key, value, reason; others stay 1; default: all 1)")
    p.add_argument("--max_examples", type=int, default=0,
                   help="train on the first N training examples only (0: all), for fixed-data comparisons")
    p.add_argument("--max_steps", type=int, default=2900)
    p.add_argument("--max_minutes", type=float, default=0,
                   help="also stop (final eval, best.pt, last.pt) once training has run this long (0: no limit)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    p.add_argument("--min_lr", type=float, default=5e-4, help="learning rate at the end of the cosine")
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0 disables clipping")
    # evaluation, checkpoints, logging
    p.add_argument("--eval_interval", type=int, default=250)
    p.add_argument("--eval_batches", type=int, default=10)
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    p.add_argument("--stop_at", type=int, default=0,
                   help="save and stop after this step, keeping the --max_steps schedule "
                        "(split a long run into sessions; continue with --resume)")
    # system
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start)")
    p.add_argument("--seed", type=int, default=1337)
    return p


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def parse_class_weights(text):
    """'name=2,value=3' -> weights indexed by wire.TOKEN_CLASSES (prompt 0, rest 1)."""
    w = [0.0] + [1.0] * (len(TOKEN_CLASSES) - 1)
    for part in filter(None, text.split(",")):
        cls, _, val = part.partition("=")
        if cls.strip() not in TOKEN_CLASSES or cls.strip() == "prompt":
            raise argparse.ArgumentTypeError(
                f"unknown token class {cls.strip()!r}; choose from {', '.join(list(TOKEN_CLASSES)[1:])}")
        try:
            w[TOKEN_CLASSES[cls.strip()]] = float(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the weight must be a number") from None
    return w


def catch_stop_signals():
    """SIGTERM (a scheduler, or torchrun passing a Ctrl-C on) and Ctrl-C ask the
    loop to stop: it finishes the step it is in, all processes agree to stop at
    the same step (one rank cannot save while another is mid-all-reduce), and
    rank 0 saves last.pt once. A second signal quits at once without saving.
    Returns (event set by the first signal, function restoring the old handlers)."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:   # a background run ignores Ctrl-C: keep it so
            old[sig] = signal.signal(sig, handler)

    def restore():
        for sig, h in old.items():
            signal.signal(sig, h)
    return stop, restore


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# device and precision

def pick_device(requested):
    """cuda -> mps -> cpu unless told otherwise; returns (device, reason)."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            die("--device cuda requested but CUDA is not available")
        if requested == "mps" and not torch.backends.mps.is_available():
            die("--device mps requested but MPS is not available")
        return requested, "requested"
    if torch.cuda.is_available():
        return "cuda", "CUDA is available"
    if torch.backends.mps.is_available():
        return "mps", "Apple MPS is available"
    return "cpu", "no GPU found"


def pick_dtype(requested, device):
    """auto: bf16 on CUDA that supports it, fp16 (+GradScaler) on older CUDA,
    fp32 on CPU and MPS (bf16 matmuls are ~3x slower than fp32 on our CPUs)."""
    if requested != "auto":
        return requested, "requested"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA GPU supports bf16"
        return "float16", "CUDA GPU without bf16: fp16 with a GradScaler"
    return "float32", f"{device}: reduced precision is slower or unsupported here"


def autocast_ctx(device, dtype):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# several processes (torchrun + DistributedDataParallel)

def init_distributed(device):
    """Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) join the process group:
    nccl with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU.
    Returns (rank, world_size, device); without torchrun (0, 1, device) and
    nothing else happens."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        die(f"several processes on {device} are not supported: use --device cpu (gloo) or cuda (nccl)")
    dist.init_process_group(backend)
    return rank, world, device


def leave_distributed(clean):
    """Leave the process group, every rank at the same moment.

    clean: the loop ended the same way on every rank (done, --stop_at, or a stop
    all ranks agreed on), so a barrier is safe: no rank tears down its
    connections while another still saves or talks. After an error on one rank
    a barrier could wait forever, so it is skipped (torchrun stops the others).

    The DDP wrapper sits in a reference cycle (module hooks refer back to it), so
    it outlives main() until some garbage collection, possibly during interpreter
    shutdown, when its reducer would release the gloo process group while the
    runtime is being torn down; a rank dying at exit with "terminate called
    without an active exception" (SIGABRT, about one run in ten) fits that. So
    the caller drops its last reference to the wrapper first, and it is collected
    here, while everything is alive, before the group is destroyed."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def sum_over_ranks(values, device):
    """A few numbers summed over all processes (every rank must call this at the
    same point); in a single process, the numbers themselves."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class AnswerLogits(nn.Module):
    """What a training step runs: model -> logits at the answer positions.
    A module of its own because DDP hooks into forward(): calling
    model.hidden/head directly would bypass it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, sel, layout=None):
        return answer_logits(self.model, x, sel, layout)


def training_module(model, device):
    """AnswerLogits(model), wrapped in DDP under torchrun: backward then averages
    the gradients over the processes (DDP broadcasts rank 0's weights first,
    though equal seeds already made them equal). The checkpoint stores the bare
    model's state_dict, so no "module." prefix reaches it."""
    net = AnswerLogits(model)
    if dist.is_initialized():
        net = DDP(net, device_ids=[device] if device.startswith("cuda") else None)
    return net


# -----------------------------------------------------------------------------
# data

def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        die(f"{data_dir}: no meta.json here; run data.py first (python data.py --out_dir {data_dir})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Split:
    """One split's token files, memory-mapped; examples are kept whole.

    Training draws rows, not examples. A row is one example, or with
    share_prefix a group of examples that share a tool list (data.py --group):
    the tool prefix once, then each example's request and answer. Each request
    sees the prefix and itself only, at the positions it would have alone
    (model.Layout), so the model learns exactly what it would from the
    examples one by one, while the prefix (most of the tokens) runs once.

    With pack, a row is several whole examples end to end, up to block_size
    tokens (pack_rows), each seeing itself only, again at its own positions:
    the same learning signal with far less padding."""

    def __init__(self, data_dir, split, block_size, share_prefix=False, user_id=None, class_weights=None,
                 max_examples=0, pack=False, seed=0):
        base = os.path.join(data_dir, split)
        for suffix in (".bin", "_mask.bin", "_idx.npy"):
            if not os.path.isfile(base + suffix):
                die(f"{base + suffix}: missing; run data.py --out_dir {data_dir}")
        self.tokens = np.memmap(base + ".bin", dtype=np.uint16, mode="r")
        self.mask = np.memmap(base + "_mask.bin", dtype=np.uint8, mode="r")
        # per-token loss weight by class (prompt 0, struct, name, key, value, reason)
        self.weights = None
        if class_weights is not None:
            if not os.path.isfile(base + "_cls.bin"):
                die(f"{base}_cls.bin: missing; --class_weights needs data from a newer data.py")
            self.mask = np.memmap(base + "_cls.bin", dtype=np.uint8, mode="r")
            self.weights = np.asarray(class_weights, dtype=np.float32)
        offsets = np.load(base + "_idx.npy")
        lens = np.diff(offsets)
        # an example longer than the context cannot be trained on whole: skip it
        keep = lens <= block_size
        if max_examples:
            keep &= np.arange(len(lens)) < max_examples
        self.starts, self.lens = offsets[:-1], lens
        self.n_dropped = int((lens > block_size).sum())
        self.n_examples = int(keep.sum())
        if share_prefix and not os.path.isfile(base + "_group.npy"):
            die(f"{base}_group.npy: missing; --share_prefix needs data from data.py --group N")
        assert not (pack and share_prefix), "pack and share_prefix are exclusive"
        groups = np.load(base + "_group.npy") if share_prefix else np.arange(len(lens))
        self.rows, self.prefix = [], []   # example indices per row; tokens of shared prefix
        if pack:
            # which examples share a row is fixed for the run (by --seed); as they
            # do not see each other, that only ties them into the same batches
            kept = np.flatnonzero(keep)
            self.rows = [[int(kept[j]) for j in row] for row in pack_rows(lens[kept], block_size, seed)]
            self.prefix = [0] * len(self.rows)
        else:
            i = 0
            while i < len(lens):
                j = i
                while j + 1 < len(lens) and groups[j + 1] == groups[i]:
                    j += 1
                members = [k for k in range(i, j + 1) if keep[k]]
                i = j + 1
                if share_prefix and len(members) > 1:
                    self._add_group(members, block_size, user_id)
                else:
                    for k in members:
                        self.rows.append([k])
                        self.prefix.append(0)
        self.row_lens = np.array([self._row_len(r, p) for r, p in zip(self.rows, self.prefix)])
        self.by_length = np.argsort(self.row_lens, kind="stable")   # for length-grouped batches
        if not self.rows:
            die(f"{base}: no example fits block_size {block_size}")

    def _row_len(self, row, p):
        return p + sum(int(self.lens[k]) - p for k in row)

    def _add_group(self, members, block_size, user_id):
        """Rows for one group: the common prefix (up to the <|user|> token) once,
        then as many members as fit in block_size; the rest start a new row."""
        first = self.tokens[self.starts[members[0]]:self.starts[members[0]] + self.lens[members[0]]]
        where = np.flatnonzero(first == user_id)
        p = int(where[0]) if len(where) else 0
        same = [k for k in members if p and np.array_equal(self.tokens[self.starts[k]:self.starts[k] + p], first[:p])]
        for k in members:
            if k not in same:           # a different prefix (should not happen): a row of its own
                self.rows.append([k])
                self.prefix.append(0)
        row = []
        for k in same:
            if row and self._row_len(row + [k], p) > block_size:
                self.rows.append(row)
                self.prefix.append(p)
                row = []
            row.append(k)
        if row:
            self.rows.append(row)
            self.prefix.append(p if len(row) > 1 else 0)

    def __len__(self):
        return len(self.rows)

    def batch(self, idx, pad_id):
        """Rows idx -> x, y, m of shape (B, L), right-padded to the longest, and a
        model.Layout if any row packs several examples (else None: plain causal).
        y is x shifted by one; m is 1 where y is an answer token. Right padding
        needs no attention mask: under the causal mask no real token sees a pad."""
        L = int(self.row_lens[idx].max()) - 1
        B = len(idx)
        x = np.full((B, L), pad_id, dtype=np.int64)
        y = np.full((B, L), pad_id, dtype=np.int64)
        m = np.zeros((B, L), dtype=np.float32)
        packed = any(len(self.rows[r]) > 1 for r in idx)
        pos = np.tile(np.arange(L), (B, 1))
        seg = np.full((B, L), -1, dtype=np.int64)         # 0: shared prefix, k: k-th example
        prev = np.tile(np.arange(L) - 1, (B, 1))
        for b, r in enumerate(idx):
            p, row = self.prefix[r], self.rows[r]
            s0 = self.starts[row[0]]
            toks, msk = [self.tokens[s0:s0 + p]], [self.mask[s0:s0 + p]]
            ps, sg, pv = [np.arange(p)], [np.zeros(p, dtype=np.int64)], [np.arange(p) - 1]
            at = p
            for k_i, k in enumerate(row, 1):
                s, n = self.starts[k], int(self.lens[k])
                toks.append(self.tokens[s + p:s + n])
                msk.append(self.mask[s + p:s + n])
                ps.append(np.arange(p, n))
                sg.append(np.full(n - p, k_i))
                # the first token after the prefix follows the prefix's last token
                pv.append(np.concatenate([[p - 1], np.arange(at, at + n - p - 1)]))
                at += n - p
            t, mk = np.concatenate(toks), np.concatenate(msk)
            if self.weights is not None:   # mk holds classes: turn them into weights
                mk = self.weights[mk]
            n = len(t) - 1
            x[b, :n], y[b, :n], m[b, :n] = t[:-1], t[1:], mk[1:]
            pos[b, :n], seg[b, :n], prev[b, :n] = np.concatenate(ps)[:-1], np.concatenate(sg)[:-1], np.concatenate(pv)[:-1]
        out = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)
        if not packed:
            return out + (None,)
        return out + (packed_layout(torch.from_numpy(pos), torch.from_numpy(seg), torch.from_numpy(prev)),)


def packed_layout(pos, seg, prev):
    """model.Layout for rows holding several sequences. pos, prev: (B, L) as in
    Layout; seg: (B, L) 0 for a shared prefix that every sequence sees, k >= 1
    for the k-th sequence, -1 for padding. Query t may attend to key s <= t of
    its own sequence or of the prefix: block-diagonal causal, plus the prefix."""
    L = seg.size(1)
    q, k = seg[:, :, None], seg[:, None, :]                                     # (B, L, 1), (B, 1, L)
    mask = ((k == 0) | (k == q)) & torch.ones(L, L, dtype=torch.bool).tril()   # (B, L, L)
    return Layout(pos, mask[:, None], prev)                                     # mask (B, 1, L, L): all heads


def pack_rows(lens, capacity, seed):
    """Examples of the given lengths -> rows (lists of indices into lens) of at
    most capacity tokens each. Best fit in a shuffled order: each example goes
    to the row with the least room that still holds it, else opens a new row.
    Shuffled rather than longest-first, so which examples share a row is not
    tied to their length; with examples well under capacity it leaves only a
    few percent empty all the same."""
    order = np.random.default_rng([seed, 0x9ac]).permutation(len(lens))
    rows, free = [], []      # free: sorted (room left, row number) of the rows still open
    for i in order:
        n = int(lens[i])
        j = bisect.bisect_left(free, (n, -1))      # the first row with room >= n
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(int(i))
        else:
            room, r = capacity, len(rows)
            rows.append([int(i)])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def padding_fraction(split, rows_per_batch, window, seed, n_batches=20):
    """The fraction of a batch's token slots that hold padding: each batch is
    (rows, longest row - 1) after the one-token shift of inputs and targets,
    and a row of n tokens fills n - 1 slots. Over the first n_batches training
    batches (the same draws as step 0, 1, ...), token-weighted."""
    real = total = 0
    for step in range(n_batches):
        lens = split.row_lens[batch_indices(split, seed, step, 0, rows_per_batch, window)]
        real += int((lens - 1).sum())
        total += len(lens) * int(lens.max() - 1)
    return 1 - real / total


def batch_indices(split, seed, step, micro, batch_size, window=0):
    """Which rows go into a micro-batch: a pure function of (seed, step, micro).
    micro counts micro-batches over all processes (rank * grad_accum + i), so
    2 processes with grad_accum 1 draw exactly what 1 process draws with 2.
    With window > 0, the batch is drawn from `window` rows of neighbouring
    length (around a random anchor), so little compute is spent on padding."""
    rng = np.random.default_rng([seed, step, micro])
    n = len(split)
    if window <= 0 or window >= n:
        return rng.integers(0, n, batch_size)
    lo = int(rng.integers(0, n - window + 1))
    return split.by_length[lo + rng.integers(0, window, batch_size)]


def answer_logits(model, x, sel, layout=None):
    """x: (B, L) tokens, sel: (B, L) bool answer positions -> (N_answer, V)
    float32 logits; the vocab projection runs on those positions alone."""
    h = model.hidden(x, layout=layout)        # (B, L, C)
    return model.head(h[sel])                 # (N_answer, V)


def weighted_ce(logits, targets, w, reduction="mean"):
    """Cross-entropy per position times its weight w: the weighted mean or sum."""
    ce = F.cross_entropy(logits, targets, reduction="none") * w
    return ce.sum() if reduction == "sum" else ce.sum() / w.sum()


def answer_loss(model, x, y, m, layout=None, reduction="mean"):
    """Cross-entropy on answer tokens only (m > 0), weighted by m (1 everywhere
    unless --class_weights). x, y, m: (B, L). "mean" is the weighted mean over
    all answer tokens of the batch (a token-level mean, whatever the rows hold),
    "sum" the weighted sum."""
    sel = m > 0
    return weighted_ce(answer_logits(model, x, sel, layout), y[sel], m[sel], reduction)


@torch.no_grad()
def evaluate_loss(model, split, args, pad_id, device, ctx):
    """Answer-token loss over a fixed set of batches (the same every time)."""
    model.eval()
    total, count = 0.0, 0.0
    for i in range(args.eval_batches):
        idx = batch_indices(split, args.seed + 1, i, 0, args.batch_size)
        x, y, m, layout = to_device(split.batch(idx, pad_id), device)
        with ctx:
            total += answer_loss(model, x, y, m, layout, reduction="sum").item()
        count += m.sum().item()
    model.train()
    return total / max(count, 1)


def to_device(batch, device):
    x, y, m, layout = batch
    if layout is not None:
        layout = Layout(*(t.to(device, non_blocking=True) for t in layout))
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), m.to(device, non_blocking=True), layout


def get_lr(step, args):
    """Linear warmup, then cosine decay to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices only (not norms). Fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=fused)


class Logger:
    """Prints a line and appends it to out_dir/log.txt (rank 0 only: the others
    are not active)."""

    def __init__(self, out_dir, active=True):
        self.path = os.path.join(out_dir, "log.txt")
        self.active = active

    def __call__(self, line):
        if not self.active:
            return
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# -----------------------------------------------------------------------------

def model_config(args, meta):
    try:
        return config_from_preset(args.preset, vocab_size=meta["vocab_size"], n_layer=args.n_layer,
                                  n_head=args.n_head, n_embd=args.n_embd, n_hidden=args.n_hidden,
                                  block_size=args.block_size, dropout=args.dropout, smear_keys=args.smear_keys,
                                  ffn=args.ffn, n_kv_head=args.n_kv_head, qk_norm=args.qk_norm)
    except ValueError as e:
        die(str(e))


def setup_run(args, meta, device, dtype, log, name="model"):
    """Everything a training loop needs before its first step, shared by train.py
    and distill.py: the model (fresh, or from last.pt with --resume), optimizer,
    grad scaler, autocast context and the train/val splits. Prints what it built."""
    if args.pack and args.share_prefix:
        die("--pack and --share_prefix are two ways of filling a row; choose one "
            "(--share_prefix is on by default for data with groups: --pack turns that default off)")
    config = model_config(args, meta)
    last_path = os.path.join(args.out_dir, "last.pt")
    step, best_val, ckpt = 0, float("inf"), None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.resume:
        try:
            _, ckpt = load_checkpoint(last_path, "cpu", meta["tokenizer_sha256"])
        except CheckpointError as e:
            die(str(e))
        if config_dict(config_from_dict(ckpt["model_config"])) != config_dict(config):
            die(f"{last_path}: model config differs from the one asked for now; "
                "resume with the same --preset and overrides")
        step, best_val = ckpt["step"], ckpt["best_val"]
        if ckpt.get("world_size", 1) != world:
            print(f"note: {last_path} was trained by {ckpt.get('world_size', 1)} process(es), now {world}: "
                  "the global batch (batch_size x grad_accum x processes) changes from here on")

    model = GPT(config)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16"))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    if args.compile:
        # compile the forward pass in place; state_dict keys stay free of "_orig_mod."
        model.hidden = torch.compile(model.hidden)

    if args.share_prefix is None:
        args.share_prefix = not args.pack and os.path.isfile(os.path.join(args.data_dir, "train_group.npy"))
    train = Split(args.data_dir, "train", config.block_size, args.share_prefix, meta["special_tokens"]["<|user|>"],
                  args.class_weights, args.max_examples, args.pack, args.seed)
    val = Split(args.data_dir, "val", config.block_size)
    # --batch_size counts examples; a shared-prefix or packed row holds several
    rows_per_batch = max(1, round(args.batch_size * len(train) / train.n_examples))
    pad = padding_fraction(train, rows_per_batch, args.length_window, args.seed)
    if args.pack:   # what packing saves: the same data one example per row, batched as without --pack
        plain = Split(args.data_dir, "train", config.block_size, max_examples=args.max_examples)
        pad_plain = padding_fraction(plain, args.batch_size, args.length_window, args.seed)
    print(f"{name}: {args.preset}, {model.num_params() / 1e6:.2f}M parameters, {json.dumps(config_dict(config))}")
    print(f"data: {args.data_dir}: {train.n_examples} train / {len(val)} val examples"
          + (f" ({train.n_dropped} longer than block_size skipped)" if train.n_dropped else "")
          + (f"; {len(train)} rows sharing tool prefixes, {train.row_lens.sum() / train.lens[train.lens <= config.block_size].sum():.0%} "
             f"of the tokens, {rows_per_batch} rows per batch" if args.share_prefix else "")
          + (f"; packed into {len(train)} rows of {train.n_examples / len(train):.2f} examples on average, "
             f"{rows_per_batch} rows per batch" if args.pack else ""))
    print(f"padding: {f'{pad_plain:.1%} of the batch tokens with one example per row, ' if args.pack else ''}"
          f"{pad:.1%}{' packed' if args.pack else ' of the batch tokens'} (first 20 batches, "
          f"length_window {args.length_window})")
    print(f"config: {json.dumps(vars(args))}")
    if step:
        log(f"resumed from {last_path} at step {step}")
    elif log.active:
        open(log.path, "w").close()   # a fresh run starts a fresh log (best/last are replaced too)
    return SimpleNamespace(config=config, model=model, optimizer=optimizer, scaler=scaler, step=step,
                           best_val=best_val, train=train, val=val, rows_per_batch=rows_per_batch,
                           last_path=last_path, ctx=autocast_ctx(device, dtype))


def save_run(run, args, meta, path, step, best_val, **extra):
    save_checkpoint({
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "model_config": config_dict(run.config),
        "step": step, "best_val": best_val, "args": vars(args), "data_dir": args.data_dir,
        "tokenizer_sha256": meta["tokenizer_sha256"], "vocab_size": meta["vocab_size"],
        "world_size": dist.get_world_size() if dist.is_initialized() else 1, **extra,
    }, path)


def main(argv=None):
    args = parse_args(argv)
    meta = load_meta(args.data_dir)
    device, device_why = pick_device(args.device)
    rank, world, device = init_distributed(device)
    if rank > 0:
        sys.stdout = open(os.devnull, "w")   # rank 0 alone prints; errors still reach stderr
    dtype, dtype_why = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)   # the same seed everywhere: every rank builds the same model
    os.makedirs(args.out_dir, exist_ok=True)
    log = Logger(args.out_dir, active=rank == 0)
    pad_id = meta["special_tokens"]["<|pad|>"]
    print(f"device: {device} ({device_why}); dtype: {dtype} ({dtype_why})"
          + (f"; {world} processes ({dist.get_backend()}), global batch {args.batch_size} x {args.grad_accum} "
             f"x {world} examples" if world > 1 else ""))
    run = setup_run(args, meta, device, dtype, log)
    model, optimizer, scaler, ctx = run.model, run.optimizer, run.scaler, run.ctx
    train, val, last_path = run.train, run.val, run.last_path
    step, best_val = run.step, run.best_val
    n_params = model.num_params()
    net = training_module(model, device)   # what the step calls: DDP-wrapped under torchrun
    if world > 1:
        torch.manual_seed(args.seed + rank)   # dropout masks differ between ranks

    def checkpoint(path):
        if rank == 0:
            save_run(run, args, meta, path, step, best_val)

    model.train()
    stop, restore_signals = catch_stop_signals()
    t0 = start_time = time.time()
    tokens_since, steps_since, examples_since = 0, 0, 0
    clean = False   # the loop ended the same way on every rank (see leave_distributed)
    try:
        while step < args.max_steps:
            # stop decisions are taken by all ranks together, at the same step
            interrupted, over_time = (v > 0 for v in sum_over_ranks(
                [stop.is_set(), args.max_minutes and time.time() - start_time > 60 * args.max_minutes], device))
            if interrupted:
                checkpoint(last_path)
                log(f"interrupted at step {step}; saved {last_path} (continue with --resume)")
                clean = True
                sys.exit(130)
            if over_time:
                log(f"time budget of {args.max_minutes:g} min reached at step {step}")
                break
            if args.stop_at and step >= args.stop_at:
                checkpoint(last_path)
                log(f"stopped at step {step} (--stop_at); continue with --resume")
                clean = True
                return
            if step % args.eval_interval == 0 and step > 0:
                # every rank evaluates (the same batches, the same weights): the
                # others would only wait for rank 0 otherwise
                val_loss = evaluate_loss(model, val, args, pad_id, device, ctx)
                if val_loss < best_val:
                    best_val = val_loss
                    checkpoint(os.path.join(args.out_dir, "best.pt"))
                checkpoint(last_path)
                log(f"val step {step} | val_loss {val_loss:.4f} | best {best_val:.4f}")

            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # accumulate gradients over micro-batches; each loss is divided so the
            # sum is the mean over the whole batch (DDP averages over the ranks)
            loss_sum = 0.0
            for micro in range(args.grad_accum):
                idx = batch_indices(train, args.seed, step, rank * args.grad_accum + micro, run.rows_per_batch,
                                    args.length_window)
                x, y, m, layout = to_device(train.batch(idx, pad_id), device)
                sel = m > 0
                # DDP: all-reduce the gradients once, after the last micro-batch
                last = micro == args.grad_accum - 1
                with (net.no_sync() if world > 1 and not last else nullcontext()):
                    with ctx:
                        loss = weighted_ce(net(x, sel, layout), y[sel], m[sel]) / args.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.item()
                tokens_since += x.numel()
                examples_since += sum(len(train.rows[r]) for r in idx)
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1

            if step % args.log_interval == 0 or step == args.max_steps:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.time() - t0
                # the loss of the global batch, the tokens of all ranks
                loss_sum, tokens_since, examples_since = sum_over_ranks([loss_sum, tokens_since, examples_since],
                                                                        device)
                loss_sum /= world
                tps = tokens_since / dt
                # ~6 FLOPs per parameter per token for forward + backward
                gflops = 6 * n_params * tps / 1e9
                log(f"step {step} | loss {loss_sum:.4f} | lr {lr:.2e} | "
                    f"dt {1000 * dt / steps_since:.0f}ms | tok/s {tps:,.0f} | ex/s {examples_since / dt:.1f} | "
                    f"{gflops:.1f} GFLOP/s")
                t0, tokens_since, steps_since, examples_since = time.time(), 0, 0, 0

        val_loss = evaluate_loss(model, val, args, pad_id, device, ctx)
        if val_loss < best_val:
            best_val = val_loss
            checkpoint(os.path.join(args.out_dir, "best.pt"))
        checkpoint(last_path)
        log(f"val step {step} | val_loss {val_loss:.4f} | best {best_val:.4f}")
        print(f"done: {args.out_dir}/best.pt (val loss {best_val:.4f}), {args.out_dir}/last.pt")
        clean = True
    finally:
        restore_signals()
        net = None   # the last reference to the DDP wrapper (see leave_distributed)
        leave_distributed(clean)


if __name__ == "__main__":
    main()
