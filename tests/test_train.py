import os
import sys

import numpy as np
import pytest
import torch

import datadir
import runtime
import train
from conftest import MICRO, ROOT
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
    assert runtime.pick_dtype("auto", "cpu")[0] == "float32"
    assert runtime.pick_dtype("bfloat16", "cpu")[0] == "bfloat16"


def test_lr_schedule_warms_up_then_decays():
    args = train.parse_args(["--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10", "--max_steps", "100"])
    lrs = [train.get_lr(s, args) for s in range(101)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert lrs[50] < lrs[10] and lrs[100] == pytest.approx(1e-4)


def test_length_grouped_batches_are_deterministic_and_similar_in_length(toy_data):
    split = datadir.Split(toy_data, "train", 512)
    a = datadir.batch_indices(split, 1, 5, 0, 8, window=32)
    assert (a == datadir.batch_indices(split, 1, 5, 0, 8, window=32)).all()
    assert (a != datadir.batch_indices(split, 1, 6, 0, 8, window=32)).any()
    # drawn from 32 neighbours in length order: the spread is far below the split's
    spread = split.row_lens[a].max() - split.row_lens[a].min()
    assert spread < (split.row_lens.max() - split.row_lens.min()) / 2


def test_smear_keys_flag_reaches_the_checkpoint(toy_data, tmp_path):
    out = str(tmp_path / "ns")
    _run(toy_data, out, 1, ["--no_smear_keys"])
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["model_config"]["smear_keys"] is False


def test_architecture_flags_reach_the_checkpoint_and_resume(toy_data, tmp_path):
    out = str(tmp_path / "arch")
    flags = ["--ffn", "swiglu", "--n_kv_head", "1", "--qk_norm"]
    _run(toy_data, out, 2, flags)
    cfg = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model_config"]
    assert (cfg["ffn"], cfg["n_kv_head"], cfg["qk_norm"]) == ("swiglu", 1, True)
    _run(toy_data, out, 3, flags + ["--resume"])
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 3


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_shared_prefix_rows_give_the_same_loss_as_examples_one_by_one(toy_data, impl):
    """--share_prefix is a speed-up only: each request sees the tool prefix and
    itself at its own positions, so the summed loss equals the unpacked one."""
    import json
    meta = json.load(open(os.path.join(toy_data, "meta.json")))
    pad, user = meta["special_tokens"]["<|pad|>"], meta["special_tokens"]["<|user|>"]
    packed = datadir.Split(toy_data, "train", 512, share_prefix=True, user_id=user)
    plain = datadir.Split(toy_data, "train", 512)
    assert packed.row_lens.sum() < 0.7 * plain.row_lens.sum()
    rows = [r for r in range(len(packed)) if len(packed.rows[r]) > 1][:3]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], n_layer=2, n_head=2, n_embd=32, n_hidden=64,
                          attn_impl=impl, smear_keys=True))
    with torch.no_grad():
        for b in model.blocks:
            b.attn.smear.fill_(0.7)   # make the previous-token path matter
    x, y, m, layout, _ = packed.batch(rows, pad)[:5]
    assert layout is not None
    a = train.answer_loss(model, x, y, m, layout, reduction="sum")
    x2, y2, m2, none, _ = plain.batch([k for r in rows for k in packed.rows[r]], pad)[:5]
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


