"""
Knowledge distillation: a small student learns from a bigger model of ours.

    python distill.py --teacher out/small/best.pt --mode soft --out_dir out/kd_soft   # KL over the teacher's logits
    python distill.py --teacher out/small/best.pt --mode hard --out_dir out/kd_hard   # the teacher's greedy answers
    python distill.py --mode hard --data_dir data/gemini --out_dir out/kd_cloud       # a cloud teacher's labels

soft   loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + beta * CE(gold)
       in float32, on answer positions only (Hinton et al. 2015). Dividing the
       logits by T > 1 shows the student the teacher's second and third choices;
       T^2 keeps that term's gradients the same size whatever T is.
hard   sequence-level KD (Kim & Rush 2016): the teacher greedily decodes an
       answer for every training prompt (cached in out_dir/teacher_answers.jsonl,
       so an interrupted run resumes), a copy of the data dir is written with those
       answers, and the student trains on it with plain cross-entropy. Without
       --teacher, hard mode trains on the data dir's own labels: a cloud teacher's,
       if data.py --teacher made them.

The teacher is any checkpoint of ours (larger, deeper or wider than the student is
fine), loaded by the same helper as everywhere, frozen, in eval mode, never given
a gradient; it must share the student's tokenizer. Every train.py flag applies
(--preset, --max_steps, --lr, --share_prefix, --pack, --class_weights,
--max_examples, --resume, ...), and the loop below is train.py's, with the loss
swapped. It runs under torchrun as train.py does (each rank holds its own copy
of the teacher; in hard mode rank 0 decodes the answers while the others wait):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 distill.py --device cpu --teacher out/small/best.pt
"""

import json
import os
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import wire
from model import CheckpointError, load_checkpoint
from train import (Logger, arg_parser, batch_indices, catch_stop_signals, die, evaluate_loss, get_lr,
                   init_distributed, leave_distributed, load_meta, model_config, pick_device, pick_dtype, save_run, setup_run,
                   sum_over_ranks, to_device, training_module)


def parse_args(argv=None):
    p = arg_parser(__doc__)
    p.set_defaults(out_dir="out/distill")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (required for --mode soft)")
    p.add_argument("--mode", choices=["soft", "hard"], default="soft")
    p.add_argument("--T", type=float, default=4.0, help="softmax temperature of the soft term")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the soft (KL) term")
    p.add_argument("--beta", type=float, default=0.3, help="weight of the hard (gold cross-entropy) term")
    p.add_argument("--teacher_max_new_tokens", type=int, default=128, help="hard mode: longest answer decoded")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# the losses

