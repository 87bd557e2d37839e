import json
import os
import random

import numpy as np
import sentencepiece as spm

import data
import wire
from invent import invent_tools
from synth import Generator, grounded, load_catalogue, load_json, value_classes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE = os.path.join(ROOT, "assets", "catalogue.json")
VALUES = os.path.join(ROOT, "assets", "values.json")


def test_catalogue_is_big_and_varied_enough():
    entries = load_catalogue(CATALOGUE)
    assert len(entries) >= 40
    assert len({e["domain"] for e in entries}) >= 10


def _examples(seed, n=300):
    entries = load_catalogue(CATALOGUE)
    gen = Generator(entries, load_json(VALUES), invented=invent_tools(200, seed), p_invented=0.5)
    rng = random.Random(seed)
    return [gen.sample(rng, entries, entries) for _ in range(n)]


def test_generator_is_deterministic_under_seed():
    assert _examples(3) == _examples(3)
    assert _examples(3) != _examples(4)


def test_examples_are_valid_grounded_and_mixed():
    exs = _examples(5, 600)
    kinds = [e["kind"] for e in exs]
    for ex in exs:
        assert 1 <= len(ex["tools"]) <= 10
        assert len({t["name"] for t in ex["tools"]}) == len(ex["tools"])
        answer = {"calls": ex["calls"], "reason": ex["reason"]}
        assert wire.validate_answer(answer, ex["tools"]) is None, ex
        # copied values are whole words of the request; enum constants ("the AC" -> mode
        # "cool") need not be in it
        assert not [v for v in value_classes(ex, ex["tools"]) if v[3] == "bad"], ex
    nocall = sum(not e["calls"] for e in exs) / len(exs)
    multi = sum(len(e["calls"]) > 1 for e in exs) / len(exs)
    assert 0.10 <= nocall <= 0.20 and multi >= 0.20
    assert {"single", "multi", "chitchat", "info", "missing", "notool"} <= set(kinds)


def test_grounding_check_catches_invented_values():
    assert grounded("text Ann that I'm late", {"to": "Ann", "msg": "I'm late"})
    assert not grounded("text Ann that I'm late", {"to": "Bob"})


