"""
Equal-time ablations: train a named set of variants on the same data with the
same budget, one after another, evaluate each, and write one table and one plot.

    python utils/ablate.py --variants base,prefix_lm --minutes 10 \\
        --train_args "--preset tiny --data_dir data/demo"                  # 2 runs: ~2 x 11 min + eval
    python utils/ablate.py --minutes 30 --seeds 1337,1338 --curve 4 --eval_limit 200 \\
        --train_args "--preset small --data_dir data/demo" \\
        --apibank evaldata/apibank/level-1-api.json \\
        --when2call evaldata/when2call/when2call_test_llm_judge.jsonl    # every variant of the file, 2 seeds
    python utils/ablate.py --steps 3000 --variants base,copy --train_args "--preset tiny"   # equal steps, not time
    python utils/ablate.py --minutes 10 --variants base,copy --dry_run     # print the plan and the commands only

Variants are named lists of train.py flags in a JSON file (--flags, default
experiments/levers.json), e.g. {"base": [], "copy": ["--copy_head"]}; keys that
start with "_" are notes, not variants. --variants a,b picks some (default: all).
Flags every run shares go in --train_args (--preset, --data_dir, --batch_size,
...); --seeds repeats every variant once per seed (train.py --seed).

The budget is one of:
  --minutes M   equal wall-clock time: each run gets train.py --max_minutes M (the
                training loop with its evaluations; not the start-up or the final
                evaluation). The learning rate is a cosine over --max_steps, so each run first
                trains --probe_steps steps in a scratch dir (its step time and the
                cost of one evaluation, measured on this machine under its current
                load) and gets the --max_steps that fill M minutes; the table shows
                the steps reached / planned. Timings only compare when the machine
                is as busy for every run.
  --steps N     equal steps: each run gets --max_steps N and no time limit, i.e. the
                same number of training examples (the table says so).
Run it on an otherwise idle machine: with another job on the 2 cores, torch's
threads contend and a step can take many times longer (a micro model measured
~30x slower), so neither the probe nor the budget means much. The load average
before each probe is printed and stored in plan.json.

Runs go one at a time (training takes the whole CPU), each in
<out_dir>/<variant>-s<seed>/ (train.py's log.txt, best.pt, last.pt; train.out with
its output; plan.json, trained.json, result.json; eval_*.json from eval.py). Then
best.pt is scored by eval.py on the data dir's test split (seen / unseen tools; --split val
scores the val split instead, to choose settings) and,
if given, API-Bank level-1 and When2Call; --eval_limit N scores the first N items of
each test split and of each external set. --curve K also keeps the model at K
evaluations spread over the run (ckpt_<step>.pt, without optimizer state) and scores
each on the test split, for exact match against training minutes.

Writes, after every run (so a partial ablation has a partial table):
    <out_dir>/ablation.md    the table: one row per run, a mean +- sd row per variant
                             over its seeds
    <out_dir>/ablation.png   val loss, seen exact and unseen exact against training
                             minutes, one line per variant (mean over seeds)
    <out_dir>/ablation.json  all of it: settings, plans, timings, every number
(<out_dir> defaults to out/ablate/<name>, <name> to the flags file's name.)

Stopping and continuing: Ctrl-C (or SIGTERM, e.g. `kill <pid>` of a background
run) is passed to the running train.py, which finishes its step, saves last.pt and
exits. Run the same command again: finished runs are skipped, a half-trained run
resumes from its last.pt with the time it has left, and a run whose training
finished only runs the evaluations it lacks (so adding --apibank later scores only
that). Changing the training settings for the same <out_dir> is refused: use
another --out_dir.
"""

import argparse
import contextlib
import fcntl
import glob
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from anywhere: the project's modules live one folder up
import wire  # noqa: E402
from runtime import die  # noqa: E402

POLL_S = 1.0          # how often the harness looks at a running train.py (log, last.pt)
PROGRESS_S = 30.0     # at most one progress line per run this often
# flags the harness sets itself: in --train_args or a variant they would be overridden
# or break the comparison (one seed, budget and out dir per run)
HARNESS_FLAGS = {"out_dir": "each run gets a folder under ablate.py's --out_dir",
                 "max_steps": "the budget is ablate.py's --steps or --minutes",
                 "max_minutes": "the budget is ablate.py's --minutes", "resume": "resuming is automatic",
                 "stop_at": "not in an ablation", "seed": "use --seeds"}
# what a row of the table shows: (key, header, kind); a column no run has is left out
# (seen / unseen tools for a compiled catalogue, the intent/slot scores for others)
COLUMNS = [("steps", "steps", "steps"), ("minutes", "min", "min"), ("val_loss", "val loss", "loss"),
           ("exact", "exact", "rate"), ("multi_exact", "multi-call exact", "rate"),
           ("sentence_acc", "sentence acc", "rate"), ("intent_acc", "intent acc", "rate"), ("slot_f1", "slot F1", "rate"),
           ("seen_exact", "seen exact", "rate"), ("unseen_exact", "unseen exact", "rate"),
           ("false_call", "false call", "rate"), ("valid", "valid", "rate"),
           ("apibank_exact", "API-Bank exact", "rate"), ("when2call_acc", "When2Call decision", "rate")]


