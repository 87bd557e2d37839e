"""train.py and distill.py under torchrun: 2 CPU processes over gloo train the
same weights as 1 process drawing the same global batch (2 processes x
grad_accum 2 = 1 process x grad_accum 4), and a 2-process run resumes from
last.pt exactly. Each torchrun launch costs ~10 s (three Python + torch
start-ups), so the tests share their runs."""

import os
import subprocess
import sys

import pytest
import torch

import distill
import train
from conftest import MICRO, ROOT

COMMON = ["--preset", "tiny", *MICRO, "--max_steps", "4", "--batch_size", "4", "--eval_interval", "100",
          "--eval_batches", "1", "--log_interval", "1", "--warmup_steps", "2", "--device", "cpu"]


def torchrun(script, *args, nproc=2):
    """Run script under torchrun with nproc CPU processes; fails the test on a non-zero exit."""
    # one thread per process: two processes on a 2-core machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(nproc), script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def weights(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def losses(out):
    return [float(line.split("| loss ")[1].split(" ")[0]) for line in open(os.path.join(out, "log.txt"))
            if line.startswith("step ")]


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max().item())


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    """The reference (1 process, grad_accum 4, in-process) and a 2-process run
    with grad_accum 2 (so the no_sync micro-steps are exercised too)."""
    base = tmp_path_factory.mktemp("ddp")
    one, two = str(base / "one"), str(base / "two")
    train.main(["--data_dir", toy_data, "--out_dir", one, *COMMON, "--grad_accum", "4"])
    torchrun("train.py", "--data_dir", toy_data, "--out_dir", two, *COMMON, "--grad_accum", "2")
    return one, two


def test_two_processes_train_what_one_process_trains_on_the_same_global_batch(runs):
    one, two = runs
    a, b = weights(one), weights(two)
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["step"] == b["step"] == 4
    # the bare model's state_dict: no "module." prefix from the DDP wrapper
    assert not any(k.startswith(("module.", "model.")) for k in b["model"])
    assert_same_weights(a["model"], b["model"])
    # the logged loss is the global batch's, and rank 0 alone writes the log
    assert losses(two) == pytest.approx(losses(one), rel=1e-5) and len(losses(two)) == 4
    log = open(os.path.join(two, "log.txt")).read()
    assert log.count("val step 4 |") == 1


def test_two_process_run_resumes_from_last_checkpoint(runs, toy_data, tmp_path):
    _, two = runs
    part = str(tmp_path / "part")
    torchrun("train.py", "--data_dir", toy_data, "--out_dir", part, *COMMON, "--grad_accum", "2", "--stop_at", "2")
    assert weights(part)["step"] == 2
    torchrun("train.py", "--data_dir", toy_data, "--out_dir", part, *COMMON, "--grad_accum", "2", "--resume")
    assert weights(part)["step"] == 4
    assert_same_weights(weights(two)["model"], weights(part)["model"])
    # the tokens trained on carry over a resume (compute curves read them)
    assert weights(part)["train_tokens"] == weights(two)["train_tokens"] > 0
    assert "resumed from" in open(os.path.join(part, "log.txt")).read()


def test_distill_under_two_processes_matches_one(toy_data, toy_ckpt, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    kd = ["--data_dir", toy_data, *COMMON, "--teacher", toy_ckpt, "--mode", "soft", "--max_steps", "2"]
    distill.main([*kd, "--out_dir", one, "--grad_accum", "2"])
    torchrun("distill.py", *kd, "--out_dir", two)
    a, b = weights(one), weights(two)
    assert b["world_size"] == 2 and b["distill"]["mode"] == "soft"
    assert_same_weights(a["model"], b["model"])