def test_minutes_alone_fit_the_schedule_to_them(toy_data, tmp_path):
    """--max_minutes without --max_steps: the steps that fill the minutes are
    measured after the first steps, logged, stored with the run (a resume keeps
    them), and the learning rate then decays over them."""
    out = str(tmp_path / "fit")
    train.main(["--data_dir", toy_data, "--out_dir", out, "--preset", "tiny", *MICRO, "--max_minutes", "0.25",
                "--batch_size", "4", "--eval_interval", "100000", "--log_interval", "1000", "--warmup_steps", "10"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "schedule: " in log
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    fitted = ck["args"]["max_steps"]
    assert fitted > train.FIT_FROM + train.FIT_STEPS and ck["step"] <= fitted
    # the schedule ends with the minutes, or the minutes stop it (a slower moment)
    assert ck["step"] == fitted or "time budget of 0.25 min reached" in log
    assert ck["train_seconds"] < 0.25 * 60 * 1.5
    args = train.parse_args(["--max_minutes", "1", "--warmup_steps", "10"])
    assert args.max_steps is None
    args.max_steps = 0                                   # before the fit: the peak, after the warmup
    assert train.get_lr(20, args) == args.lr


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


def _meta(toy_data):
    import json
    return json.load(open(os.path.join(toy_data, "meta.json")))


def test_pack_rows_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lens = rng.integers(20, 300, 500)
    rows = datadir.pack_rows(lens, 512, seed=3)
    assert sorted(k for r in rows for k in r) == list(range(500))
    fill = [sum(lens[k] for k in r) for r in rows]
    assert max(fill) <= 512
    # best fit leaves little room: within 5% of the fewest rows possible
    assert len(rows) <= 1.05 * lens.sum() / 512
    assert rows == datadir.pack_rows(lens, 512, seed=3) and rows != datadir.pack_rows(lens, 512, seed=4)


def test_padding_fraction_counts_the_pad_slots_of_real_batches(toy_data):
    """padding_fraction works from row lengths alone; here it is checked against
    the pad tokens of the very batches training would draw."""
    pad = _meta(toy_data)["special_tokens"]["<|pad|>"]
    plain = datadir.Split(toy_data, "train", 512)
    packed = datadir.Split(toy_data, "train", 1024, pack=True, seed=0)
    fractions = {}
    for name, split, rows in (("plain", plain, 16), ("packed", packed, 5)):
        pads = slots = 0
        for step in range(6):
            x = split.batch(datadir.batch_indices(split, 9, step, 0, rows, 0), pad)[0]
            pads += int((x == pad).sum())
            slots += x.numel()
        fractions[name] = datadir.padding_fraction(split, rows, 0, 9, n_batches=6)
        assert fractions[name] == pytest.approx(pads / slots, abs=1e-12), name
    assert fractions["plain"] > 0.2 and fractions["packed"] < fractions["plain"] / 2, fractions


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_packed_row_loss_is_the_token_mean_of_its_examples_one_by_one(toy_data, impl):
    """--pack changes where examples sit, not what is learnt: the loss of packed
    rows equals the answer-token mean over the examples run one at a time, and
    no token attends across examples."""
    pad = _meta(toy_data)["special_tokens"]["<|pad|>"]
    packed = datadir.Split(toy_data, "train", 1024, pack=True, seed=0)
    plain = datadir.Split(toy_data, "train", 1024)
    row_of = {r[0]: i for i, r in enumerate(plain.rows)}       # example -> its row in the plain split
    rows = [r for r in range(len(packed)) if len(packed.rows[r]) >= 3][:2]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=_meta(toy_data)["vocab_size"], n_layer=2, n_head=2, n_embd=32, n_hidden=64,
                          block_size=1024, attn_impl=impl, smear_keys=True))
    with torch.no_grad():
        for b in model.blocks:
            b.attn.smear.fill_(0.7)   # make the previous-token path matter
            b.attn.qkv.weight.mul_(8)     # sharp attention, not the near-uniform one of a fresh init
        model.embed.weight.mul_(30)   # logits of order 1: a wrong mask shows in the loss
    x, y, m, layout, _ = packed.batch(rows, pad)[:5]
    assert layout is not None
    loss = train.answer_loss(model, x, y, m, layout)
    logits = model(x, layout=layout, sel=m > 0)
    sums, counts, one_by_one = [], [], []
    for k in [k for r in rows for k in packed.rows[r]]:
        xk, yk, mk, none, _ = plain.batch([row_of[k]], pad)[:5]
        assert none is None
        sums.append(train.answer_loss(model, xk, yk, mk, reduction="sum").item())
        counts.append(mk.sum().item())
        one_by_one.append(model(xk, sel=mk > 0))
    assert m.sum().item() == sum(counts)
    # a mask letting examples see each other moves this loss by ~5e-6 only (a
    # random model), hence the tight tolerance and the sharper checks below
    assert loss.item() == pytest.approx(sum(sums) / sum(counts), rel=1e-6)
    assert torch.allclose(logits, torch.cat(one_by_one), atol=1e-4)
    # the token-level mean, not the mean of per-example means (examples differ in answer length)
    assert abs(loss.item() - np.mean([s / c for s, c in zip(sums, counts)])) > 1e-4

    # changing the first example of row 0 leaves every later token of that row untouched
    n_a = int(packed.lens[packed.rows[rows[0]][0]])
    x2 = x.clone()
    x2[0, 1:n_a] = (x2[0, 1:n_a] + 1) % model.config.vocab_size
    with torch.no_grad():
        h, h2 = model.hidden(x, layout=layout), model.hidden(x2, layout=layout)
    assert (h2[0, n_a:] - h[0, n_a:]).abs().amax() < 1e-5
    assert (h2[0, 1:n_a] - h[0, 1:n_a]).abs().amax() > 1e-3
    assert torch.equal(h2[1], h[1])     # and the other row, of course