class AblateError(ValueError):
    """A problem with the input the user can fix: reported in one line."""


class RunFailed(RuntimeError):
    """One run's train.py or eval.py failed: reported, and the next run goes on."""


# -----------------------------------------------------------------------------
# input: variants, seeds, train.py flags

def load_variants(path):
    """The flags file -> {name: [train.py flags]} in file order."""
    spec = wire.read_json(path, AblateError)
    if not isinstance(spec, dict):
        raise AblateError(f"{path}: must be a JSON object {{\"name\": [\"--flag\", ...], ...}}")
    variants = {}
    for name, flags in spec.items():
        if name.startswith("_"):   # a note ("_doc": ...): JSON has no comments
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise AblateError(f"{path}: variant name {name!r} must be letters, digits, _ . + - (it names a folder)")
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise AblateError(f"{path}: variant {name!r} must be a list of strings, e.g. [\"--muon_lr\", "
                              f"\"0.04\"]")
        variants[name] = flags
    if not variants:
        raise AblateError(f"{path}: no variants in it")
    return variants


def pick_variants(variants, names):
    """--variants a,b (None: all) -> {name: flags} in the order asked for."""
    if not names:
        return dict(variants)
    picked = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    unknown = [n for n in picked if n not in variants]
    if unknown:
        raise AblateError(f"unknown variant{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                          f"the flags file has: {', '.join(variants)}")
    if not picked:
        raise AblateError("--variants names none")
    return {n: variants[n] for n in picked}


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AblateError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 1337,1338") from None
    if not seeds:
        raise AblateError("--seeds names none")
    return list(dict.fromkeys(seeds))


def parse_train_flags(flags, what):
    """train.py's own parser on these flags -> its args, or AblateError with its
    complaint: a typo in a variant is caught now, not an hour into the ablation."""
    import train
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return train.arg_parser().parse_args(flags)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        why = lines[-1].split("error: ", 1)[-1] if lines else "not accepted"
        raise AblateError(f"{what}: train.py does not take {shlex.join(flags)!r}: {why}") from None


def check_train_flags(common, variants):
    """Parse the shared flags and each variant's on top -> (shared args, {variant:
    args}). Refuses the flags the harness sets itself, and a variant that changes
    the data."""
    import train
    defaults = vars(train.arg_parser().parse_args([]))
    base = parse_train_flags(common, "--train_args")
    parsed = {}
    for what, name, flags in [("--train_args", None, [])] + [(f"variant {n}", n, f) for n, f in variants.items()]:
        got = parse_train_flags(common + flags, what)
        for key, why in HARNESS_FLAGS.items():
            if getattr(got, key) != defaults[key]:
                raise AblateError(f"{what}: --{key} is set by ablate.py ({why})")
        if got.data_dir != base.data_dir:
            raise AblateError(f"{what}: changes --data_dir; every variant trains on the same data "
                              "(set it once in --train_args)")
        if name is not None:
            parsed[name] = got
    return base, parsed


# -----------------------------------------------------------------------------
# the budget: steps that fill the minutes

STEP_LINE = re.compile(r"^step (\d+) \|.*\| dt (\d+)ms")
VAL_LINE = re.compile(r"^val step (\d+) \| val_loss ([-+0-9.eE]+|nan|inf)")
RESUMED_LINE = re.compile(r"^resumed from .* at step (\d+)")


def probe_timing(lines, val_step, skip=5):
    """A probe's log (logged every step, one evaluation at the top of step
    val_step) -> (seconds per step, seconds per evaluation). The first `skip` steps
    are left out (allocation and first-call costs: measured up to 2x slower on a
    micro model). The evaluation (val batches and the best.pt / last.pt writes)
    lands in the dt of step val_step + 1; the probe puts it last, as the steps
    just after one are slow too."""
    dts = {}
    for line in lines:
        m = STEP_LINE.match(line)
        if m:
            dts[int(m.group(1))] = int(m.group(2)) / 1000
    plain = [dt for s, dt in dts.items() if s > skip and s != val_step + 1]
    if len(plain) < 2 or val_step + 1 not in dts:
        raise RunFailed(f"timing probe: too few logged steps ({len(dts)}); raise --probe_steps")
    step_s = max(statistics.mean(plain), 1e-3)   # dt is logged in whole ms
    return step_s, max(0.0, dts[val_step + 1] - step_s)


def steps_for_budget(minutes, step_s, val_s, eval_interval, curve=0):
    """The --max_steps that make a run of step_s per step, plus val_s per
    evaluation, take `minutes`: the cosine schedule then ends at the budget.
    train.py evaluates at every eval_interval steps inside the loop; with --curve K
    the interval is chosen so there are K - 1 of those (the K-th is the final one,
    after the loop, which the time limit does not cover)."""
    budget = 60 * minutes
    if curve:
        steps = (budget - (curve - 1) * val_s) / step_s
    else:
        steps = budget / (step_s + val_s / eval_interval)
    return max(1, int(steps))


def curve_interval(max_steps, curve):
    """--eval_interval for K evaluations over the run (K-1 in the loop + the final)."""
    return max(1, math.ceil(max_steps / curve))


def read_log_times(path):
    """train.py's log.txt -> val curve [(minutes, val_loss, step)], the minutes
    being the training time summed from each line's dt (ms per step since the
    previous line; evaluations inside the loop included, as in train_seconds).
    After a resume the time goes back to the checkpoint's step: the steps lost
    after it were redone."""
    at, val = {0: 0.0}, {}
    prev, t = 0, 0.0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if m := RESUMED_LINE.match(line):
                prev = int(m.group(1))
                t = at[max(s for s in at if s <= prev)]
            elif m := STEP_LINE.match(line):
                step = int(m.group(1))
                t += int(m.group(2)) / 1000 * (step - prev)
                prev, at[step] = step, t
            elif m := VAL_LINE.match(line):
                val[int(m.group(1))] = (t / 60, float(m.group(2)))
    return [(mins, loss, step) for step, (mins, loss) in sorted(val.items())]


# -----------------------------------------------------------------------------
# files

def write_json(path, obj):
    """Atomically (temp + rename): a Ctrl-C never leaves half a result behind."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    return wire.read_json(path, AblateError)


def test_subset(test_file, n, out_path):
    """The first n items of each split (seen / unseen) of a test file -> out_path.
    (eval.py --limit takes the first n of the file, which are all seen tools.)"""
    kept, per = [], {}
    with open(test_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                split = json.loads(line).get("split", "seen")
                if per.get(split, 0) < n:
                    per[split] = per.get(split, 0) + 1
                    kept.append(line if line.endswith("\n") else line + "\n")
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, out_path)
    return per


def ckpt_info(path):
    """step, seconds of training and best val loss stored in a checkpoint."""
    import torch
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return {"step": ck["step"], "seconds": ck.get("train_seconds", 0.0), "best_val": ck.get("best_val")}


def keep_snapshots(run_dir):
    """snap_*.pt (full copies of last.pt taken during training) -> ckpt_<step>.pt
    without the optimizer state (AdamW's two moments are twice the model;
    eval.py needs the model only) -> [{step, seconds, path}] of all kept checkpoints, by step."""
    import torch
    from model import save_checkpoint
    for snap in sorted(glob.glob(os.path.join(run_dir, "snap_*.pt"))):
        ck = torch.load(snap, map_location="cpu", weights_only=True)
        ck.pop("optimizer", None)
        save_checkpoint(ck, os.path.join(run_dir, f"ckpt_{ck['step']}.pt"))
        os.remove(snap)
    kept = []
    for path in glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        info = ckpt_info(path)
        kept.append({"step": info["step"], "seconds": info["seconds"], "path": path})
    return sorted(kept, key=lambda k: k["step"])


# -----------------------------------------------------------------------------
# running train.py and eval.py

def run_child(cmd, out_path, every=None, pass_fds=()):
    """Run cmd with its output appended to out_path -> exit status; every() is
    called about once a second while it runs. It gets its own session, so a Ctrl-C
    in the terminal reaches this process alone, which passes exactly one SIGTERM on
    (train.py: finish the step, save last.pt, exit; a second one quits at once).
    SIGTERM, not SIGINT: a run started in the background (nohup, &) ignores SIGINT,
    and so does train.py then (runtime.catch_stop_signals)."""
    with open(out_path, "a", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=pass_fds, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while True:
            try:
                return proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if every:
                    every()
    except BaseException:   # Ctrl-C, SIGTERM, or an error in every(): never leave it running
        while proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            except KeyboardInterrupt:
                continue   # a second Ctrl-C: one more SIGTERM, train.py then quits at once
        raise


def last_lines(path, n=1):
    """The last n non-empty lines of a child's output (why it failed)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [l.rstrip() for l in f if l.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])


class Watch:
    """Called about once a second while train.py runs. Prints a progress line
    when an evaluation appears in log.txt (at most one per PROGRESS_S), and with
    keep=True links each new last.pt as snap_<n>.pt: train.py writes last.pt at
    every evaluation by renaming a new file over it (model.save_checkpoint), so a
    hard link keeps the old content for free and is never half written."""

    def __init__(self, run_dir, label, max_steps, keep):
        self.dir, self.label, self.max_steps, self.keep = run_dir, label, max_steps, keep
        self.log = os.path.join(run_dir, "log.txt")
        self.last = os.path.join(run_dir, "last.pt")
        self.offset = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        self.inode = self._inode(self.last)   # a last.pt from before a resume is not new
        self.n = max([int(re.sub(r"\D", "", os.path.basename(p))) for p in
                      glob.glob(os.path.join(run_dir, "snap_*.pt"))], default=0)   # a resume goes on counting
        self.t0, self.shown = time.time(), 0.0

    @staticmethod
    def _inode(path):
        try:
            return os.stat(path).st_ino
        except FileNotFoundError:
            return None

    def __call__(self, final=False):
        if self.keep and self._inode(self.last) not in (None, self.inode):
            self.n += 1
            snap = os.path.join(self.dir, f"snap_{self.n}.pt")
            try:
                os.link(self.last, snap)
            except OSError:   # no hard links on this file system: copy (an open file stays whole)
                shutil.copyfile(self.last, snap)
            self.inode = self._inode(self.last)
        if not os.path.exists(self.log):
            return
        with open(self.log, "rb") as f:
            start = min(self.offset, os.path.getsize(self.log))
            f.seek(start)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]   # whole lines only; the rest next time
        self.offset = start + len(data)
        vals = [m for m in map(VAL_LINE.match, data.decode("utf-8", "replace").splitlines()) if m]
        if vals and (final or time.time() - self.shown >= PROGRESS_S):
            self.shown = time.time()
            print(f"  {self.label}: step {vals[-1].group(1)}/{self.max_steps} | val_loss {vals[-1].group(2)} | "
                  f"{(time.time() - self.t0) / 60:.1f} min", flush=True)


