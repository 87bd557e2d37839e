import os

import pytest
import torch

import train
from conftest import MICRO
from model import GPT, GPTConfig


def _run(data_dir, out, steps, extra=()):
    train.main(["--data_dir", data_dir, "--out_dir", out, "--preset", "tiny", *MICRO,
                "--max_steps", str(steps), "--batch_size", "4", "--eval_interval", "3",
                "--eval_batches", "1", "--log_interval", "1", "--warmup_steps", "2", *extra])


def test_resume_equals_uninterrupted_run(toy_data, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _run(toy_data, full, 6)
    # stop after 3 of 6 planned steps: same schedule, then resume to the end
    train.main(["--data_dir", toy_data, "--out_dir", part, "--preset", "tiny", *MICRO,
                "--max_steps", "6", "--batch_size", "4", "--eval_interval", "3",
                "--eval_batches", "1", "--log_interval", "1", "--warmup_steps", "2", "--stop_at", "3"])
    assert torch.load(os.path.join(part, "last.pt"), weights_only=True)["step"] == 3
    _run(toy_data, part, 6, ["--resume"])
    a = torch.load(os.path.join(full, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "last.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    log = open(os.path.join(part, "log.txt")).read()
    assert "resumed from" in log and "step 6 | loss" in log


def test_loss_falls_on_toy_data(toy_data, tmp_path):
    out = str(tmp_path / "o")
    _run(toy_data, out, 60, ["--lr", "1e-2", "--eval_interval", "100"])
    losses = [float(l.split("| loss ")[1].split(" ")[0]) for l in open(os.path.join(out, "log.txt"))
              if l.startswith("step ")]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


def test_auto_precision_is_fp32_on_cpu():
    assert train.pick_dtype("auto", "cpu")[0] == "float32"
    assert train.pick_dtype("bfloat16", "cpu")[0] == "bfloat16"


def test_lr_schedule_warms_up_then_decays():
    args = train.parse_args(["--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10", "--max_steps", "100"])
    lrs = [train.get_lr(s, args) for s in range(101)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert lrs[50] < lrs[10] and lrs[100] == pytest.approx(1e-4)


def test_length_grouped_batches_are_deterministic_and_similar_in_length(toy_data):
    split = train.Split(toy_data, "train", 512)
    a = train.batch_indices(split, 1, 5, 0, 8, window=32)
    assert (a == train.batch_indices(split, 1, 5, 0, 8, window=32)).all()
    assert (a != train.batch_indices(split, 1, 6, 0, 8, window=32)).any()
    # drawn from 32 neighbours in length order: the spread is far below the split's
    spread = split.row_lens[a].max() - split.row_lens[a].min()
    assert spread < (split.row_lens.max() - split.row_lens.min()) / 2


def test_smear_keys_flag_reaches_the_checkpoint(toy_data, tmp_path):
    out = str(tmp_path / "ns")
    _run(toy_data, out, 1, ["--no_smear_keys"])
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["model_config"]["smear_keys"] is False


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_shared_prefix_rows_give_the_same_loss_as_examples_one_by_one(toy_data, impl):
    """--share_prefix is a speed-up only: each request sees the tool prefix and
    itself at its own positions, so the summed loss equals the unpacked one."""
    import json
    meta = json.load(open(os.path.join(toy_data, "meta.json")))
    pad, user = meta["special_tokens"]["<|pad|>"], meta["special_tokens"]["<|user|>"]
    packed = train.Split(toy_data, "train", 512, share_prefix=True, user_id=user)
    plain = train.Split(toy_data, "train", 512)
    assert packed.row_lens.sum() < 0.7 * plain.row_lens.sum()
    rows = [r for r in range(len(packed)) if len(packed.rows[r]) > 1][:3]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], n_layer=2, n_head=2, n_embd=32, n_hidden=64,
                          attn_impl=impl, smear_keys=True))
    with torch.no_grad():
        for b in model.blocks:
            b.attn.smear.fill_(0.7)   # make the previous-token path matter
    x, y, m, layout = packed.batch(rows, pad)
    assert layout is not None
    a = train.answer_loss(model, x, y, m, layout, reduction="sum")
    x2, y2, m2, none = plain.batch([k for r in rows for k in packed.rows[r]], pad)
    b = train.answer_loss(model, x2, y2, m2, none, reduction="sum")
    assert m.sum() == m2.sum() > 0
    assert torch.allclose(a, b, rtol=1e-5), (a.item(), b.item())
    # and a wrong layout (requests seeing each other) would change it
    wrong = layout._replace(mask=torch.ones_like(layout.mask).tril())
    with torch.no_grad():
        diff = (model.hidden(x, layout=wrong) - model.hidden(x, layout=layout)).abs().amax()
    assert diff > 1e-3


def test_share_prefix_training_runs(toy_data, tmp_path):
    out = str(tmp_path / "sp")
    _run(toy_data, out, 3, ["--share_prefix"])
    assert "ex/s" in open(os.path.join(out, "log.txt")).read()


def test_time_budget_stops_with_a_final_eval(toy_data, tmp_path):
    out = str(tmp_path / "tb")
    _run(toy_data, out, 1000, ["--max_minutes", "0.0001"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "time budget of 0.0001 min reached" in log and "val step" in log
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] < 1000


def test_sigterm_saves_last_checkpoint(toy_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = str(tmp_path / "term")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "train.py", "--data_dir", toy_data, "--out_dir", out, "--preset", "tiny",
                          *MICRO, "--max_steps", "100000", "--batch_size", "4", "--eval_interval", "100000",
                          "--log_interval", "1"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = os.path.join(out, "log.txt")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and "step 2 |" in open(log).read()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 130, p.stderr.read()
    assert "interrupted at step" in open(log).read()
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] >= 2
