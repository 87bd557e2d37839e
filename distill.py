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
(--preset, --max_steps, --lr, --share_prefix, --pack,
--max_examples, --resume, ...): both modes run train.py's loop (train.run),
soft mode with its loss swapped, hard mode on the data dir it wrote. It runs
under torchrun as train.py does (each rank holds its own copy of the teacher;
in hard mode rank 0 decodes the answers while the others wait):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 distill.py --device cpu --teacher out/small/best.pt
"""

import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import train
import wire
from datadir import DataDirError, load_meta, read_jsonl, write_jsonl, write_tokens
from model import CheckpointError, load_checkpoint
from runtime import die, init_distributed, pick_device


def parse_args(argv=None):
    p = train.arg_parser(__doc__)
    p.set_defaults(out_dir="out/distill")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (required for --mode soft)")
    p.add_argument("--mode", choices=["soft", "hard"], default="soft")
    p.add_argument("--T", type=float, default=4.0, help="softmax temperature of the soft term")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the soft (KL) term")
    p.add_argument("--beta", type=float, default=0.3, help="weight of the hard (gold cross-entropy) term")
    p.add_argument("--teacher_max_new_tokens", type=int, default=128, help="hard mode: longest answer decoded")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "soft" and not args.teacher:
        die("--mode soft needs --teacher CKPT")
    if args.T <= 0:
        die("--T must be positive")
    try:
        meta = load_meta(args.data_dir)
    except DataDirError as e:
        die(str(e))
    kd = {"distill": {"mode": args.mode, "teacher": args.teacher, "T": args.T, "alpha": args.alpha,
                      "beta": args.beta}}
    if args.mode == "soft":
        teacher, tckpt = load_teacher(args.teacher, meta, "cpu")
        student = train.model_config(args, meta)
        if teacher.config.block_size < student.block_size:
            die(f"the teacher's context ({teacher.config.block_size}) is shorter than the student's "
                f"({student.block_size}); pass --block_size {teacher.config.block_size}")
        print(f"teacher: {args.teacher}, {teacher.num_params() / 1e6:.2f}M parameters, "
              f"{json.dumps(tckpt['model_config'])}")
        train.run(args, loss=soft_loss(teacher, args), name="student", ckpt_extra=kd)
        return
    if args.teacher:
        # the student trains on the teacher's answers, written as a data dir of
        # their own. Rank 0 decodes them; under torchrun the others wait for it
        # (the process group's timeout is 30 min: decode a long set in a single
        # process first, the answers are cached)
        rank, world, device = init_distributed(pick_device(args.device)[0])
        if rank == 0:
            prepare_hard(args, meta, device)
        if world > 1:
            dist.barrier()
        args.data_dir = os.path.join(args.out_dir, "data")
        args.max_examples = 0
    train.run(args, name="student", ckpt_extra=kd)


# -----------------------------------------------------------------------------
# soft mode

def soft_loss(teacher, args):
    """train.run's loss for soft KD: the frozen teacher's logits at the same
    answer positions, then kd_loss."""
    def loss(logits, y, m, x, sel, layout, seg):
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            t_logits = teacher(x, layout=layout, sel=sel, seg=seg)
        value, kl, ce = kd_loss(logits, t_logits, y[sel], m[sel], args.T, args.alpha, args.beta)
        return value, {"kl": kl.item(), "ce": ce.item()}
    return loss


def kd_loss(student_logits, teacher_logits, targets, weights, T, alpha, beta):
    """Soft KD on answer positions: (N, V) logits, (N,) targets and weights ->
    (loss, kl, ce). Everything in float32: a softmax at temperature T of bf16
    logits loses the small probabilities the soft term is about."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
                  reduction="none").sum(-1)                  # KL(teacher || student) per position
    w = weights.float()
    kl = (kl * w).sum() / w.sum()
    ce = train.weighted_ce(s, targets, w)
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

def prepare_hard(args, meta, device):
    """Teacher answers for the training prompts -> out_dir/data; returns its path."""
    from sample import Router
    examples = read_jsonl(os.path.join(args.data_dir, "train.jsonl"))
    if args.max_examples:
        examples = examples[:args.max_examples]
    try:
        router = Router(args.teacher, args.data_dir, device)
    except CheckpointError as e:
        die(str(e))
    os.makedirs(args.out_dir, exist_ok=True)
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
    max_len = load_meta(src)["args"].get("max_len", 512)
    kept, _, _ = write_tokens(sp, kept, dst, "train", max_len)
    write_jsonl(os.path.join(dst, "train.jsonl"), kept)
    return len(kept), bad


if __name__ == "__main__":
    main()