# -----------------------------------------------------------------------------
# one run: plan, train, evaluate

class Run:
    def __init__(self, variant, flags, seed, out_dir):
        self.variant, self.flags, self.seed = variant, flags, seed
        self.name = f"{variant}-s{seed}"
        self.dir = os.path.join(out_dir, self.name)

    def path(self, name):
        return os.path.join(self.dir, name)


def train_cmd(cfg, run, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *cfg.common, *run.flags, "--seed", str(run.seed),
            *extra]


def run_settings(cfg, run):
    """What makes two runs the same run: checked before one is continued."""
    return {"train_flags": cfg.common + run.flags, "seed": run.seed, "budget": cfg.budget, "curve": cfg.curve}


def make_plan(cfg, run, log):
    """-> {settings, max_steps, eval_interval, probe}; --minutes: a timing probe first."""
    plan = {"settings": run_settings(cfg, run), "probe": None}
    eval_interval = cfg.variant_args[run.variant].eval_interval
    if "steps" in cfg.budget:
        plan["max_steps"] = cfg.budget["steps"]
    else:
        pdir = run.path("probe")
        shutil.rmtree(pdir, ignore_errors=True)
        load = os.getloadavg()[0]
        if load > 0.5:
            # another process on the cores slows every step, and by more than its share
            # when torch's threads contend for them: the probe times that state
            log(f"  note: load average {load:.1f} on {os.cpu_count()} cores before the probe; the step time "
                "measured now holds only if the load stays the same")
        val_step = cfg.probe_steps - 1   # one evaluation, at the top of the last step
        log(f"  timing probe: {cfg.probe_steps} steps")
        code = run_child(train_cmd(cfg, run, "--out_dir", pdir, "--max_steps", str(cfg.probe_steps),
                                   "--log_interval", "1", "--eval_interval", str(val_step)),
                         run.path("probe.out"), pass_fds=cfg.fds)
        if code != 0:
            raise RunFailed(f"timing probe: train.py exited with status {code}: {last_lines(run.path('probe.out'))} "
                            f"(all of it: {run.path('probe.out')})")
        with open(os.path.join(pdir, "log.txt"), encoding="utf-8") as f:
            step_s, val_s = probe_timing(f, val_step)
        shutil.rmtree(pdir, ignore_errors=True)
        plan["max_steps"] = steps_for_budget(cfg.budget["minutes"], step_s, val_s, eval_interval, cfg.curve)
        plan["probe"] = {"steps": cfg.probe_steps, "step_ms": 1000 * step_s, "eval_s": val_s, "load_avg": load}
        log(f"  {1000 * step_s:.0f} ms/step, {val_s:.1f} s per evaluation -> --max_steps {plan['max_steps']} "
            f"for {cfg.budget['minutes']:g} min")
    plan["eval_interval"] = curve_interval(plan["max_steps"], cfg.curve) if cfg.curve else eval_interval
    return plan


