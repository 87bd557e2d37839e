"""
Train a tool-calling model from scratch on the token files data.py wrote.

    python train.py                                           # tiny preset on data/demo, CPU
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

Writes to --out_dir: best.pt (lowest val loss; with --keep_last the latest
weights), last.pt (latest, with the optimizer's state, for --resume),
log.txt (one line per step, and a val line per evaluation).

One explicit loop, top to bottom: sample a batch -> forward -> loss on the answer
tokens only -> backward (accumulated) -> clip -> AdamW step with the learning
rate for this step. The learning rate and the batch are pure functions of the
step number, so --resume continues exactly as if never stopped. distill.py runs
this same loop with its own loss (run(args, loss=...)).
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from datadir import DataDirError, Split, batch_indices, load_meta, padding_fraction
from model import FFN_KINDS, GPT, PRESETS, CheckpointError, config_dict, config_from_dict, \
    config_from_preset, load_checkpoint, save_checkpoint
from runtime import (Logger, autocast_ctx, catch_stop_signals, die, init_distributed, leave_distributed,
                     pick_device, pick_dtype, sum_over_ranks, world_size)
import wire


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
    p.add_argument("--prefix_lm", action="store_const", const=True, default=None,
                   help="the prompt's blocks (catalogue, request) read both ways, the answer causal")
    p.add_argument("--no_prefix_lm", dest="prefix_lm", action="store_const", const=False)
    p.add_argument("--copy_head", action="store_const", const=True, default=None,
                   help="pointer-generator output: a token is copied from the prompt or generated")
    p.add_argument("--no_copy_head", dest="copy_head", action="store_const", const=False)
    p.add_argument("--tagger", action="store_true",
                   help="aux heads on the prompt: each request token's tag and the first tool (data.py "
                   "writes their targets), trained with weight --aux_weight; a compiled router drafts from them")
    p.add_argument("--aux_weight", type=float, default=0.5, help="weight of the aux losses (--tagger)")
    p.add_argument("--intent_vote", action="store_true",
                   help="the intent head trained at every request token and read as their mean "
                   "log-probability, not at the last one (compiled, with --prefix_lm)")
    # what a row holds
    p.add_argument("--share_prefix", action="store_true",
                   help="rows of examples that share one tool list, the list run once (data.py --group N)")
    p.add_argument("--pack", action="store_true",
                   help="pack several whole examples into each row of up to block_size tokens, each "
                   "attending to itself only (less padding)")
    # optimisation
    p.add_argument("--batch_size", type=int, default=16,
                   help="examples per micro-batch (with --share_prefix or --pack: as many rows as hold "
                   "about this many examples)")
    p.add_argument("--length_window", type=int, default=256,
                   help="draw each batch from this many examples of similar length (0: uniform)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max_examples", type=int, default=0,
                   help="train on the first N training examples only (0: all), for fixed-data comparisons")
    p.add_argument("--max_steps", type=int, default=None,
                   help="the schedule's length in steps (default 2900; with --max_minutes alone: fitted to the minutes)")
    p.add_argument("--max_minutes", type=float, default=0,
                   help="stop (final eval, best.pt, last.pt) once training has run this long (0: no limit); "
                   "without --max_steps the schedule is fitted to it: the same budget on any machine")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon for the blocks' weight matrices, AdamW for the rest (see muon.py)")
    p.add_argument("--muon_lr", type=float, default=0.02, help="Muon's peak learning rate (--optimizer muon)")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    p.add_argument("--min_lr", type=float, default=5e-4, help="learning rate at the end of the cosine")
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0 disables clipping")
    # evaluation, checkpoints, logging
    p.add_argument("--keep_last", action="store_true",
                   help="best.pt holds the latest weights (rewritten at every evaluation and at the end), not "
                        "those of the lowest val loss: for a schedule that ends at --min_lr 0, where the val "
                        "loss can rise while the answers still improve")
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


def main(argv=None):
    run(parse_args(argv))


# -----------------------------------------------------------------------------
# the loop

def run(args, loss=None, name="model", ckpt_extra=None):
    """Train with args -> out_dir/best.pt, last.pt, log.txt.

    loss(logits, y, m, x, sel, layout, seg) -> (loss, {name: value to log}) replaces
    the answer-token cross-entropy (distill.py's soft KD); logits are the model's
    at the answer positions sel. ckpt_extra is stored in every checkpoint."""
    loss = loss or gold_loss
    if args.max_steps is None:     # 0: the schedule is fitted to --max_minutes (fit_schedule)
        args.max_steps = 0 if args.max_minutes else 2900
    try:
        meta = load_meta(args.data_dir)
    except DataDirError as e:
        die(str(e))
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

    model, optimizer, scaler, step, best_val, trained_s, seen = build(args, meta, device, dtype, name)
    # a compiled catalogue is stored with the model: it is what the model can call
    catalogue = wire.read_json(os.path.join(args.data_dir, "tools.json")) if meta.get("compiled") else None
    aux = model.tagger is not None or model.intent is not None or model.point is not None
    train, val, rows_per_batch = load_splits(args, meta, model.config.block_size, aux)
    ctx = autocast_ctx(device, dtype)
    last_path = os.path.join(args.out_dir, "last.pt")
    if step:
        log(f"resumed from {last_path} at step {step}")
    else:
        log.restart()
    if aux and (train.tags is None or (model.point is not None and train.ptr is None)):
        die(f"--tagger: {args.data_dir} has no tag (or pointer) files; build it again with this data.py")
    # what the step calls: under torchrun, DDP averages the gradients over the
    # processes in backward (the checkpoint stores the bare model: no "module.")
    net = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if world > 1 else model
    if world > 1:
        torch.manual_seed(args.seed + rank)   # dropout masks differ between ranks

    def checkpoint(path):
        if rank == 0:
            save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "model_config": config_dict(model.config),
                "step": step, "best_val": best_val, "args": vars(args), "data_dir": args.data_dir,
                "tokenizer_sha256": meta["tokenizer_sha256"], "vocab_size": meta["vocab_size"],
                "world_size": world, "catalogue": catalogue,
                # the intent head was trained at each tagged token for its call's tool, on
                # requests of two tools and more (heads.Heads.run_tools)
                "run_tools": bool(model.config.intent_vote and train.tool is not None and
                                  meta.get("splits", {}).get("train", {}).get("two_tools")),
                "train_seconds": trained_s + time.time() - start_time,
                # training tokens over all processes (this one's x their number), for compute curves
                "train_tokens": seen, **(ckpt_extra or {})}, path)

    def validate():
        nonlocal best_val
        # every rank evaluates (the same batches, the same weights): the others
        # would only wait for rank 0 otherwise
        val_loss = evaluate_loss(model, val, args, pad_id, device, ctx)
        better, best_val = val_loss < best_val, min(best_val, val_loss)
        if better or args.keep_last:
            checkpoint(os.path.join(args.out_dir, "best.pt"))
        checkpoint(last_path)
        log(f"val step {step} | val_loss {val_loss:.4f} | best {best_val:.4f}")

    model.train()
    stop, restore_signals = catch_stop_signals()
    t0 = start_time = time.time()
    # a schedule fitted to --max_minutes: steps fit_at[0]..fit_at[1] are timed (see fit_schedule)
    fit_at = (step + FIT_FROM, step + FIT_FROM + FIT_STEPS) if not args.max_steps else (None, None)
    fit_t0 = None
    since = dict(tokens=0, steps=0, examples=0)
    clean = False   # the loop ended the same way on every rank (see runtime.leave_distributed)
    try:
        while step < args.max_steps or not args.max_steps:
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
                validate()

            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batches = micro_batches(train, args, step, rank, rows_per_batch, pad_id, device)
            parts, tokens, examples = train_step(net, model, optimizer, scaler, batches, loss, args, ctx, world, aux)
            step += 1
            if step == fit_at[0]:
                fit_t0 = time.time()
            if step == fit_at[1]:
                per_step = (time.time() - fit_t0) / FIT_STEPS
                args.max_steps = fit_schedule(args, step, per_step, trained_s + time.time() - start_time, device)
                log(f"schedule: {args.max_steps} steps fill {args.max_minutes:g} min "
                    f"({per_step * 1000:.0f} ms a step over steps {fit_at[0]}-{fit_at[1]})")
            since["steps"] += 1
            since["tokens"], since["examples"] = since["tokens"] + tokens, since["examples"] + examples
            seen += tokens * world
            if step % args.log_interval == 0 or step == args.max_steps:
                log(step_line(step, parts, since, lr, t0, model, device, world))
                t0, since = time.time(), dict(tokens=0, steps=0, examples=0)

        validate()
        print(f"done: {args.out_dir}/best.pt (val loss {best_val:.4f}), {args.out_dir}/last.pt")
        clean = True
    finally:
        restore_signals()
        net = None   # the last reference to the DDP wrapper (see runtime.leave_distributed)
        leave_distributed(clean)


# -----------------------------------------------------------------------------
# one optimizer step

def micro_batches(train, args, step, rank, rows_per_batch, pad_id, device):
    """The step's micro-batches, drawn one at a time -> (examples in it, Batch on device).
    Which rows is a pure function of (seed, step, micro-batch) (see datadir.batch_indices)."""
    for micro in range(args.grad_accum):
        idx = batch_indices(train, args.seed, step, rank * args.grad_accum + micro, rows_per_batch,
                            args.length_window)
        yield sum(len(train.rows[r]) for r in idx), train.batch(idx, pad_id).to(device)


def train_step(net, model, optimizer, scaler, batches, loss, args, ctx, world, aux):
    """Forward and backward over the micro-batches, accumulating gradients (each loss
    is divided by their number, so the sum is the mean over the whole batch; DDP
    averages over the ranks), clip, optimizer step -> ({name: this rank's value} of
    the loss and of what `loss` and the aux heads log, tokens, examples)."""
    parts, tokens, examples = {"loss": 0.0}, 0, 0
    for micro, (n_examples, batch) in enumerate(batches):
        # DDP: all-reduce the gradients once, after the last micro-batch
        with net.no_sync() if world > 1 and micro < args.grad_accum - 1 else nullcontext():
            with ctx:
                value, logged = batch_loss(net, batch, loss, aux, args.aux_weight, model.config.intent_vote)
                value = value / args.grad_accum
            scaler.scale(value).backward()
        parts["loss"] += value.item()
        for k, v in logged.items():
            parts[k] = parts.get(k, 0.0) + float(v) / args.grad_accum
        tokens, examples = tokens + batch.x.numel(), examples + n_examples
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return parts, tokens, examples


def batch_loss(net, batch, loss, aux, aux_weight, vote=False):
    """One micro-batch's forward pass -> (loss, {name: value to log}): `loss` on the
    answer tokens, plus aux_weight times the aux heads' losses when the model has them
    (vote: the intent at every request token, GPTConfig.intent_vote)."""
    x, y, m, layout, seg = batch[:5]
    sel = m > 0
    out = net(x, layout=layout, sel=sel, seg=seg, aux=aux)
    value, logged = loss(out[0] if aux else out, y, m, x, sel, layout, seg)
    if aux:
        extra, extra_logged = aux_loss(*out[1:], batch, vote)
        value, logged = value + aux_weight * extra, {**logged, **extra_logged}
    return value, logged


def step_line(step, parts, since, lr, t0, model, device, world):
    """The log line of the steps since t0: the losses of the global batch (summed
    over the ranks), the learning rate, time per step and throughput."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    *values, tokens, examples = sum_over_ranks([*parts.values(), since["tokens"], since["examples"]], device)
    tps = tokens / dt
    gflops = 6 * model.num_params() * tps / 1e9   # ~6 FLOPs per parameter per token, fwd + bwd
    return (f"step {step} | " + " | ".join(f"{k} {v / world:.4f}" for k, v in zip(parts, values))
            + f" | lr {lr:.2e} | dt {1000 * dt / since['steps']:.0f}ms | tok/s {tps:,.0f} | "
            f"ex/s {examples / dt:.1f} | {gflops:.1f} GFLOP/s")


# -----------------------------------------------------------------------------
# what the loop calls

def gold_loss(logits, y, m, x=None, sel=None, layout=None, seg=None):
    """The default loss: cross-entropy on the answer tokens, weighted by m."""
    sel = m > 0 if sel is None else sel
    return weighted_ce(logits, y[sel], m[sel]), {}


def aux_loss(tag_logits, intent_logits, arg_logits, batch, vote=False):
    """The aux heads' cross-entropies: each request token's tag (positions with a
    tag); the first tool at the last prompt token (rows whose tool is known), as a
    class (compiled) or as the position of its name in the catalogue (pointer
    heads), with vote at every request token (seg 2) instead (a tagged token's
    target: the tool of the call its value is in, where the data gives it); and, pointer heads,
    each tagged request token's argument-name position -> (their sum, {"tag": ...,
    "intent": ..., "arg": ...} to log)."""
    total, parts = 0.0, {}
    catalogue = (batch.seg == 1)[:, None, :] if arg_logits is not None else None   # (B, 1, T) pointable
    if tag_logits is not None:
        on = batch.tags > 0
        ce = F.cross_entropy(tag_logits[on].float(), batch.tags[on])
        total, parts["tag"] = total + ce, ce.item()
    if intent_logits is not None:
        rows = torch.nonzero(batch.intent >= 0).squeeze(1)
        if len(rows) and vote:
            on = batch.seg[rows] == 2                                    # (R, T) request tokens
            target = batch.intent[rows, None].expand_as(on)
            if batch.tool is not None:                 # a tagged token: its own call's tool
                target = torch.where(batch.tool[rows] >= 0, batch.tool[rows], target)
            ce = F.cross_entropy(intent_logits[rows][on].float(), target[on])
            total, parts["intent"] = total + ce, ce.item()
        elif len(rows):
            logits = intent_logits[rows, batch.intent_at[rows]].float()
            if catalogue is not None:
                logits = logits.masked_fill(~catalogue[rows, 0], float("-inf"))
            ce = F.cross_entropy(logits, batch.intent[rows])
            total, parts["intent"] = total + ce, ce.item()
    if arg_logits is not None:
        on = batch.ptr >= 0
        if on.any():
            logits = arg_logits.float().masked_fill(~catalogue, float("-inf"))[on]
            ce = F.cross_entropy(logits, batch.ptr[on])
            total, parts["arg"] = total + ce, ce.item()
    return total, parts


def weighted_ce(logits, targets, w, reduction="mean"):
    """Cross-entropy per position times its weight w (1 on every answer token):
    the weighted mean over all answer tokens of the batch (a token-level mean,
    whatever the rows hold), or the weighted sum."""
    ce = F.cross_entropy(logits, targets, reduction="none") * w
    return ce.sum() if reduction == "sum" else ce.sum() / w.sum()


def answer_loss(model, x, y, m, layout=None, seg=None, reduction="mean"):
    """x, y, m: (B, L) -> the weighted cross-entropy on the answer tokens (m > 0)."""
    sel = m > 0
    return weighted_ce(model(x, layout=layout, sel=sel, seg=seg), y[sel], m[sel], reduction)


@torch.no_grad()
def evaluate_loss(model, split, args, pad_id, device, ctx):
    """Answer-token loss over a fixed set of batches (the same every time)."""
    model.eval()
    total, count = 0.0, 0.0
    for i in range(args.eval_batches):
        idx = batch_indices(split, args.seed + 1, i, 0, args.batch_size)
        x, y, m, layout, seg = split.batch(idx, pad_id).to(device)[:5]
        with ctx:
            total += answer_loss(model, x, y, m, layout, seg, reduction="sum").item()
        count += m.sum().item()
    model.train()
    return total / max(count, 1)


FIT_FROM, FIT_STEPS = 20, 200    # a schedule fitted to --max_minutes: steps timed, after the first ones


def fit_schedule(args, step, per_step, seconds, device):
    """The number of steps that fills --max_minutes (seconds of it spent so far)
    at per_step seconds a step, timed over FIT_STEPS steps after the first
    FIT_FROM (start-up is slower), averaged over ranks, with 3% left for
    evaluations. Fitted once and stored with the run's args, so the learning
    rate stays a pure function of the step (the peak until then: get_lr), and a
    resumed run keeps the same schedule."""
    per_step = sum_over_ranks([per_step], device)[0] / world_size()
    left = 60 * args.max_minutes - seconds
    return max(step + 1, step + int(0.97 * left / per_step))


def get_lr(step, args):
    """Linear warmup, then cosine decay to min_lr at max_steps (the peak until a
    schedule fitted to minutes is known: see fit_schedule)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if not args.max_steps:
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices only (not norms). Fused kernel on CUDA.
    --optimizer muon: muon.MuonAdamW (Muon for the blocks' matrices)."""
    if getattr(args, "optimizer", "adamw") == "muon":
        from muon import MuonAdamW, muon_groups
        return MuonAdamW(muon_groups(model, args.weight_decay, args.muon_lr, args.lr), lr=args.lr,
                         betas=(0.9, args.beta2))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device.startswith("cuda"))


def model_config(args, meta):
    try:
        return config_from_preset(args.preset, vocab_size=meta["vocab_size"], n_layer=args.n_layer,
                                  n_head=args.n_head, n_embd=args.n_embd, n_hidden=args.n_hidden,
                                  block_size=args.block_size, dropout=args.dropout, smear_keys=args.smear_keys,
                                  ffn=args.ffn, n_kv_head=args.n_kv_head, qk_norm=args.qk_norm,
                                  prefix_lm=args.prefix_lm, copy_head=args.copy_head,
                                  n_tags=len(meta.get("tags") or []) if args.tagger else 0,
                                  n_intents=len(meta.get("intents") or []) if args.tagger else 0,
                                  pointer_heads=bool(args.tagger and not meta.get("compiled")),
                                  intent_vote=args.intent_vote or None)
    except ValueError as e:
        die(str(e))


def build(args, meta, device, dtype, name="model"):
    """The model, optimizer and grad scaler: fresh, or from last.pt with --resume
    -> (model, optimizer, scaler, step, best val loss so far, seconds trained so far)."""
    config = model_config(args, meta)
    if (config.prefix_lm or config.copy_head) and (args.pack or args.share_prefix):
        die("--prefix_lm and --copy_head work on rows of one example: not with --pack or --share_prefix")
    step, best_val, trained_s, seen, ckpt = 0, float("inf"), 0.0, 0, None
    if args.resume:
        last_path = os.path.join(args.out_dir, "last.pt")
        try:
            _, ckpt = load_checkpoint(last_path, "cpu", meta["tokenizer_sha256"])
        except CheckpointError as e:
            die(str(e))
        if config_dict(config_from_dict(ckpt["model_config"])) != config_dict(config):
            die(f"{last_path}: model config differs from the one asked for now; "
                "resume with the same --preset and overrides")
        step, best_val, trained_s = ckpt["step"], ckpt["best_val"], ckpt.get("train_seconds", 0.0)
        seen = ckpt.get("train_tokens", 0)
        if not args.max_steps:              # a schedule fitted to minutes stays as it was fitted
            args.max_steps = ckpt["args"].get("max_steps") or 0
        if ckpt.get("world_size", 1) != world_size():
            print(f"note: {last_path} was trained by {ckpt.get('world_size', 1)} process(es), now {world_size()}: "
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
    print(f"{name}: {args.preset}, {model.num_params() / 1e6:.2f}M parameters, {json.dumps(config_dict(config))}")
    print(f"config: {json.dumps(vars(args))}")
    return model, optimizer, scaler, step, best_val, trained_s, seen


def load_splits(args, meta, block_size, aux=False):
    """The train and val splits -> (train, val, rows per micro-batch); prints what a
    row holds and how much of a batch is padding. aux: the model has aux heads (the
    training split then brings their targets)."""
    try:
        train = Split(args.data_dir, "train", block_size, args.share_prefix, meta["special_tokens"]["<|user|>"],
                      args.max_examples, args.pack, args.seed, aux=aux)
        val = Split(args.data_dir, "val", block_size, aux=False)
    except DataDirError as e:
        die(str(e))
    # --batch_size counts examples; a shared-prefix or packed row holds several
    rows_per_batch = max(1, round(args.batch_size * len(train) / train.n_examples))
    held = "" if len(train) == train.n_examples else \
        f"; {len(train)} rows of {train.n_examples / len(train):.2f} examples on average, {rows_per_batch} rows per batch"
    print(f"data: {args.data_dir}: {train.n_examples} train / {len(val)} val examples"
          + (f" ({train.n_dropped} longer than block_size skipped)" if train.n_dropped else "") + held)
    pad = padding_fraction(train, rows_per_batch, args.length_window, args.seed)
    print(f"padding: {pad:.1%} of the batch tokens (first 20 batches, length_window {args.length_window})")
    return train, val, rows_per_batch


if __name__ == "__main__":
    main()