def kd_loss(student_logits, teacher_logits, targets, weights, T, alpha, beta):
    """Soft KD on answer positions: (N, V) logits, (N,) targets and weights ->
    (loss, kl, ce). Everything in float32: a softmax at temperature T of bf16
    logits loses the small probabilities the soft term is about."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
                  reduction="none").sum(-1)                  # KL(teacher || student) per position
    ce = F.cross_entropy(s, targets, reduction="none")
    w = weights.float()
    kl, ce = (kl * w).sum() / w.sum(), (ce * w).sum() / w.sum()
    return alpha * T * T * kl + beta * ce, kl, ce


def load_teacher(path, meta, device):
    """A frozen teacher in eval mode; refuses one trained with another tokenizer."""
    try:
        teacher, ckpt = load_checkpoint(path, device, meta["tokenizer_sha256"])
    except CheckpointError as e:
        die(str(e))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), ckpt


# -----------------------------------------------------------------------------
# hard mode: the teacher's answers, cached, become a data dir

def teacher_answers(router, examples, cache_path, max_new_tokens):
    """Greedy answers of the teacher for examples (by index), appended to a JSONL
    cache as they come, so a rerun decodes only what is missing."""
    done = {}
    if os.path.isfile(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    done[rec["i"]] = rec["text"]
                except (json.JSONDecodeError, KeyError):
                    pass    # a line cut short by a crash: decode that one again
    todo = [i for i in range(len(examples)) if i not in done]
    if todo:
        with open(cache_path, "a", encoding="utf-8") as f:
            for i in tqdm(todo, desc="teacher answers", unit="ex", mininterval=1 if sys.stderr.isatty() else 15):
                ex = examples[i]
                ids = router.generate(router.encode_prompt(ex["tools"], ex["request"]), max_new_tokens)
                done[i] = router.sp.decode(ids)
                f.write(json.dumps({"i": i, "text": done[i]}, ensure_ascii=False) + "\n")
                f.flush()
    return [done[i] for i in range(len(examples))]


def write_hard_data(src, dst, examples, texts):
    """A copy of data dir src whose training answers are the teacher's. Answers
    that do not parse or validate are dropped and counted (the student should not
    learn them); val and test stay gold."""
    import sentencepiece as spm
    from data import write_jsonl, write_tokens
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.startswith("train"):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    kept, bad = [], 0
    for ex, text in zip(examples, texts):
        try:
            ans = wire.parse_answer(text, ex["tools"])
        except wire.AnswerError:
            bad += 1
            continue
        if wire.validate_answer(ans, ex["tools"]):
            bad += 1
            continue
        kept.append({**ex, "calls": ans["calls"], "reason": ans["reason"], "label": "teacher"})
    sp = spm.SentencePieceProcessor(model_file=os.path.join(dst, "tok.model"))
    with open(os.path.join(src, "meta.json"), encoding="utf-8") as f:
        max_len = json.load(f)["args"].get("max_len", 512)
    kept, _, _ = write_tokens(sp, kept, dst, "train", max_len)
    write_jsonl(os.path.join(dst, "train.jsonl"), kept)
    return len(kept), bad


def prepare_hard(args, meta, device):
    """Teacher answers for the training prompts -> out_dir/data; returns its path."""
    from sample import Router
    with open(os.path.join(args.data_dir, "train.jsonl"), encoding="utf-8") as f:
        examples = [json.loads(line) for line in f]
    if args.max_examples:
        examples = examples[:args.max_examples]
    try:
        router = Router(args.teacher, args.data_dir, device)
    except CheckpointError as e:
        die(str(e))
    texts = teacher_answers(router, examples, os.path.join(args.out_dir, "teacher_answers.jsonl"),
                            args.teacher_max_new_tokens)
    agree = sum(t == wire.render_answer(ex["calls"], ex["reason"]) for ex, t in zip(examples, texts))
    dst = os.path.join(args.out_dir, "data")
    n, bad = write_hard_data(args.data_dir, dst, examples, texts)
    if n == 0:
        die(f"none of the teacher's {len(texts)} answers parses and validates; is {args.teacher} trained?")
    print(f"teacher answers: {len(texts)}, equal to the gold answer {agree / len(texts):.1%}; "
          f"kept {n}, dropped {bad} that do not parse or validate -> {dst}")
    return dst


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.mode == "soft" and not args.teacher:
        die("--mode soft needs --teacher CKPT")
    if args.T <= 0:
        die("--T must be positive")
    meta = load_meta(args.data_dir)
    device, device_why = pick_device(args.device)
    rank, world, device = init_distributed(device)
    if rank > 0:
        sys.stdout = open(os.devnull, "w")   # rank 0 alone prints; errors still reach stderr
    dtype, dtype_why = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    log = Logger(args.out_dir, active=rank == 0)
    pad_id = meta["special_tokens"]["<|pad|>"]

    teacher = None
    if args.mode == "hard" and args.teacher:
        # the student trains on the teacher's answers; train's own data stays untouched.
        # Rank 0 decodes them and writes the data dir; the others wait for it (the
        # process group's timeout is 30 min: decode a long set in a single
        # process first, the answers are cached)
        if rank == 0:
            prepare_hard(args, meta, device)
        if world > 1:
            dist.barrier()
        args.data_dir = os.path.join(args.out_dir, "data")
        args.max_examples = 0
        meta = load_meta(args.data_dir)
    elif args.mode == "soft":
        teacher, tckpt = load_teacher(args.teacher, meta, device)
        print(f"teacher: {args.teacher}, {teacher.num_params() / 1e6:.2f}M parameters, "
              f"{json.dumps(tckpt['model_config'])}")

    config = model_config(args, meta)
    if teacher is not None and teacher.config.block_size < config.block_size:
        die(f"the teacher's context ({teacher.config.block_size}) is shorter than the student's "
            f"({config.block_size}); pass --block_size {teacher.config.block_size}")
    print(f"device: {device} ({device_why}); dtype: {dtype} ({dtype_why}); mode {args.mode}"
          + (f"; {world} processes ({dist.get_backend()}), global batch {args.batch_size} x {args.grad_accum} "
             f"x {world} examples" if world > 1 else ""))
    run = setup_run(args, meta, device, dtype, log, name="student")
    model, optimizer, scaler, ctx = run.model, run.optimizer, run.scaler, run.ctx
    train, val, last_path = run.train, run.val, run.last_path
    step, best_val = run.step, run.best_val
    net = training_module(model, device)   # the student's step, DDP-wrapped under torchrun
    if world > 1:
        torch.manual_seed(args.seed + rank)   # dropout masks differ between ranks
    kd = {"mode": args.mode, "teacher": args.teacher, "T": args.T, "alpha": args.alpha, "beta": args.beta}

    def checkpoint(path):
        if rank == 0:
            save_run(run, args, meta, path, step, best_val, distill=kd)

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
                val_loss = evaluate_loss(model, val, args, pad_id, device, ctx)   # gold cross-entropy, every rank
                if val_loss < best_val:
                    best_val = val_loss
                    checkpoint(os.path.join(args.out_dir, "best.pt"))
                checkpoint(last_path)
                log(f"val step {step} | val_loss {val_loss:.4f} | best {best_val:.4f}")

            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, kl_sum, ce_sum = 0.0, 0.0, 0.0
            for micro in range(args.grad_accum):
                idx = batch_indices(train, args.seed, step, rank * args.grad_accum + micro, run.rows_per_batch,
                                    args.length_window)
                x, y, m, layout = to_device(train.batch(idx, pad_id), device)
                sel = m > 0
                last = micro == args.grad_accum - 1
                with (net.no_sync() if world > 1 and not last else nullcontext()):   # all-reduce once per step
                    with ctx:
                        logits = net(x, sel, layout)
                        if teacher is None:   # hard: cross-entropy on the (teacher's) answer tokens
                            w = m[sel]
                            ce = (F.cross_entropy(logits, y[sel], reduction="none") * w).sum() / w.sum()
                            loss, kl = ce, torch.zeros(())
                        else:
                            with torch.no_grad():
                                t_logits = teacher.head(teacher.hidden(x, layout=layout)[sel])
                            loss, kl, ce = kd_loss(logits, t_logits, y[sel], m[sel], args.T, args.alpha, args.beta)
                        loss = loss / args.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.item()
                kl_sum += kl.item() / args.grad_accum
                ce_sum += ce.item() / args.grad_accum
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
                # the global batch's losses, all ranks' tokens
                loss_sum, kl_sum, ce_sum, tokens_since, examples_since = sum_over_ranks(
                    [loss_sum, kl_sum, ce_sum, tokens_since, examples_since], device)
                loss_sum, kl_sum, ce_sum = loss_sum / world, kl_sum / world, ce_sum / world
                log(f"step {step} | loss {loss_sum:.4f} | kl {kl_sum:.4f} | ce {ce_sum:.4f} | lr {lr:.2e} | "
                    f"dt {1000 * dt / steps_since:.0f}ms | tok/s {tokens_since / dt:,.0f} | "
                    f"ex/s {examples_since / dt:.1f}")
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