def old_plan(cfg, run):
    """The plan.json of an earlier start of this run (None: none), refused if it
    was made with other settings: its steps and checkpoints would be mixed in."""
    if not os.path.exists(run.path("plan.json")):
        return None
    plan = read_json(run.path("plan.json"))
    if plan.get("settings") != run_settings(cfg, run):
        raise AblateError(f"{run.dir} holds a run with other settings ({json.dumps(plan.get('settings'))}); "
                          "use another --out_dir, or remove that folder")
    return plan


def train_stage(cfg, run, log):
    """Plan (or reuse the plan), train (or resume), -> trained.json's content."""
    os.makedirs(run.dir, exist_ok=True)
    plan = old_plan(cfg, run)
    if plan is None:
        plan = make_plan(cfg, run, log)
        write_json(run.path("plan.json"), plan)
    if os.path.exists(run.path("trained.json")):
        return plan, read_json(run.path("trained.json"))

    extra = ["--out_dir", run.dir, "--max_steps", str(plan["max_steps"])]
    if cfg.curve:
        extra += ["--eval_interval", str(plan["eval_interval"])]
    minutes = cfg.budget.get("minutes")
    if os.path.exists(run.path("last.pt")):
        # train.py's --max_minutes counts from its own start: give it what is left
        done = ckpt_info(run.path("last.pt"))
        extra.append("--resume")
        if minutes:
            # (a tiny positive budget, not 0 = no limit: it stops at once and evaluates)
            minutes = max(minutes - done["seconds"] / 60, 1e-6)
        log(f"  resuming from step {done['step']} ({done['seconds'] / 60:.1f} min trained)")
    elif os.path.exists(run.path("log.txt")):
        os.remove(run.path("log.txt"))   # a run that died before its first checkpoint: start clean
    if minutes:
        extra += ["--max_minutes", f"{minutes:.6g}"]
    log(f"  training: {shlex.join(cfg.common + run.flags)} --seed {run.seed} --max_steps {plan['max_steps']}"
        + (f" --max_minutes {minutes:.6g}" if minutes else "") + f" (output: {run.path('train.out')})")
    watch = Watch(run.dir, run.name, plan["max_steps"], keep=cfg.curve > 0)
    code = run_child(train_cmd(cfg, run, *extra), run.path("train.out"), every=watch, pass_fds=cfg.fds)
    if code != 0:
        raise RunFailed(f"train.py exited with status {code}: {last_lines(run.path('train.out'))} "
                        f"(all of it: {run.path('train.out')})")
    watch(final=True)

    last, best = ckpt_info(run.path("last.pt")), ckpt_info(run.path("best.pt"))
    val_curve = read_log_times(run.path("log.txt"))
    trained = {"steps": last["step"], "max_steps": plan["max_steps"], "seconds": last["seconds"],
               "best_step": best["step"], "best_seconds": best["seconds"], "best_val": last["best_val"],
               "val_loss": val_curve[-1][1] if val_curve else None, "val_curve": val_curve,
               "snapshots": keep_snapshots(run.dir) if cfg.curve else []}
    write_json(run.path("trained.json"), trained)
    return plan, trained