def test_data_dir_contents(toy_data):
    meta = json.load(open(os.path.join(toy_data, "meta.json")))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(toy_data, "tok.model"))
    assert meta["vocab_size"] == sp.get_piece_size() < 65536
    # special tokens are single pieces
    for tok, i in meta["special_tokens"].items():
        assert sp.encode(tok) == [i]
    # token files line up with the jsonl, and the mask covers exactly the answer
    tokens = np.fromfile(os.path.join(toy_data, "train.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(toy_data, "train_mask.bin"), dtype=np.uint8)
    idx = np.load(os.path.join(toy_data, "train_idx.npy"))
    rows = [json.loads(l) for l in open(os.path.join(toy_data, "train.jsonl"))]
    assert len(rows) == len(idx) - 1 == meta["splits"]["train"]["examples"]
    for i in (0, 1, len(rows) - 1):
        ids, m = tokens[idx[i]:idx[i + 1]].tolist(), mask[idx[i]:idx[i + 1]]
        answer = sp.decode([t for t, k in zip(ids, m) if k])
        assert answer == wire.render_answer(rows[i]["calls"], rows[i]["reason"])
        assert sp.decode(ids) == wire.render_prompt(rows[i]["tools"], rows[i]["request"]) + answer


def test_heldout_tools_never_appear_in_training(toy_data):
    meta = json.load(open(os.path.join(toy_data, "meta.json")))
    held = set(meta["heldout_tools"])
    assert held
    for split in ("train", "val"):
        for line in open(os.path.join(toy_data, f"{split}.jsonl")):
            assert not held & {t["name"] for t in json.loads(line)["tools"]}
    test = [json.loads(l) for l in open(os.path.join(toy_data, "test.jsonl"))]
    unseen = [t for t in test if t["split"] == "unseen" and t["calls"]]
    assert unseen and all(held & {c["name"] for c in t["calls"]} for t in unseen
                          if t["kind"] in ("single", "multi"))


def test_no_test_request_in_training(toy_data):
    def reqs(split):
        return {json.loads(l)["request"].lower() for l in open(os.path.join(toy_data, f"{split}.jsonl"))}
    assert not reqs("test") & reqs("train")


# -----------------------------------------------------------------------------
# sources: your own tools, imports, a teacher (through a local fake server)

SMALL = ["--n_train", "150", "--n_val", "10", "--n_test", "10", "--n_test_unseen", "10", "--vocab_size", "400",
         "--n_invented", "20", "--seed", "3"]


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_own_tools_and_imports_and_data_card(tmp_path, capsys):
    imp = tmp_path / "extra.jsonl"
    imp.write_text(json.dumps({"query": "weather in Oslo", "answers": [{"name": "w", "arguments": {"city": "Oslo"}}],
                               "tools": [{"name": "w", "description": "weather",
                                          "parameters": {"city": {"type": "str"}}}]}) + "\nnot json\n")
    out = str(tmp_path / "d")
    data.main(["--out_dir", out, "--tools", os.path.join(ROOT, "examples", "tools.json"),
               "--import", str(imp), *SMALL])
    printed = capsys.readouterr().out
    assert "imported 1 examples" in printed and "not_json 1" in printed and "data card" in printed
    mine = {t["name"] for t in wire.load_tools(os.path.join(ROOT, "examples", "tools.json"))}
    train = _rows(os.path.join(out, "train.jsonl"))
    targets = {c["name"] for ex in train for c in ex["calls"]}
    assert mine <= targets and "w" in targets
    assert targets - mine - {"w"}, "invented tools are mixed in"
    test = _rows(os.path.join(out, "test.jsonl"))
    assert {c["name"] for ex in test for c in ex["calls"]} <= mine
    card = json.load(open(os.path.join(out, "data_card.json")))
    assert card["examples"] == len(train) and card["sources"]["import"] == 1
    assert 0 < card["call_targets_invented_share"] < 1 and card["tokens_p95"] >= card["tokens_p50"] > 0
    # your tools' values are whole words of the requests too, and the card and meta count them
    assert card["values"]["bad"] == 0 and card["values"]["span"] > card["values"]["converted"] > 0
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["splits"]["train"]["values"] == card["values"] and "argument values:" in printed


def test_teacher_labels_train_and_val_and_resumes_from_cache(tmp_path, monkeypatch, capsys):
    from fake_servers import Fake
    fake = Fake("openai")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    out = str(tmp_path / "d")
    argv = ["--out_dir", out, "--teacher", "openai", "--teacher_base_url", fake.url,
            "--teacher_rps", "1000", *SMALL]
    try:
        data.main(argv)
        sent = sum(fake.counts.values())
        data.main(argv)                      # a re-run pays for nothing
        assert sum(fake.counts.values()) == sent
    finally:
        fake.close()
    printed = capsys.readouterr().out
    assert "teacher openai:gpt-6-luna: kept" in printed and "answered by gpt-6-luna-2026-09-22" in printed
    train = _rows(os.path.join(out, "train.jsonl"))
    assert train and all(ex["label"] == "openai:gpt-6-luna" for ex in train)
    assert all(ex["label_model"] == "gpt-6-luna-2026-09-22" for ex in train)   # the snapshot that answered
    # the fake teacher calls nothing unless asked for the weather, so its no-calls win
    assert sum(not ex["calls"] for ex in train) > 0.8 * len(train)
    assert all(ex["reason"] == "chit-chat" for ex in train if not ex["calls"])
    assert sent == 150 + 10   # every train and val example asked exactly once
    assert not any("label" in ex for ex in _rows(os.path.join(out, "test.jsonl")))


def test_teacher_quota_running_out_stops_with_one_line_and_a_rerun_continues(tmp_path, monkeypatch, capsys):
    from fake_servers import Fake
    fake = Fake("openai")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    out = str(tmp_path / "d")
    argv = ["--out_dir", out, "--teacher", "openai", "--teacher_base_url", fake.url, "--teacher_rps", "1000", *SMALL]

    def run_out(f):
        if len(f.requests) == 40:
            f.every = ("quota",)                 # insufficient_quota from here on
    fake.on_request = run_out
    try:
        import pytest
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(err) == 1 and "quota exhausted" in err[0] and "run the same command again" in err[0], err
        with open(os.path.join(out, "teacher_cache.jsonl")) as f:
            saved = len(f.read().splitlines())
        assert 40 <= saved < 150                 # everything answered before the stop is kept
        fake.every = fake.on_request = None      # the quota is back
        sent = sum(fake.counts.values())
        data.main(argv)
        assert sum(fake.counts.values()) - sent == 160 - saved   # only the rest is asked
    finally:
        fake.close()


def test_bad_sources_fail_with_one_line(tmp_path, capsys, monkeypatch):
    import pytest
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    bad = tmp_path / "tools.json"
    bad.write_text('[{"description": "no name"}]')
    for argv in (["--tools", str(bad)], ["--import", str(tmp_path / "missing.jsonl")],
                 ["--teacher", "gemini"]):
        with pytest.raises(SystemExit) as e:
            data.main(["--out_dir", str(tmp_path / "d"), *SMALL, *argv])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tools" in err and "missing.jsonl: no such file" in err and "GEMINI_API_KEY" in err


def test_groups_over_your_own_few_tools_never_run_out_of_tools(tmp_path):
    """With five tools of one domain, a no-call example can leave no tool to show;
    the next example of its group (--group) must still be made (it crashed)."""
    import data
    data.main(["--tools", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                                       "tools.json"),
               "--out_dir", str(tmp_path / "mine"), "--n_train", "1500", "--n_val", "20", "--n_test", "10",
               "--n_test_unseen", "5", "--vocab_size", "400", "--group", "4", "--n_invented", "30"])
    assert os.path.isfile(tmp_path / "mine" / "meta.json")


def test_a_vocabulary_too_small_for_the_alphabet_is_one_clear_line(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        data.main(["--compiled", "--domains", "weather", "--out_dir", str(tmp_path / "v"), "--n_train", "30",
                   "--n_val", "4", "--n_test", "4", "--n_test_unseen", "2", "--vocab_size", "100"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--vocab_size 100" in err and "Traceback" not in err


def test_compiled_training_draws_the_multi_call_share_and_val_keeps_its_own(tmp_path, capsys):
    import pytest
    calls = {}
    for share in (0.0, 0.8):
        out = str(tmp_path / f"m{share}")
        data.main(["--compiled", "--domains", "weather,shopping", "--out_dir", out, "--n_train", "300",
                   "--n_val", "40", "--n_test", "20", "--n_test_unseen", "10", "--vocab_size", "600",
                   "--multi_share", str(share)])
        train = [json.loads(l) for l in open(os.path.join(out, "train.jsonl"))]
        calls[share] = sum(len(ex["calls"]) > 1 for ex in train) / len(train)
        val = open(os.path.join(out, "val.jsonl")).read()
        assert val == calls.setdefault("val", val)            # the same val whatever the training share
    assert calls[0.0] < 0.05 and calls[0.8] > 0.6, calls
    with pytest.raises(SystemExit) as e:
        data.main(["--compiled", "--domains", "weather", "--out_dir", str(tmp_path / "bad"), "--multi_share", "0.9"])
    assert e.value.code == 2 and "--multi_share" in capsys.readouterr().err
