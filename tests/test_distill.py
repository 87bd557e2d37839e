import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import distill
import wire
from conftest import MICRO


def test_kl_of_a_distribution_with_itself_is_zero():
    torch.manual_seed(0)
    s = torch.randn(7, 50)
    y = torch.randint(0, 50, (7,))
    loss, kl, ce = distill.kd_loss(s, s.clone(), y, torch.ones(7), T=4.0, alpha=1.0, beta=0.0)
    assert abs(kl.item()) < 1e-6 and abs(loss.item()) < 1e-5
    _, kl2, _ = distill.kd_loss(s, torch.randn(7, 50), y, torch.ones(7), T=4.0, alpha=1.0, beta=0.0)
    assert kl2.item() > 1e-3


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_soft_term_gradient_has_the_T_squared_scale(T):
    """d/ds of T^2 * KL(softmax(t/T) || softmax(s/T)) is T * (softmax(s/T) - softmax(t/T)),
    averaged over positions: checked against that closed form."""
    torch.manual_seed(1)
    s = torch.randn(5, 30, requires_grad=True)
    t = torch.randn(5, 30)
    loss, _, _ = distill.kd_loss(s, t, torch.zeros(5, dtype=torch.long), torch.ones(5), T=T, alpha=1.0, beta=0.0)
    loss.backward()
    expected = T * (F.softmax(s.detach() / T, -1) - F.softmax(t / T, -1)) / 5
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_weights_and_ce_term():
    torch.manual_seed(2)
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    y = torch.randint(0, 20, (4,))
    _, _, ce = distill.kd_loss(s, t, y, torch.ones(4), 4.0, 0.7, 0.3)
    assert torch.allclose(ce, F.cross_entropy(s, y))
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    _, _, ce1 = distill.kd_loss(s, t, y, w, 4.0, 0.7, 0.3)
    assert torch.allclose(ce1, F.cross_entropy(s[:1], y[:1]))


def _distill(toy_data, out, *extra):
    distill.main(["--data_dir", toy_data, "--out_dir", out, "--preset", "tiny", *MICRO, "--max_steps", "3",
                  "--batch_size", "4", "--eval_interval", "2", "--eval_batches", "1", "--log_interval", "1",
                  "--warmup_steps", "1", *extra])


def test_soft_distillation_leaves_the_teacher_untouched(toy_data, toy_ckpt, tmp_path):
    before = torch.load(toy_ckpt, weights_only=True)["model"]
    out = str(tmp_path / "soft")
    _distill(toy_data, out, "--teacher", toy_ckpt, "--mode", "soft")
    after = torch.load(toy_ckpt, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    teacher, _ = distill.load_teacher(toy_ckpt, json.load(open(os.path.join(toy_data, "meta.json"))), "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    log = open(os.path.join(out, "log.txt")).read()
    assert "| kl " in log and "step 3 |" in log
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["distill"]["mode"] == "soft"


def test_teacher_answers_are_decoded_once_and_cached(toy_data, toy_ckpt, tmp_path):
    from sample import Router
    router = Router(toy_ckpt, toy_data)
    examples = [json.loads(l) for l in open(os.path.join(toy_data, "train.jsonl"))][:5]
    cache = str(tmp_path / "answers.jsonl")
    texts = distill.teacher_answers(router, examples[:3], cache, 16)
    assert len(texts) == 3 and len(open(cache).readlines()) == 3
    with open(cache, "a") as f:
        f.write('{"i": 3, "te')           # a line cut short by a crash
    calls = []
    real = router.generate
    router.generate = lambda *a, **k: calls.append(1) or real(*a, **k)
    again = distill.teacher_answers(router, examples, cache, 16)
    assert again[:3] == texts and len(calls) == 2     # only items 3 and 4 are decoded


def test_hard_mode_trains_on_the_teachers_own_tokens(toy_data, toy_ckpt, tmp_path):
    """The student's training set is, token for token, what the teacher said
    (answers that do not parse or validate are dropped)."""
    out = tmp_path / "hard"
    out.mkdir()
    src = [json.loads(l) for l in open(os.path.join(toy_data, "train.jsonl"))][:12]
    said = {}
    for i, ex in enumerate(src):     # the cache stands in for a trained teacher's decoding
        said[i] = (wire.render_answer(ex["calls"], ex["reason"]) if i % 3 == 0
                   else wire.render_answer([], "chit-chat") if i % 3 == 1 else "<|call|>no_such_tool<|end|>")
    with open(out / "teacher_answers.jsonl", "w") as f:
        for i, text in said.items():
            f.write(json.dumps({"i": i, "text": text}) + "\n")
    _distill(toy_data, str(out), "--teacher", toy_ckpt, "--mode", "hard", "--max_examples", "12")
    d = str(out / "data")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tok.model"))
    train = [json.loads(l) for l in open(os.path.join(d, "train.jsonl"))]
    tokens = np.fromfile(os.path.join(d, "train.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(d, "train_mask.bin"), dtype=np.uint8)
    idx = np.load(os.path.join(d, "train_idx.npy"))
    expected = [said[i] for i in range(12) if i % 3 != 2]
    assert [ex["request"] for ex in train] == [src[i]["request"] for i in range(12) if i % 3 != 2]
    for k, text in enumerate(expected):
        answer = tokens[idx[k]:idx[k + 1]][mask[idx[k]:idx[k + 1]] == 1]
        assert answer.tolist() == sp.encode(text)
    assert "step 3 |" in open(out / "log.txt").read()


def test_hard_data_keeps_valid_teacher_answers_only(toy_data, tmp_path):
    src = [json.loads(l) for l in open(os.path.join(toy_data, "train.jsonl"))][:3]
    ok = wire.render_answer(src[0]["calls"], src[0]["reason"])
    texts = [ok, "<|call|>no_such_tool<|end|>", "garbage"]
    n, bad = distill.write_hard_data(toy_data, str(tmp_path / "d"), src, texts)
    assert (n, bad) == (1, 2)


def test_teacher_with_another_tokenizer_is_refused(toy_data, toy_ckpt, tmp_path, capsys):
    import shutil
    other = str(tmp_path / "other")
    shutil.copytree(toy_data, other)
    meta = json.load(open(os.path.join(other, "meta.json")))
    meta["tokenizer_sha256"] = "0" * 64
    json.dump(meta, open(os.path.join(other, "meta.json"), "w"))
    with pytest.raises(SystemExit) as e:
        _distill(other, str(tmp_path / "x"), "--teacher", toy_ckpt, "--mode", "soft")
    assert e.value.code == 2
    assert "different tokenizer" in capsys.readouterr().err


def test_soft_mode_needs_a_teacher(toy_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _distill(toy_data, str(tmp_path / "y"), "--mode", "soft")
    assert "--teacher" in capsys.readouterr().err