def evaluate(cfg, run, ckpt, tag, kind, path, limit):
    """eval.py on one checkpoint and set (cached in its result file) -> its JSON."""
    out = run.path(f"eval_{tag}_{kind}" + (f"_n{limit}" if limit else "") + ".json")
    if not os.path.exists(out):
        flag = "--test_file" if kind == "test" else f"--{kind}"
        cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", ckpt, flag, path, "--out", out,
               *(["--limit", str(limit)] if limit and kind != "test" else []), *cfg.eval_args]
        code = run_child(cmd, os.path.splitext(out)[0] + ".out", pass_fds=cfg.fds)
        if code != 0 or not os.path.exists(out):
            raise RunFailed(f"eval.py on {ckpt} ({kind}) exited with status {code}: "
                            f"{last_lines(os.path.splitext(out)[0] + '.out')}")
    return read_json(out)


def eval_stage(cfg, run, plan, trained, log):
    """best.pt on every set, the --curve checkpoints on the test split -> the result row."""
    best = run.path("best.pt")
    # one model per step: best.pt is the same model as the snapshot of its step
    points = {s["step"]: (s["path"], s["seconds"]) for s in trained["snapshots"]}
    points[trained["best_step"]] = (best, trained["best_seconds"])
    log(f"  evaluating: {len(points)} checkpoint{'s' * (len(points) > 1)} on the test split"
        + "".join(f", best.pt on {k}" for k in ("apibank", "when2call") if getattr(cfg, k)))
    curve = []
    for step, (ckpt, seconds) in sorted(points.items()):
        res = evaluate(cfg, run, ckpt, f"step{step}", "test", cfg.test_file, cfg.eval_limit)
        g = res["groups"]
        curve.append({"step": step, "minutes": seconds / 60, "exact": g["all"].get("exact"),
                      "sentence_acc": res.get("sentence_acc"),
                      "seen_exact": g.get("seen", {}).get("exact"), "unseen_exact": g.get("unseen", {}).get("exact")})
    res = evaluate(cfg, run, best, f"step{trained['best_step']}", "test", cfg.test_file, cfg.eval_limit)
    own = res["groups"]
    row = {"variant": run.variant, "seed": run.seed, "dir": run.dir, "flags": run.flags,
           "steps": trained["steps"], "max_steps": trained["max_steps"], "minutes": trained["seconds"] / 60,
           "val_loss": trained["val_loss"], "best_val": trained["best_val"], "best_step": trained["best_step"],
           "exact": own["all"].get("exact"), "multi_exact": own.get("multi-call", {}).get("exact"),
           **{k: res.get(k) for k in ("sentence_acc", "intent_acc", "slot_f1")},
           "seen_exact": own.get("seen", {}).get("exact"), "unseen_exact": own.get("unseen", {}).get("exact"),
           "false_call": own["all"].get("false_call"), "valid": own["all"].get("valid"),
           "tool_acc": own["all"].get("tool_acc"), "arg_acc": own["all"].get("arg_acc"),
           "apibank_exact": None, "when2call_acc": None, "when2call_acc_fitting": None,
           "probe": plan["probe"], "eval_interval": plan["eval_interval"], "curve": curve,
           "val_curve": trained["val_curve"], "eval_settings": cfg.eval_settings}
    if cfg.apibank:
        row["apibank_exact"] = evaluate(cfg, run, best, "best", "apibank", cfg.apibank,
                                        cfg.eval_limit)["groups"]["all"].get("exact")
    if cfg.when2call:
        dec = evaluate(cfg, run, best, "best", "when2call", cfg.when2call, cfg.eval_limit).get("decisions") or {}
        row["when2call_acc"], row["when2call_acc_fitting"] = dec.get("accuracy"), dec.get("accuracy_fitting")
    return row


