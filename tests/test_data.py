import json
import os
import random

import numpy as np
import sentencepiece as spm

import data
import wire
from invent import invent_tools
from synth import Generator, grounded, load_catalogue, load_json

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
        assert all(grounded(ex["request"], c["arguments"]) for c in ex["calls"]), ex
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