def test_pack_training_runs_and_reports_padding(toy_data, tmp_path, capsys):
    out = str(tmp_path / "pk")
    _run(toy_data, out, 2, ["--pack"])
    printed = capsys.readouterr().out
    # several examples per row, and how much of a batch is padding
    assert "examples on average" in printed and "padding: " in printed
    assert "step 2 | loss" in open(os.path.join(out, "log.txt")).read()
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["args"]["pack"] is True


def test_pack_and_share_prefix_are_exclusive(toy_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(toy_data, str(tmp_path / "x"), 1, ["--pack", "--share_prefix"])
    assert e.value.code == 2 and "choose one" in capsys.readouterr().err


def test_orthogonalize_gives_near_unit_singular_values():
    from muon import orthogonalize
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16)]:
        s = torch.linalg.svdvals(orthogonalize(torch.randn(*shape)))
        assert s.min() > 0.5 and s.max() < 1.3, s      # the quintic's documented band, ~[0.7, 1.2]


def test_muon_trains_and_resumes_exactly(toy_data, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _run(toy_data, full, 6, ["--optimizer", "muon"])
    _run(toy_data, part, 6, ["--optimizer", "muon", "--stop_at", "3"])
    _run(toy_data, part, 6, ["--optimizer", "muon", "--resume"])
    a = torch.load(os.path.join(full, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "last.pt"), weights_only=True)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    # the blocks' matrices went to Muon, the embedding to AdamW
    groups = a["optimizer"]["param_groups"]
    assert [g["muon"] for g in groups] == [True, False, False] and groups[0]["lr_scale"] > 1


@pytest.mark.parametrize("keep_last", [False, True])
def test_best_pt_is_the_lowest_val_loss_or_with_keep_last_the_latest(toy_data, tmp_path, monkeypatch, keep_last):
    losses = iter([1.0, 2.0, 3.0])       # the val loss rises at each of the 3 evaluations
    monkeypatch.setattr(train, "evaluate_loss", lambda *a: next(losses))
    out = str(tmp_path / "o")
    _run(toy_data, out, 6, ["--keep_last"] if keep_last else [])   # evaluations at steps 3, 6 and the end
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    last = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert best["step"] == (6 if keep_last else 3) and best["best_val"] == 1.0
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"]) == keep_last


def test_aux_targets_are_read_only_when_asked_for(toy_data):
    # a run without aux heads neither loads the tag/intent/pointer files nor builds their arrays
    plain, aux = datadir.Split(toy_data, "train", 512, aux=False), datadir.Split(toy_data, "train", 512)
    assert plain.tags is None and plain.intents is None and plain.ptr is None
    assert aux.tags is not None and aux.intents is not None and aux.ptr is not None   # data.py wrote them
    b, a = plain.batch([0, 1], 0), aux.batch([0, 1], 0)
    assert b.tags is None and b.intent is None and b.ptr is None and a.tags.shape == a.x.shape
    assert all(torch.equal(u, v) for u, v in zip(b[:3], a[:3])) and torch.equal(b.seg, a.seg)


def test_the_gpu_recipe_of_the_general_router_runs_its_first_steps_on_the_cpu(tmp_path):
    """experiments/gpu_general.sh as documented, with the CPU overrides its header names."""
    import subprocess
    env = {**os.environ, "PY": sys.executable, "DEVICE": "cpu", "BATCH": "4", "STOP_AT": "2", "N_TRAIN": "300",
           "VOCAB": "600", "DATA_ARGS": "--n_val 20 --n_test 20 --n_test_unseen 20",
           "DATA": str(tmp_path / "data"), "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", os.path.join(ROOT, "experiments", "gpu_general.sh")], env=env, check=True,
                   capture_output=True, timeout=300)
    ckpt = torch.load(str(tmp_path / "out" / "last.pt"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["args"]["preset"] == "26m" and ckpt["model_config"]["copy_head"]
    assert ckpt["args"]["max_minutes"] == 240 and ckpt["train_tokens"] > 0


def test_intent_vote_trains_the_intent_at_every_request_token():
    """aux_loss with vote: the intent's cross-entropy at each request token (seg 2)
    of the rows whose tool is known, averaged; without: at intent_at alone."""
    torch.manual_seed(0)
    B, T, K = 3, 6, 4
    logits = torch.randn(B, T, K)
    seg = torch.tensor([[1, 2, 2, 2, 0, 0], [1, 2, 2, 0, 0, 0], [1, 2, 2, 2, 2, 0]])
    intent, at = torch.tensor([2, -1, 1]), torch.tensor([3, 2, 4])
    batch = datadir.Batch(None, None, None, None, seg, torch.zeros(B, T, dtype=torch.long), intent, at)
    F = torch.nn.functional
    _, last = train.aux_loss(None, logits, None, batch)
    _, vote = train.aux_loss(None, logits, None, batch, vote=True)
    want_last = F.cross_entropy(logits[[0, 2], [3, 4]], torch.tensor([2, 1]))
    want_vote = F.cross_entropy(torch.cat([logits[0, 1:4], logits[2, 1:5]]), torch.tensor([2] * 3 + [1] * 4))
    assert abs(last["intent"] - want_last.item()) < 1e-5
    assert abs(vote["intent"] - want_vote.item()) < 1e-5


def test_intent_vote_trains_a_tagged_token_toward_its_own_calls_tool():
    """With the data's tool targets (datadir {split}_tool.bin), a tagged request
    token's intent target is the tool of the call its value is in; every other
    request token keeps the row's first tool."""
    torch.manual_seed(0)
    B, T, K = 2, 6, 4
    logits = torch.randn(B, T, K)
    seg = torch.tensor([[1, 2, 2, 2, 2, 0], [1, 2, 2, 2, 0, 0]])
    intent, at = torch.tensor([2, 1]), torch.tensor([4, 3])
    tool = torch.full((B, T), -1)
    tool[0, 3], tool[0, 4] = 3, 2            # row 0: a second call's value at 3, the first call's at 4
    batch = datadir.Batch(None, None, None, None, seg, torch.zeros(B, T, dtype=torch.long), intent, at, None, tool)
    _, got = train.aux_loss(None, logits, None, batch, vote=True)
    want = torch.nn.functional.cross_entropy(torch.cat([logits[0, 1:5], logits[1, 1:4]]),
                                             torch.tensor([2, 2, 3, 2, 1, 1, 1]))
    assert abs(got["intent"] - want.item()) < 1e-5