def finished(cfg, run):
    """The result row of a run finished earlier with these settings, or None."""
    if os.path.exists(run.path("result.json")) and old_plan(cfg, run):
        row = read_json(run.path("result.json"))
        if row.get("eval_settings") == cfg.eval_settings:
            return row
    return None


def do_run(cfg, run, log):
    """One run from wherever it stopped -> (its result row (result.json), whether
    anything was done for it now)."""
    row = finished(cfg, run)
    if row:
        log(f"  finished earlier: {run.path('result.json')}, skipped")
        return row, False
    plan, trained = train_stage(cfg, run, log)
    row = eval_stage(cfg, run, plan, trained, log)
    write_json(run.path("result.json"), row)
    log(f"  done: {row['steps']} steps in {row['minutes']:.1f} min, val loss {fmt(row['val_loss'], 'loss')}, "
        f"exact seen {fmt(row['seen_exact'], 'rate')} / unseen {fmt(row['unseen_exact'], 'rate')}")
    return row, True


# -----------------------------------------------------------------------------
# the table and the plot

def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "rate":
        return f"{100 * v:.1f}%"
    if kind == "loss":
        return f"{v:.4f}"
    if kind == "min":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def mean_sd(values, kind):
    """'mean +- sd' over seeds (sd in the column's unit), or the one value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(vals[0], kind)
    sd = statistics.stdev(vals)
    if kind == "rate":
        return f"{100 * statistics.mean(vals):.1f} ± {100 * sd:.1f}%"
    return f"{fmt(statistics.mean(vals), kind)} ± {fmt(sd, kind)}"


def by_variant(rows):
    out = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return out


def budget_text(budget, probe_steps):
    if "minutes" in budget:
        return (f"Equal wall-clock time: {budget['minutes']:g} min of training per run (train.py --max_minutes); "
                f"each run's --max_steps was set from a {probe_steps}-step timing probe so that its cosine "
                "schedule ends at the budget; 'steps' is reached / planned.")
    return (f"Equal steps: {budget['steps']:,} optimizer steps per run, so the same number of training "
            "examples, not the same time ('min' shows the time each took).")


def table_md(report):
    """The ablation.md text: settings, one row per run, a mean row per variant."""
    rows = [r for r in report["runs"] if "failed" not in r]
    columns = [c for c in COLUMNS if c[0] in ("steps", "minutes") or any(r.get(c[0]) is not None for r in rows)]
    lines = [f"# Ablation: {report['name']}", "",
             budget_text(report["budget"], report["probe_steps"]),
             f"Data: `{report['data_dir']}`; shared train.py flags: `{shlex.join(report['train_args']) or '(none)'}`.",
             f"Scored by eval.py: best.pt (lowest val loss) on {report['eval']['test_desc']}"
             + "".join(f", {name} ({report['eval']['limit_desc']})" for key, name in
                       (("apibank", "API-Bank level-1 exact"), ("when2call", "When2Call decision accuracy"))
                       if report["eval"][key]) + ".", "",
             "| variant | seed | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for variant, runs in by_variant(rows).items():
        for r in runs:
            cells = [fmt(r.get(k), kind) for k, _, kind in columns]
            if "minutes" in report["budget"]:
                cells[0] = f"{r['steps']:,} / {r['max_steps']:,}"
            lines.append(f"| {variant} | {r['seed']} | " + " | ".join(cells) + " |")
        if len(runs) > 1:
            lines.append(f"| **{variant}** | mean of {len(runs)} | "
                         + " | ".join(mean_sd([r.get(k) for r in runs], kind) for k, _, kind in columns) + " |")
    for r in report["runs"]:
        if "failed" in r:
            lines.append(f"| {r['variant']} | {r['seed']} | failed: {r['failed'].replace('|', '/')} |"
                         + " |" * (len(columns) - 1))
    lines += ["", "Variants (train.py flags on top of the shared ones):", ""]
    lines += [f"- `{name}`: `{shlex.join(flags) or '(none: the default)'}`"
              for name, flags in report["variants"].items()]
    lines += ["", "Mean rows: mean ± sample standard deviation over the seeds. When2Call: over all its items "
              "(ablation.json has the accuracy over the prompts that fit the context too). The plot: ablation.png.",
              ""]
    return "\n".join(lines)


def mean_curve(runs, key):
    """[(minutes, value)] averaged over seeds point by point (the k-th evaluation
    of each seed), cut to the shortest; points without the value are dropped."""
    curves = [[(p["minutes"], p[key]) for p in r["curve"] if p.get(key) is not None] for r in runs]
    n = min(len(c) for c in curves) if curves else 0
    return [(statistics.mean(c[i][0] for c in curves), statistics.mean(c[i][1] for c in curves)) for i in range(n)]


def plot(report, path):
    """ablation.png: val loss, seen exact and unseen exact against training
    minutes, one colour per variant (a compiled catalogue, which has no unseen
    tools: exact match and, on an intent/slot set, sentence accuracy)."""
    import matplotlib
    matplotlib.use("Agg")   # files only: works on a server without a display
    import matplotlib.pyplot as plt
    rows = [r for r in report["runs"] if "failed" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("seen_exact", "exact match, seen tools"), ("unseen_exact", "exact match, unseen tools")]
    if not any(p.get("seen_exact") is not None for r in rows for p in r["curve"]):
        panels = [("exact", "exact match"), ("sentence_acc", "sentence accuracy (intent and every slot)")]
    for i, (variant, runs) in enumerate(by_variant(rows).items()):
        color = f"C{i % 10}"
        for j, r in enumerate(runs):   # val loss: every seed, it has many points
            if r["val_curve"]:
                mins, losses, _ = zip(*r["val_curve"])
                axes[0].plot(mins, losses, color=color, lw=1.2, alpha=0.8, label=variant if j == 0 else None)
        for ax, (key, _) in zip(axes[1:], panels):
            pts = mean_curve(runs, key)
            if pts:
                ax.plot(*zip(*[(m, 100 * v) for m, v in pts]), color=color, marker="o", ms=4, lw=1.5,
                        label=variant + (f" (mean of {len(runs)})" if len(runs) > 1 else ""))
    for ax in axes[1:]:   # from 0%, with room above the best line
        top = max([y for line in ax.get_lines() for y in line.get_ydata()], default=0)
        ax.set_ylim(0, max(1.0, 1.1 * top))
    for ax, title, ylabel in ((axes[0], "val loss", "val loss (answer tokens)"),
                              (axes[1], panels[0][1], "%"), (axes[2], panels[1][1], "%")):
        ax.set_title(title)
        ax.set_xlim(left=0)
        ax.set_xlabel("training minutes")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    b = report["budget"]
    fig.suptitle(f"{report['name']}: " + (f"equal time, {b['minutes']:g} min per run" if "minutes" in b
                                          else f"equal steps, {b['steps']:,} per run"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cfg, rows):
    """ablation.md, .json and .png in the out dir, from the rows so far."""
    report = {"name": cfg.name, "budget": cfg.budget, "probe_steps": cfg.probe_steps, "curve": cfg.curve,
              "data_dir": cfg.base.data_dir, "train_args": cfg.common, "seeds": cfg.seeds,
              "variants": cfg.variants, "eval": cfg.eval_settings, "runs": rows,
              "means": {v: {k: statistics.mean(vals) for k, _, _ in COLUMNS
                            if (vals := [r.get(k) for r in runs if r.get(k) is not None])}
                        for v, runs in by_variant([r for r in rows if "failed" not in r]).items()}}
    write_json(os.path.join(cfg.out_dir, "ablation.json"), report)
    md = table_md(report)
    with open(os.path.join(cfg.out_dir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(md)
    plot(report, os.path.join(cfg.out_dir, "ablation.png"))
    return md


# -----------------------------------------------------------------------------
# main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", default=os.path.join("experiments", "levers.json"),
                   help="JSON file of variants: {name: [train.py flags]}")
    p.add_argument("--variants", default=None, help="comma-separated names from --flags (default: all)")
    p.add_argument("--train_args", default="",
                   help="train.py flags every run shares, in one string (a single flag: --train_args=--flag)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="equal wall-clock time: minutes of training per run")
    budget.add_argument("--steps", type=int, help="equal steps: optimizer steps per run (no time limit)")
    p.add_argument("--seeds", default="1337", help="comma-separated: every variant once per seed")
    p.add_argument("--probe_steps", type=int, default=120,
                   help="steps of the timing probe (--minutes); 30 read 88-142 ms for the same ~100 ms step "
                   "of the demo's recipe on a 2-core machine")
    p.add_argument("--curve", type=int, default=0, metavar="K",
                   help="also score K checkpoints spread over each run on the test split (0: best.pt only); "
                   "sets train.py's --eval_interval to max_steps / K")
    p.add_argument("--apibank", default=None, metavar="JSON", help="also score API-Bank level-1 (level-1-api.json)")
    p.add_argument("--when2call", default=None, metavar="JSONL",
                   help="also score When2Call (when2call_test_llm_judge.jsonl)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="the data dir's split to score: val to choose settings, test to report once")
    p.add_argument("--eval_limit", type=int, default=0,
                   help="score the first N items of each test split and external set (0: all)")
    p.add_argument("--eval_args", default="",
                   help="more eval.py flags, in one string (a single flag: --eval_args=--no_constrain)")
    p.add_argument("--name", default=None, help="the ablation's name (default: the flags file's name)")
    p.add_argument("--out_dir", default=None, help="default: out/ablate/<name>")
    p.add_argument("--dry_run", action="store_true", help="check the input, print the runs, train nothing")
    return p.parse_args(argv)


def configure(args):
    """Check all input before anything runs -> the settings every stage reads."""
    cfg = argparse.Namespace(**vars(args))
    if args.minutes is not None and args.minutes <= 0 or args.steps is not None and args.steps <= 0:
        raise AblateError("--minutes / --steps must be positive")
    if args.probe_steps < 10 or args.curve < 0 or args.eval_limit < 0:
        raise AblateError("--probe_steps must be at least 10, --curve and --eval_limit not negative")
    cfg.budget = {"minutes": args.minutes} if args.minutes is not None else {"steps": args.steps}
    cfg.variants = pick_variants(load_variants(args.flags), args.variants)
    cfg.seeds = parse_seeds(args.seeds)
    try:
        cfg.common, cfg.eval_args = shlex.split(args.train_args), shlex.split(args.eval_args)
    except ValueError as e:
        raise AblateError(f"--train_args / --eval_args: cannot split into flags ({e})") from None
    cfg.base, cfg.variant_args = check_train_flags(cfg.common, cfg.variants)
    data_dir = cfg.base.data_dir
    if not os.path.isdir(data_dir):
        raise AblateError(f"{data_dir}: no such data dir (make one: python data.py --out_dir {data_dir}; "
                          "or set --data_dir in --train_args)")
    for need in ("meta.json", f"{args.split}.jsonl"):
        if not os.path.isfile(os.path.join(data_dir, need)):
            raise AblateError(f"{data_dir}: no {need} here; not a data dir made by data.py")
    for flag in ("apibank", "when2call"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            raise AblateError(f"--{flag} {getattr(args, flag)}: no such file")
    cfg.name = args.name or os.path.splitext(os.path.basename(args.flags))[0]
    cfg.out_dir = args.out_dir or os.path.join("out", "ablate", cfg.name)
    cfg.test_file = os.path.join(data_dir, f"{args.split}.jsonl")
    n = args.eval_limit
    cfg.eval_settings = {"test_file": cfg.test_file, "eval_limit": n, "apibank": args.apibank,
                         "when2call": args.when2call, "eval_args": cfg.eval_args,
                         "test_desc": f"`{cfg.test_file}`" + (f" (first {n} items of each split)" if n else ""),
                         "limit_desc": f"first {n} items" if n else "all items"}
    cfg.runs = [Run(v, f, s, cfg.out_dir) for v, f in cfg.variants.items() for s in cfg.seeds]
    return cfg


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = configure(args)
    except AblateError as e:
        die(str(e))
    print(f"ablation {cfg.name}: {len(cfg.variants)} variant(s) x {len(cfg.seeds)} seed(s) = {len(cfg.runs)} runs, "
          f"one at a time, in {cfg.out_dir}")
    print(budget_text(cfg.budget, cfg.probe_steps))
    if args.dry_run:
        for run in cfg.runs:
            budget = f"--max_minutes {args.minutes:g} --max_steps <from the probe>" if args.minutes else \
                f"--max_steps {args.steps}"
            print(f"  {run.name}: {shlex.join(train_cmd(cfg, run, '--out_dir', run.dir))} {budget}")
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    # one ablation per out dir at a time; the lock is passed on to train.py / eval.py
    # so it also holds while an orphaned child (this process killed) still writes
    with open(os.path.join(cfg.out_dir, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            die(f"{cfg.out_dir}: another ablate.py (or a train.py it started) is running here")
        cfg.fds = (lock.fileno(),)
        failed = run_all(cfg)
    if failed:
        print(f"{failed} run(s) failed: see their rows", file=sys.stderr)
        sys.exit(1)


def run_all(cfg):
    """Every run in turn, the report rewritten after each -> how many failed."""
    if cfg.eval_limit:   # the first N of each split, as its own file (eval.py --limit would take only seen)
        whole = cfg.test_file
        cfg.test_file = os.path.join(cfg.out_dir, f"{os.path.basename(whole)[:-6]}_first{cfg.eval_limit}.jsonl")
        per = test_subset(whole, cfg.eval_limit, cfg.test_file)
        print(f"test split: {', '.join(f'{n} {s}' for s, n in per.items())} items in {cfg.test_file}")
    try:   # (other settings in this out dir are refused before anything runs)
        done = sum(finished(cfg, run) is not None for run in cfg.runs)
    except AblateError as e:
        die(str(e))
    if done:
        print(f"{done} of {len(cfg.runs)} runs finished earlier in {cfg.out_dir}: continuing where it stopped")

    def log(msg):
        print(msg, flush=True)

    # SIGTERM / SIGHUP go the way of Ctrl-C: the running train.py saves last.pt
    # first (one ignored on purpose, as under nohup, stays ignored)
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)
           if signal.getsignal(s) is not signal.SIG_IGN}
    rows, failed, current, md = [], 0, None, None
    try:
        for i, run in enumerate(cfg.runs, 1):
            current = run
            log(f"[{i}/{len(cfg.runs)}] {run.name} ({run.dir})")
            try:
                row, fresh = do_run(cfg, run, log)
            except RunFailed as e:
                log(f"  error: {run.name}: {e}")
                row, fresh = {"variant": run.variant, "seed": run.seed, "dir": run.dir, "failed": str(e)}, True
                failed += 1
            rows.append(row)
            # the report after every run that did something (a long ablation's table
            # grows as it goes); skipped ones only change it at the end
            md = write_report(cfg, rows) if fresh else None
    except KeyboardInterrupt:
        print(f"\ninterrupted during {current.name if current else 'start-up'}: what it had is saved "
              "(train.py's last.pt); run the same command again to continue (finished runs are skipped, "
              "this one resumes)", file=sys.stderr)
        if rows:
            write_report(cfg, rows)
        sys.exit(130)
    except AblateError as e:
        die(str(e))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print("\n" + (md or write_report(cfg, rows)))
    print(f"wrote {cfg.out_dir}/ablation.md, ablation.json, ablation.png")
    return failed


if __name__ == "__main__":
    main()
