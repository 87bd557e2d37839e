"""The compiled catalogue: data (generator, held-out phrasings, intent/slot
folders), the prompt without tools, the model's catalogue and its checks, and
the README's your-tools path end to end."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import datadir
import evalsets
import formats
import grammar
import wire
from conftest import MICRO, ROOT
from sample import Router, _Answer


@pytest.fixture(scope="module")
def router(compiled_ckpt):
    r = Router(compiled_ckpt)
    assert r.heads is not None and r.answer_from_heads     # a compiled model with aux heads answers from them
    return r


def test_compiled_data_has_tool_tokens_and_prompts_without_tools(compiled_data):
    d = datadir.load_data_dir(compiled_data)
    tools = wire.load_tools(os.path.join(compiled_data, "tools.json"))
    assert d.meta["compiled"] and set(d.meta["tool_tokens"]) == {t["name"] for t in tools}
    for name, i in d.meta["tool_tokens"].items():                 # one token each
        assert d.sp.encode(name) == [i]
    ex = datadir.read_jsonl(os.path.join(compiled_data, "train.jsonl"))[0]
    assert "tools" not in ex                                      # the catalogue is tools.json
    split = datadir.Split(compiled_data, "train", 512)
    user = d.special(wire.USER)
    first = split.example(0)
    assert first[0] == user and wire.TOOLS not in d.sp.decode(first.tolist())
    # the prompt's blocks: <|user|> alone, then the request, then the answer
    b = split.batch([0], d.special(wire.PAD))
    answer_at = int(np.argmax(np.asarray(split.mask[split.starts[0]:split.starts[0] + split.lens[0]]) > 0))
    assert b.seg[0, 0] == 1 and (b.seg[0, 1:answer_at] == 2).all() and (b.seg[0, answer_at:] == 0).all()


def test_every_copied_value_of_the_training_data_is_tagged(compiled_data):
    """datadir.request_tags: each string the training data copies from its request
    (grammar.is_span) is marked on a run of whole request words, possessives
    included ("Salt Lake City's air quality" -> city "Salt Lake City"), so the
    tagger learns every value it will be asked for."""
    d = datadir.load_data_dir(compiled_data)
    sp = d.sp
    tag_index = {t: i for i, t in enumerate(d.meta["tags"])}
    nbytes = datadir.piece_lengths(sp)
    checked = 0
    for ex in datadir.read_jsonl(os.path.join(compiled_data, "train.jsonl"))[:400] + [
            {"request": "give me Salt Lake City's air quality",
             "calls": [{"name": "get_air_quality", "arguments": {"city": "Salt Lake City"}}]}]:
        tags, owners = datadir.request_tags(sp, ex, tag_index, nbytes)
        spans = grammar.Spans(ex["request"])
        marked = [o for o in owners if o is not None]
        for c in ex["calls"]:
            for k, v in c.get("arguments", {}).items():
                if isinstance(v, str) and grammar.is_span(v, spans) and f"B-{k}" in tag_index:
                    assert (c["name"], k) in marked, (ex["request"], k, v)
                    checked += 1
    assert checked > 100


def test_a_whole_number_said_in_words_is_tagged_as_its_value(compiled_data):
    """datadir.request_tags: a compiled catalogue's integer value that no run
    spells in digits is tagged on the number words that say it ("go down to
    seventy" -> B-temperature on "seventy"; "twenty six" B I); a number the
    request does not say, and digits, are tagged as before."""
    d = datadir.load_data_dir(compiled_data)
    tag_index = {t: i for i, t in enumerate(d.meta["tags"])}
    nbytes = datadir.piece_lengths(d.sp)
    tools = wire.load_tools(os.path.join(compiled_data, "tools.json"))
    tool, key = next((t["name"], k) for t in tools for k in t["parameters"]["properties"] if f"B-{k}" in tag_index)

    def tagged(request, n):
        tags, owners = datadir.request_tags(d.sp, {"request": request, "calls": [
            {"name": tool, "arguments": {key: n}}]}, tag_index, nbytes)
        _, words, text = datadir.request_words(d.sp, request, nbytes)
        return [(text[a:z].decode(), d.meta["tags"][tags[t]]) for t, a, z in words if tags[t] != tag_index["O"]]
    assert tagged("please make it seventy now", 70) == [("seventy", f"B-{key}")]
    assert tagged("please make it twenty six now", 26) == [("twenty", f"B-{key}"), ("six", f"I-{key}")]
    assert tagged("please make it sixty-six now", 66) == [("sixty-six", f"B-{key}")]
    assert tagged("please make it 70 now", 70) == [("70", f"B-{key}")]
    assert tagged("please make it seventy now", 71) == []
    assert datadir.number_words_run([(0, 0, 5), (1, 6, 13)], b"seven degrees", 7) == range(0, 1)
    assert datadir.number_words_run([(0, 0, 3), (1, 4, 11)], b"and seventy", 70) == range(1, 2)   # not "and ..."
    assert datadir.said_in_words("one hundred and five") and not datadir.said_in_words("6 fifty")


def test_each_tagged_token_is_given_the_tool_of_its_call(compiled_data):
    """datadir.write_tokens: {split}_tool.bin holds, at each tagged request token,
    the intent index of the call its value belongs to (a request of two tools
    has both), and -1 everywhere else."""
    d = datadir.load_data_dir(compiled_data)
    split = datadir.Split(compiled_data, "train", 512)
    intents, tag_index = d.meta["intents"], {t: i for i, t in enumerate(d.meta["tags"])}
    nbytes = datadir.piece_lengths(d.sp)
    two = 0
    for k, ex in enumerate(datadir.read_jsonl(os.path.join(compiled_data, "train.jsonl"))[:300]):
        tags, owners = datadir.request_tags(d.sp, ex, tag_index, nbytes)
        s, n = split.starts[k], int(split.lens[k])
        tool = np.asarray(split.tool[s:s + n])
        answer = int(np.argmax(np.asarray(split.mask[s:s + n]) > 0))
        want = [intents.index(o[0]) if o else -1 for o in owners]
        assert tool[answer - len(owners):answer].tolist() == want
        assert (tool[:answer - len(owners)] == -1).all() and (tool[answer:] == -1).all()
        two += len({w for w in want if w >= 0}) > 1
    assert two > 10


def test_a_repeated_key_ends_the_call_at_the_strongest_clause_break():
    """heads.segment: runs of one tool become calls in request order; a key met
    again ends the call, at the strongest break between the call's run of that
    key and the new one (sentence end, ";", then/also > comma > none), the latest
    of equals; a list's items joined by a comma or "and" stay one call."""
    from heads import segment

    def calls(text, keys, at_clauses=True, lists=()):
        runs, at = [], 0
        for key, value in keys:              # each value's first place after the last
            a = text.index(value, at)
            runs.append((key, a, a + len(value)))
            at = a + len(value)
        return [[(k, text[a:b]) for k, a, b in c]
                for c in segment(runs, text.encode(), lists, at_clauses)]

    text = "play starlit palace, then start the Sable & Rye record rusty skyline"
    keys = [("album", "starlit palace"), ("artist", "Sable & Rye"), ("album", "rusty skyline")]
    assert calls(text, keys) == [[("album", "starlit palace")],
                                 [("artist", "Sable & Rye"), ("album", "rusty skyline")]]
    # without the rule the call ends right before the repeated key, as it used to
    assert calls(text, keys, at_clauses=False) == [[("album", "starlit palace"), ("artist", "Sable & Rye")],
                                                   [("album", "rusty skyline")]]
    text = "return order ORD-1. Then sleeping bag return, order ORD-2"
    keys = [("order_id", "ORD-1"), ("product", "sleeping bag"), ("order_id", "ORD-2")]
    assert calls(text, keys) == [[("order_id", "ORD-1")], [("product", "sleeping bag"), ("order_id", "ORD-2")]]
    # equal breaks: the latest ("Text Ann: running late. Also text Bob: on my way")
    text = "Text Ann. running late. Also text Bob: on my way"
    keys = [("to", "Ann"), ("msg", "running late"), ("to", "Bob"), ("msg", "on my way")]
    assert calls(text, keys) == [[("to", "Ann"), ("msg", "running late")], [("to", "Bob"), ("msg", "on my way")]]
    # a list's items stay together; a list met again after a clause break is a new call
    text = "add eggs, milk and bread; then add soap"
    keys = [("items", "eggs"), ("items", "milk"), ("items", "bread"), ("items", "soap")]
    assert calls(text, keys, lists={"items"}) == [[("items", "eggs"), ("items", "milk"), ("items", "bread")],
                                                  [("items", "soap")]]
    assert calls("nothing", []) == []


def test_a_value_is_never_split_where_the_data_has_no_two_values_side_by_side(compiled_data):
    """datadir.adjacent_pairs keeps the tag moves seen between words with only white
    space between them; heads.best_tags keeps to them there. Two items of a list
    follow each other across a comma ("eggs, milk"), never across a space, so a
    tagger that leans to B-items B-items on "maple syrup" reads one item."""
    import heads
    d = datadir.load_data_dir(compiled_data)
    tags = d.meta["tags"]
    moves, adjacent = d.meta["tag_moves"], d.meta["adjacent_moves"]
    assert ["B-items", "B-items"] in moves and ["B-items", "B-items"] not in adjacent
    assert ["B-items", "I-items"] in adjacent and ["O", "B-items"] in adjacent
    loose, start, tight = heads.tag_rules(tags, moves, adjacent)
    b, i, o = (tags.index(t) - 1 for t in ("B-items", "I-items", "O"))
    logp = torch.full((3, len(tags) - 1), -9.0)             # "add maple syrup"
    logp[0, o] = -0.1
    logp[1, b] = logp[2, b] = -0.1                          # each word on its own: B-items
    logp[2, i] = -0.5
    assert heads.best_tags(logp, loose, start, tight, [True, False]) == [o, b, b]    # "maple, syrup": two items
    assert heads.best_tags(logp, loose, start, tight, [True, True]) == [o, b, i]     # "maple syrup": one
    assert heads.best_tags(logp, loose, start, None, [True, True]) == [o, b, b]      # no adjacent moves: as before
    logp[2, i] = -20.0                                      # where the next word cannot continue it: O
    assert heads.best_tags(logp, loose, start, tight, [True, True]) == [o, b, o]


def test_after_a_clause_break_the_word_tags_begin_afresh():
    """heads.best_tags with fresh: across a clause break ("June 1; allergy
    medicine") a word may take any tag a request begins with, though the data
    never had that pair of tags in a row; elsewhere the data's moves hold."""
    import heads
    names = ["-", "O", "B-date", "I-date", "B-items", "I-items"]
    moves = [["^", "O"], ["^", "B-date"], ["^", "B-items"], ["B-date", "I-date"], ["I-date", "I-date"],
             ["O", "B-items"], ["B-items", "I-items"]]
    loose, start, tight = heads.tag_rules(names, moves)
    o, bd, idt, bi = (names.index(t) - 1 for t in ("O", "B-date", "I-date", "B-items"))
    logp = torch.full((3, len(names) - 1), -9.0)            # "June 1; allergy"
    logp[0, bd] = logp[1, idt] = logp[2, bi] = -0.1
    logp[1, o] = -2.5
    assert heads.best_tags(logp, loose, start) == [bd, o, bi]                              # I-date -> B-items unseen
    assert heads.best_tags(logp, loose, start, fresh=[False, True]) == [bd, idt, bi]      # a clause break between
    assert heads.best_tags(logp, loose, start, fresh=[True, False]) == [bd, o, bi]        # ... not between 2 and 3
    logp[1, idt] = -20.0
    logp[1, bi] = -0.1
    logp[2, bi], logp[2, names.index("I-items") - 1] = -3.0, -0.2
    assert heads.best_tags(logp, loose, start, fresh=[True, False])[1] == bi   # a fresh start may be B
    logp[1, bi], logp[1, idt] = -20.0, -0.1
    assert heads.best_tags(logp, loose, start, fresh=[True, True])[:2] == [bd, idt]    # ... or go on ("st. louis")


def test_test_split_holds_new_values_and_phrasings_never_trained_on(compiled_data):
    test = datadir.read_jsonl(os.path.join(compiled_data, "test.jsonl"))
    train = datadir.read_jsonl(os.path.join(compiled_data, "train.jsonl"))
    assert {ex["split"] for ex in test} == {"new-values", "new-phrasing"}
    assert not {ex["request"].lower() for ex in test} & {ex["request"].lower() for ex in train}
    assert all(ex["calls"] for ex in test if ex["split"] == "new-phrasing")


def test_no_tool_fits_training_also_asks_for_what_the_catalogues_other_domains_do(compiled_data, tmp_path):
    """data.py --outside (default 1): a compiled catalogue of some --domains trains
    "no tool fits" on requests of the catalogue's other domains too; val and test
    stay as they were (--outside 0), byte for byte."""
    import data
    out = str(tmp_path / "inside")
    data.main(["--compiled", "--domains", "shopping,weather", "--out_dir", out, "--n_train", "300",
               "--n_val", "30", "--n_test", "20", "--n_test_unseen", "10", "--vocab_size", "500", "--seed", "3",
               "--outside", "0"])
    for split in ("val", "test"):
        with open(os.path.join(out, f"{split}.jsonl"), "rb") as a, \
                open(os.path.join(compiled_data, f"{split}.jsonl"), "rb") as b:
            assert a.read() == b.read(), split
    no_tool = lambda d: [ex["request"] for ex in datadir.read_jsonl(os.path.join(d, "train.jsonl"))
                         if ex["reason"] == wire.REASON_NO_TOOL]
    with open(os.path.join(ROOT, "assets", "values.json"), encoding="utf-8") as f:
        listed = set(json.load(f)["out_of_scope"])               # the generator's own out-of-scope requests
    assert no_tool(out) and set(no_tool(out)) <= listed
    assert len(set(no_tool(compiled_data)) - listed) >= 2 and len(no_tool(compiled_data)) > len(no_tool(out))


def test_val_phrasings_hold_other_templates_out_for_the_val_split(tmp_path):
    import data
    out = str(tmp_path / "vp")
    data.main(["--compiled", "--domains", "shopping,weather", "--out_dir", out, "--n_train", "200",
               "--n_val", "20", "--n_test", "10", "--n_test_unseen", "10", "--vocab_size", "400", "--seed", "3",
               "--val_phrasings", "0.15"])
    val = datadir.read_jsonl(os.path.join(out, "val.jsonl"))
    test = datadir.read_jsonl(os.path.join(out, "test.jsonl"))
    train = datadir.read_jsonl(os.path.join(out, "train.jsonl"))
    assert [ex["split"] for ex in val].count("new-phrasing") == 10 and val[0]["split"] == "new-values"
    # phrasings of neither train nor test: the words around the values differ
    shape = lambda ex: " ".join(w for w in ex["request"].lower().split()[:3])
    held = {shape(ex) for ex in val if ex["split"] == "new-phrasing"}
    assert not {ex["request"] for ex in val} & {ex["request"] for ex in train + test}
    assert len(held - {shape(ex) for ex in train}) >= len(held) // 2


def test_paraphrases_are_trained_on_and_never_tested(tmp_path):
    import data
    cat = json.load(open(os.path.join(ROOT, "assets", "catalogue.json")))
    tools = [t for t in cat["tools"] if t["domain"] == "weather"]
    for t in tools:       # a marker word only the paraphrases use
        t["paraphrases"] = [f"zebra {x}" if isinstance(x, str) else {**x, "text": f"zebra {x['text']}"}
                            for x in t["requests"]]
    path = tmp_path / "cat.json"
    path.write_text(json.dumps({"version": 1, "tools": tools}))
    out = str(tmp_path / "para")
    data.main(["--compiled", "--catalogue", str(path), "--out_dir", out, "--n_train", "300", "--n_val", "20",
               "--n_test", "20", "--n_test_unseen", "20", "--vocab_size", "400", "--seed", "3",
               "--val_phrasings", "0.15"])
    read = lambda split: datadir.read_jsonl(os.path.join(out, f"{split}.jsonl"))
    zebra = lambda ex: "zebra" in ex["request"].lower()
    assert any(zebra(ex) for ex in read("train"))
    held = [ex for split in ("test", "val") for ex in read(split) if ex["split"] == "new-phrasing"]
    assert held and not any(zebra(ex) for ex in held)


def test_the_checkpoint_carries_the_catalogue(compiled_ckpt, compiled_data):
    ckpt = torch.load(compiled_ckpt, weights_only=True)
    assert ckpt["catalogue"] == wire.load_tools(os.path.join(compiled_data, "tools.json"))
    assert ckpt["model_config"]["prefix_lm"] and ckpt["model_config"]["copy_head"] and ckpt["train_seconds"] > 0


def test_compiled_router_answers_from_its_catalogue_and_restricts_to_named_tools(router):
    res = router.answer(None, "where is my order 12345?", 40)
    assert res["valid"] and res["latency_ms"] > 0
    track = next(t for t in router.catalogue if t["name"] == "track_order")
    res = router.answer([track], "where is my order 12345?", 40, tool_choice="required")
    assert res["valid"] and {c["name"] for c in res["calls"]} == {"track_order"}


def test_a_tool_the_model_does_not_know_or_a_changed_schema_is_refused(router):
    with pytest.raises(wire.ToolError, match="not in this model's compiled catalogue"):
        router.answer(wire.normalize_tools([{"name": "launch_rocket"}]), "go", 20)
    track = json.loads(json.dumps(next(t for t in router.catalogue if t["name"] == "track_order")))
    track["parameters"]["properties"]["carrier"] = {"type": "string"}
    with pytest.raises(wire.ToolError, match="parameter 'carrier' more"):
        router.answer([track], "where is my order 12345?", 20)
    track["description"] = "another wording is fine"
    del track["parameters"]["properties"]["carrier"]
    assert router.answer([track], "where is my order 12345?", 20)["valid"]


@pytest.mark.parametrize("request_text", ["where is my order 12345?", "weather in Oslo tomorrow", "hi there"])
def test_fast_decoder_equals_reference_and_uncached_with_prefix_lm_and_copy_head(router, request_text):
    ref = router.decode_reference(None, request_text, 30)
    fast, _ = router.generate_constrained(None, request_text, 30)
    slow, _ = router.generate_constrained(None, request_text, 30, use_cache=False, forced_spans=False,
                                          prefix_cache=False, speculate=False)
    assert fast == ref == slow


# -----------------------------------------------------------------------------
# intent / slot folders

def _write_folder(path, rows):
    os.makedirs(path, exist_ok=True)
    for split in ("train", "valid", "test"):
        with open(os.path.join(path, f"{split}.seq.in"), "w") as a, \
             open(os.path.join(path, f"{split}.seq.out"), "w") as b, \
             open(os.path.join(path, f"{split}.label"), "w") as c:
            for words, tags, label in rows:
                a.write(words + "\n")
                b.write(tags + "\n")
                c.write(label + "\n")


ROWS = [("flights from boston to dallas and to denver", "O O B-from O B-to O O B-to", "flight"),
        ("fare from new york", "O O B-from I-from", "airfare#flight")]


def test_intent_slot_folder_becomes_tools_and_calls(tmp_path):
    _write_folder(str(tmp_path / "set"), ROWS)
    tools, splits = formats.load_intent_slot_dir(str(tmp_path / "set"))
    assert [t["name"] for t in tools] == ["flight", "airfare__flight"]
    assert set(tools[0]["parameters"]["properties"]) == {"from", "to"}      # every slot, every intent
    first, second = splits["test"]
    # a repeated slot goes to a second call of the same tool
    assert first["calls"] == [{"name": "flight", "arguments": {"from": "boston", "to": "dallas"}},
                              {"name": "flight", "arguments": {"to": "denver"}}]
    assert second["calls"] == [{"name": "airfare__flight", "arguments": {"from": "new york"}}]
    # the gold answers score 100%; a wrong slot boundary and a wrong intent do not
    scores = evalsets.intent_slot_scores(splits["test"], [{"pred": ex["calls"]} for ex in splits["test"]])
    assert scores["sentence_acc"] == scores["intent_acc"] == scores["slot_f1"] == 1.0
    wrong = [{"pred": [{"name": "flight", "arguments": {"from": "boston", "to": "dallas"}}]},
             {"pred": [{"name": "flight", "arguments": {"from": "york"}}]}]
    scores = evalsets.intent_slot_scores(splits["test"], wrong)
    assert scores["intent_acc"] == 0.5 and scores["sentence_acc"] == 0.0
    assert scores["slot_precision"] == pytest.approx(2 / 3) and scores["slot_recall"] == pytest.approx(2 / 4)


def test_bio_chunks_as_conlleval_reads_them():
    assert formats.slot_spans(["B-a", "I-a", "O", "I-b", "B-b", "I-a"]) == [("a", 0, 2), ("b", 3, 4), ("b", 4, 5),
                                                                              ("a", 5, 6)]


def test_swapped_slot_values_keep_the_slot_types_and_never_copy_a_val_or_test_utterance():
    rows = [(w.split(), t.split(), l) for w, t, l in ROWS + [
        ("cheap flights to san francisco", "B-cost O O B-to I-to", "flight")]]
    reserved = {"fare from boston"}
    assert "fare from boston" in [" ".join(w) for w, _, _ in formats.swap_slot_values(rows, 20, random.Random(0))]
    new = formats.swap_slot_values(rows, 20, random.Random(0), reserved)
    texts = [" ".join(w) for w, _, _ in new]
    assert len(texts) == len(set(texts)) and not set(texts) & (reserved | {" ".join(w) for w, _, _ in rows})
    values = {typ: {" ".join(w[a:b]) for w, t, _ in rows for typ2, a, b in formats.slot_spans(t) if typ2 == typ}
              for typ in ("from", "to", "cost")}
    for words, tags, label in new:
        assert len(words) == len(tags)
        chunks = formats.slot_spans(tags)
        assert all(" ".join(words[a:b]) in values[typ] for typ, a, b in chunks)   # a value of its own type
        outside = [w for w, t in zip(words, tags) if t == "O"]
        assert outside in [[w for w, t in zip(r[0], r[1]) if t == "O"] for r in rows if r[2] == label]
    # a two-word value reached a request that had a one-word one
    assert any("to san francisco" in t for t in texts if t.startswith("flights from"))


def test_a_bad_intent_slot_folder_is_one_clear_error(tmp_path, capsys):
    import data
    _write_folder(str(tmp_path / "set"), ROWS)
    with open(tmp_path / "set" / "test.label", "a") as f:
        f.write("extra\n")
    with pytest.raises(SystemExit) as e:
        data.main(["--intent_slot", str(tmp_path / "set"), "--out_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "aligned line by line" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the README's your-tools path, as a user runs it

def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("compiled", [True, False])
def test_your_tools_from_data_to_an_answer(tmp_path, compiled):
    """examples/tools.json -> data.py -> a few training steps -> sample.py answers."""
    d, o = str(tmp_path / "data"), str(tmp_path / "out")
    flags = ["--compiled"] if compiled else []
    r = run("data.py", "--tools", "examples/tools.json", *flags, "--out_dir", d, "--n_train", "200", "--n_val", "20",
            "--n_test", "10", "--n_test_unseen", "5", "--vocab_size", "400")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("train.py", "--data_dir", d, "--out_dir", o, "--preset", "tiny", *MICRO, "--max_steps", "3",
            "--batch_size", "4", "--eval_interval", "100", "--eval_batches", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    ask = ["sample.py", "--ckpt", os.path.join(o, "best.pt"), "--json", "Where's my order ORD-1234?"]
    r = run(*(ask if compiled else ask[:3] + ["--tools", "examples/tools.json"] + ask[3:]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["valid"]


def test_server_answers_from_the_compiled_catalogue_and_refuses_unknown_tools(router):
    from fastapi.testclient import TestClient
    import serve
    with TestClient(serve.create_app(router)) as client:
        assert client.get("/health").json()["compiled_tools"] == len(router.catalogue)
        r = client.post("/v1/chat/completions", json={"model": "x", "messages": [
            {"role": "user", "content": "where is my order 12345?"}]})
        assert r.status_code == 200 and r.json()["x_nanotool"]["answered_by"] != "teacher"
        r = client.post("/tool-call", json={"prompt": "where is my order 12345?"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/chat/completions", json={"model": "x", "messages": [
            {"role": "user", "content": "launch it"}], "tools": [{"type": "function", "function": {
                "name": "launch_rocket", "parameters": {"type": "object", "properties": {}}}}]})
        assert r.status_code == 400 and "launch_rocket" in r.json()["error"]["message"]


@pytest.mark.parametrize("request_text", ["where is my order 12345?", "weather in Oslo tomorrow",
                                          "cancel order 778 and track 99812 please"])
def test_span_values_are_runs_of_whole_request_words(router, request_text):
    """With span values on, every string value is a run of whole words of the
    request (grammar.Spans), and the fast decoder still gives the reference
    decoder's tokens."""
    router.span_every = True
    router.grammars.clear()
    try:
        ref = router.decode_reference(None, request_text, 40, tool_choice="required")
        fast, _ = router.generate_constrained(None, request_text, 40, tool_choice="required")
        res = router.answer(None, request_text, 40, tool_choice="required")
    finally:
        router.span_every = False
        router.grammars.clear()
    assert fast == ref
    spans = grammar.Spans(request_text)
    for c in res["calls"]:
        for k, v in c["arguments"].items():
            if isinstance(v, str):
                assert grammar.is_span(v, spans), (v, request_text)


def test_a_right_draft_is_verified_in_one_pass_and_a_wrong_one_changes_nothing(router, monkeypatch):
    """A model that writes a fixed answer (test_grammar's stub): given that answer as
    the draft, decoding takes the prompt pass and one more; a wrong draft changes
    no token."""
    from test_grammar import StubModel
    request_text = "where is my order 12345?"
    target = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "12345"}}])
    n_prompt = len(router.encode_prompt(None, request_text))
    real = router.model
    try:
        def run(draft_tokens=None, **kw):
            router.model = StubModel(router, target, n_prompt)
            monkeypatch.setattr(router.heads, "draft", lambda aux, ans, tools: (list(draft_tokens or []), False, [], {}))
            return router.generate_constrained(None, request_text, 64, prefix_cache=False, **kw)
        plain, slow = run(draft=False, speculate=False)
        assert router.sp.decode(plain) == target
        fast, info = run(plain)
        wrong, _ = run([plain[0], router.end_id] + plain[1:])
    finally:
        router.model = real
    assert fast == plain == wrong and info["passes"] == 2 < slow["passes"]


def test_the_draft_is_built_from_the_tags_and_the_intent(router):
    """Heads.draft reads the aux heads' logits: a forced intent and tags give the call."""
    g = router.grammar(router.catalogue)
    req = router.encode_request("where is my order 12345")
    tags = router.meta["tags"]
    tag_logits = torch.full((len(req), len(tags)), -9.0)
    tag_logits[:, tags.index("O")] = 0.0
    _, words, text = datadir.request_words(router.sp, "where is my order 12345", router.heads.nbytes)
    start = next(tok for tok, a, z in words if text[a:z] == b"12345")   # a word's tag: on its first letter's token
    tag_logits[start, tags.index("B-order_id")] = 9.0
    intent = torch.full((len(router.meta["intents"]),), -9.0)
    intent[router.meta["intents"].index("track_order")] = 9.0
    ans = _Answer(router, g, "where is my order 12345", req)
    draft, whole, _, _ = router.heads.draft((tag_logits, intent, None), ans, router.catalogue)
    assert whole and router.sp.decode(draft) == wire.render_answer(
        [{"name": "track_order", "arguments": {"order_id": "12345"}}])
    # a run tagged with another tool's key ("city"): the request asks for more than this
    # call, so the draft is kept for verifying only (a two-call request must not lose a call)
    assert "B-city" in tags
    tag_logits[0, tags.index("B-city")] = 99.0
    draft, whole, found, _ = router.heads.draft((tag_logits, intent, None), ans, router.catalogue)
    assert found == ["where", "12345"]
    assert not whole and router.sp.decode(draft) == wire.render_answer(
        [{"name": "track_order", "arguments": {"order_id": "12345"}}])


def test_a_number_the_tags_mark_in_words_is_drafted_as_the_number(router):
    """Heads.draft: a run of number words tagged for a number argument ("under
    fifty dollars", a checkpoint trained on datadir.number_words_run's tags) is
    drafted as the number (50), not as the words."""
    request = "find a desk lamp under fifty dollars"
    g, req, tags, intents, at = _request_at(router, request)
    tag_logits = _tag_logits(req, tags, at, [(b"desk", "B-product"), (b"lamp", "I-product"), (b"fifty", "B-max_price")])
    intent = torch.full((len(intents),), -9.0)
    intent[intents.index("search_products")] = 9.0
    draft, _, _, _ = router.heads.draft((tag_logits, intent, None), _Answer(router, g, request, req), router.catalogue)
    assert router.sp.decode(draft) == wire.render_answer(
        [{"name": "search_products", "arguments": {"product": "desk lamp", "max_price": 50}}])


def _request_at(router, request):
    """A compiled request as the heads read it -> (grammar, request ids, tag names,
    intent names, {word bytes: the token its tag is read on})."""
    _, words, text = datadir.request_words(router.sp, request, router.heads.nbytes)
    return (router.grammar(router.catalogue), router.encode_request(request), router.meta["tags"],
            router.meta["intents"], {text[a:z]: tok for tok, a, z in words})


def _tag_logits(req, tags, at, tagged):
    """Tag logits of a request (_request_at) where each (word, tag) given is sure
    and every other word is O."""
    tag_logits = torch.full((len(req), len(tags)), -9.0)
    tag_logits[:, tags.index("O")] = 0.0
    for word, tag in tagged:
        tag_logits[at[word], tags.index(tag)] = 9.0
    return tag_logits


def test_tags_that_fill_the_next_tools_required_arguments_outvote_a_no_call_intent(router):
    """The intent head says no call, but the tagger marked the order number: the
    draft is the call of the tool the intent head rates next, and the answer must
    be a call. Tags that leave a required argument of that tool empty, or that
    name a key it lacks, or the rule switched off, leave the no call standing (a
    guess the decoder may overrule); with nothing tagged the no call is the answer."""
    request = "where is my order 12345"
    g, req, tags, intents, at = _request_at(router, request)

    def heads_turn(tagged, on=True):
        tag_logits = _tag_logits(req, tags, at, tagged)
        intent = torch.full((len(intents),), -9.0)
        intent[intents.index(datadir.NO_CALL)], intent[intents.index("track_order")] = 9.0, 5.0
        ans = _Answer(router, g, request, req)
        router.tags_call, router.answer_from_heads = on, False     # the draft only drafts: see the grammar
        try:
            drafted, _ = router.heads.answer((tag_logits, intent, None), ans, router.catalogue, 64)
        finally:
            router.tags_call = router.answer_from_heads = True
        first = router.vocab.allowed(ans.g, ans.state)
        declines, calls = bool((first == router.nocall_id).any()), bool((first == router.call_id).any())
        return router.sp.decode(drafted), ans.must_call, declines, calls

    call = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "12345"}}])
    decline = wire.NOCALL + wire.REASON_NO_TOOL + wire.END    # (a guess for the decoder to verify)
    assert heads_turn([(b"12345", "B-order_id")]) == (call, True, False, True)     # a call, no decline offered
    assert heads_turn([(b"12345", "B-order_id")], on=False) == (decline, False, True, True)
    assert heads_turn([(b"12345", "B-order_id"), (b"where", "B-city")]) == (decline, False, True, True)   # a key it lacks
    # nothing tagged: the no call stands, the decoder may only write its reason
    assert heads_turn([]) == (decline, False, True, False)
    router.untagged_declines = False
    try:
        # (with Router.hush_o every word here is sure to be no value: nothing to copy, no call)
        assert heads_turn([]) == (decline, False, True, False)
        router.hush_o = 0
        assert heads_turn([]) == (decline, False, True, True)
    finally:
        router.untagged_declines, router.hush_o = True, 0.99


def test_tags_the_intents_tool_lacks_pick_a_tool_rated_next_that_takes_them_all(router):
    """Heads.draft: the intent head names a tool without the tagged key (a call
    of a contact for "Text Ann: ..."); a tool it rates at least 5% that takes
    every tagged key, its required ones filled, is drafted instead. Rated lower,
    or with the rule off, the intent head's tool stays."""
    request = "where is my order 12345"
    g = router.grammar(router.catalogue)
    req = router.encode_request(request)
    tags, intents = router.meta["tags"], router.meta["intents"]
    _, words, text = datadir.request_words(router.sp, request, router.heads.nbytes)
    tag_logits = torch.full((len(req), len(tags)), -9.0)
    tag_logits[:, tags.index("O")] = 0.0
    tag_logits[next(tok for tok, a, z in words if text[a:z] == b"12345"), tags.index("B-order_id")] = 9.0
    lacks = next(t["name"] for t in router.catalogue if "order_id" not in t["parameters"]["properties"])

    def drafted(second, on=True):
        intent = torch.full((len(intents),), -20.0)
        intent[intents.index(lacks)], intent[intents.index("track_order")] = 0.0, second
        router.tags_pick = on
        try:
            draft, *_ = router.heads.draft((tag_logits, intent, None), _Answer(router, g, request, req),
                                           router.catalogue)
        finally:
            router.tags_pick = True
        return wire.parse_answer(router.sp.decode(draft), router.catalogue)["calls"][0]["name"]
    assert drafted(-1.0) == "track_order"            # rated 27%
    assert drafted(-5.0) == lacks                    # rated 0.7%
    assert drafted(-1.0, on=False) == lacks


def test_a_drafted_list_goes_on_only_where_a_comma_or_conjunction_joins_its_items(router):
    """Heads.draft: runs of a list's key joined by "and" (or a comma) alone are one
    list; a run after other words opens the next call."""
    request = "add milk and eggs to my list, then bread please"
    g = router.grammar(router.catalogue)
    req = router.encode_request(request)
    tags = router.meta["tags"]
    tag_logits = torch.full((len(req), len(tags)), -9.0)
    tag_logits[:, tags.index("O")] = 0.0
    _, words, text = datadir.request_words(router.sp, request, router.heads.nbytes)
    for word in (b"milk", b"eggs", b"bread"):
        tag_logits[next(tok for tok, a, z in words if text[a:z] == word), tags.index("B-items")] = 9.0
    name = next(t["name"] for t in router.catalogue if t["name"] in router.meta["intents"]
                and "items" in t["parameters"]["properties"])      # add_to_cart or add_to_shopping_list
    intent = torch.full((len(router.meta["intents"]),), -9.0)
    intent[router.meta["intents"].index(name)] = 9.0
    ans = _Answer(router, g, request, req)
    draft, whole, _, held = router.heads.draft((tag_logits, intent, None), ans, router.catalogue)
    assert whole and router.sp.decode(draft) == wire.render_answer(
        [{"name": name, "arguments": {"items": ["milk", "eggs"]}}, {"name": name, "arguments": {"items": ["bread"]}}])
    assert [text[a + 1:z + 1] for a, z in held["items"]] == [b"milk", b"eggs", b"bread"]


def test_the_heads_answer_when_their_tool_takes_strings_only(router, monkeypatch):
    """answer_from_heads: the draft is the answer (one pass), if its tool takes plain
    strings only and the grammar takes it; otherwise the decoder answers."""
    track = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "12345"}}])
    monkeypatch.setattr(router.heads, "draft", lambda aux, ans, tools: (router.sp.encode(track), True, [], {}))
    ids, info = router.generate_constrained(None, "where is my order 12345?", 64)
    assert router.sp.decode(ids) == track and info["passes"] == 1 and 0 < info["confidence"] <= 1
    # a tool with a number, or a draft the grammar refuses (another tool is required): the decoder
    numeric = next(t for t in router.catalogue if any(p.get("type") != "string" or "enum" in p
                                                      for p in t["parameters"]["properties"].values()))
    args = {k: 1 for k in numeric["parameters"].get("required", [])}
    monkeypatch.setattr(router, "span_keys", set())      # numbers the data does not always copy
    monkeypatch.setattr(router.heads, "draft", lambda aux, ans, tools: (router.sp.encode(
        wire.render_answer([{"name": numeric["name"], "arguments": args}])), True, [], {}))
    _, info = router.generate_constrained(None, "where is my order 12345?", 64)
    assert info["passes"] > 1
    monkeypatch.setattr(router.heads, "draft", lambda aux, ans, tools: (router.sp.encode(track), True, [], {}))
    ids, info = router.generate_constrained(None, "where is my order 12345?", 64, tool_choice="none")
    assert info["passes"] > 1 and wire.CALL not in router.sp.decode(ids)


def test_bench_routers_times_each_model(compiled_ckpt, compiled_data, tmp_path):
    from utils import bench_routers
    out = str(tmp_path / "routers.json")
    bench_routers.main(["--model", f"c={compiled_ckpt}:{os.path.join(compiled_data, 'test.jsonl')}",
                        "--n", "3", "--out", out])
    row = json.load(open(out))["models"]["c"]
    assert row["n"] == 3 and 0 < row["p50_ms"] <= row["p95_ms"] and row["compiled"]


def test_bench_routers_times_two_checkouts_side_by_side(compiled_ckpt, compiled_data, tmp_path):
    """--before: this code against another checkout (here: itself), item by item."""
    from utils import bench_routers
    out = str(tmp_path / "ab.json")
    bench_routers.main(["--model", f"c={compiled_ckpt}:{os.path.join(compiled_data, 'test.jsonl')}",
                        "--n", "2", "--threads", "1", "--before", ROOT, "--out", out])
    rows = json.load(open(out))["models"]
    assert rows["c before"]["n"] == rows["c after"]["n"] == 2 and rows["c after"]["same_answers"] == "12/12"
    with pytest.raises(SystemExit):
        bench_routers.main(["--model", f"c={compiled_ckpt}:{os.path.join(compiled_data, 'test.jsonl')}",
                            "--before", str(tmp_path), "--out", out])


def test_a_teacher_labels_a_compiled_catalogue(tmp_path, monkeypatch):
    """--compiled with --teacher: the teacher sees the whole catalogue; its answers
    become the training labels; the examples keep no tools (tools.json has them)."""
    import data
    from fake_servers import Fake
    fake = Fake("openai")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    out = str(tmp_path / "d")
    try:
        data.main(["--compiled", "--domains", "weather", "--out_dir", out, "--teacher", "openai",
                   "--teacher_base_url", fake.url, "--teacher_rps", "1000", "--n_train", "40", "--n_val", "6",
                   "--n_test", "6", "--n_test_unseen", "4", "--vocab_size", "500"])
        asked = fake.requests[0][2]                # (path, headers, body)
    finally:
        fake.close()
    names = {t["name"] for t in wire.load_tools(os.path.join(out, "tools.json"))}
    assert {t["function"]["name"] for t in asked["tools"]} == names       # the whole catalogue
    train = datadir.read_jsonl(os.path.join(out, "train.jsonl"))
    assert train and all(ex["label"].startswith("openai:") and "tools" not in ex for ex in train)


@pytest.mark.parametrize("from_heads", [True, False])
def test_every_copied_value_is_a_run_of_whole_request_words(router, compiled_data, from_heads):
    """Over the test split: each value of a span key (data.py: the data always copies
    it) comes out as a run of whole request words, whoever writes it (the heads or
    the decoder): no "cggs" for "eggs", no "La Paz?", no "10" of "107"."""
    assert router.span_keys                                  # the data dir lists them
    router.answer_from_heads = from_heads
    checked = 0
    try:
        for ex in datadir.read_jsonl(os.path.join(compiled_data, "test.jsonl")):
            res = router.answer(None, ex["request"], 64, tool_choice="required")
            spans = grammar.Spans(ex["request"])
            for c in res["calls"]:
                for k, v in c["arguments"].items():
                    if (c["name"], k) in router.span_keys:
                        assert grammar.is_span(v, spans), (ex["request"], c["name"], k, v)
                        checked += 1
    finally:
        router.answer_from_heads = True
    assert checked > 5


def test_a_call_is_never_written_twice(router):
    """_Answer.push: a call that closes as one of the answer's earlier calls is
    taken back and the answer ends there (a repeating model stops). (A request
    that says its values once cannot even begin the repeat: a word is copied
    once, grammar.Spans.took; these requests say them three and two times.)"""
    from sample import _Answer
    one = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "ORD-1"}}])[:-len(wire.END)]
    ans = _Answer(router, router.grammar(router.catalogue), "track ORD-1, ORD-1, ORD-1 and ORD-2", [])
    ans.push(router.sp.encode(one + one + one + wire.END))
    assert ans.done() and router.sp.decode(ans.out) == one + wire.END
    two = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "ORD-2"}}])[:-len(wire.END)]
    ans = _Answer(router, router.grammar(router.catalogue), "track ORD-1 and ORD-2", [])
    ans.push(router.sp.encode(one + two + wire.END))
    assert ans.done() and router.sp.decode(ans.out) == one + two + wire.END
    # the same call with its arguments in another order is the same call
    a = wire.render_answer([{"name": "return_order", "arguments": {"order_id": "ORD-1", "product": "lamp"}}])
    b = wire.render_answer([{"name": "return_order", "arguments": {"product": "lamp", "order_id": "ORD-1"}}])
    a, b = a[:-len(wire.END)], b[:-len(wire.END)]
    ans = _Answer(router, router.grammar(router.catalogue), "return the lamp from ORD-1, the lamp from ORD-1", [])
    ans.push(router.sp.encode(a + b + wire.END))
    assert ans.done() and router.sp.decode(ans.out) == a + wire.END


def test_a_later_call_the_model_would_not_fill_is_taken_back(router):
    """step and _Answer.unwanted: in a compiled model's second or later call, a
    text value no tagged run holds is written only as the model would write it;
    when the grammar leaves only words the model gives less than min_value_p (the
    phone it wanted is taken), the call is taken back and the answer ends there.
    The first call, and a choice the model likes best, are never taken back."""
    from sample import DROP, step
    g = router.grammar(router.catalogue)
    assert "order_id" in g.tools[b"track_order"]["texts"]
    request = "track ORD-1 please"
    first = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "ORD-1"}}])[:-len(wire.END)]
    refused = torch.zeros(router.sp.get_piece_size())
    refused[router.nocall_id] = 30.0                     # what the model wants, the grammar does not allow here

    def at_second_value():
        ans = _Answer(router, g, request, router.encode_request(request))
        ans.push(router.sp.encode(first + wire.CALL + "track_order" + wire.ARG + " order_id:"))
        assert ans.state.phase == "value" and ans.state.calls == 2
        return ans
    ans = at_second_value()
    toks, _ = step(ans, lambda: refused)
    assert toks == [DROP]
    ans.push(toks)
    assert ans.done() and router.sp.decode(ans.out) == first + wire.END
    ans = at_second_value()                              # the model's own choice stands
    liked = torch.zeros(router.sp.get_piece_size())
    liked[int(ans.allowed()[0])] = 30.0
    assert step(ans, lambda: liked)[0] != [DROP]
    ans = _Answer(router, g, request, router.encode_request(request))   # the first call: never taken back
    ans.push(router.sp.encode(wire.CALL + "track_order" + wire.ARG + " order_id:"))
    assert step(ans, lambda: refused)[0] != [DROP]


def test_a_first_call_of_a_tool_the_request_cannot_fill_asks_for_the_value(router, monkeypatch):
    """_Answer.asks_for: when the tool the model rates highest for its first call
    has a required value the request does not hold (grammar.Grammar.blocked), the
    answer is the decline that asks for it; otherwise nothing changes."""
    from sample import _Answer
    g = router.grammar(router.catalogue)
    ans = _Answer(router, g, "where is my order", router.encode_request("where is my order"))
    ans.push([router.call_id])
    names = router.meta["tool_tokens"]
    logits = torch.zeros(router.sp.get_piece_size())
    logits[names["track_order"]] = 9.0
    assert ans.asks_for(lambda: logits) is None                    # nothing blocked: the model chooses
    monkeypatch.setattr(type(g), "blocked", lambda self, spans: (frozenset({b"track_order"}),
                                                                 {b"track_order": frozenset({"order_id"})}))
    toks = ans.asks_for(lambda: logits)
    ans.push(toks)
    assert ans.done() and router.sp.decode(ans.out) == wire.NOCALL + wire.REASON_MISSING + "order_id" + wire.END
    # a call the client requires (tool_choice="required") never asks: the grammar
    # would not take the decline while another tool is open
    logits[names["track_order"]] = 9.0
    ans = _Answer(router, router.grammar(router.catalogue, "required"), "where is my order",
                  router.encode_request("where is my order"))
    ans.push([router.call_id])
    assert ans.asks_for(lambda: logits) is None
    logits[names["track_order"]] = -9.0                             # its best tool is open: no decline
    ans = _Answer(router, g, "where is my order", router.encode_request("where is my order"))
    ans.push([router.call_id])
    assert ans.asks_for(lambda: logits) is None


def test_every_copied_value_of_the_test_split_is_a_run_of_whole_request_words(router, compiled_data):
    """Over the compiled data's whole test split: every value the decoder writes
    for a span key is a run of whole words of its request (or a number it states),
    whatever the (barely trained) model prefers."""
    items = datadir.read_jsonl(os.path.join(compiled_data, "test.jsonl"))
    assert router.span_keys and items
    checked = 0
    for ex in items:
        res = router.answer(None, ex["request"], 64)
        spans = grammar.Spans(ex["request"])
        for c in res["calls"]:
            for k, v in c["arguments"].items():
                if (c["name"], k) in router.span_keys:
                    assert grammar.is_span(v, spans), (c["name"], k, v, ex["request"])
                    checked += 1
    assert checked > 0


def test_a_further_call_is_of_a_tool_that_takes_a_waiting_value(router):
    """_Answer.allowed: once a call is written, the next one names a tool with an
    argument for a value the heads tagged and no call has taken yet."""
    from sample import _Answer
    request = "track ORD-1 and the weather in Oslo"
    ans = _Answer(router, router.grammar(router.catalogue), request, [])
    ans.found, ans.found_keys = ["ORD-1", "Oslo"], [("order_id", "ORD-1", None), ("city", "Oslo", None)]
    first = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "ORD-1"}}])[:-len(wire.END)]
    ans.push(router.sp.encode(first) + [router.call_id])
    allowed = {router.sp.id_to_piece(int(t)) for t in ans.allowed()}
    with_city = {t["name"] for t in router.catalogue if "city" in t["parameters"]["properties"]}
    assert with_city and allowed == with_city
    router.cover_found = False
    try:
        free = {router.sp.id_to_piece(int(t)) for t in ans.allowed()}
        assert allowed < free and "track_order" in free
    finally:
        router.cover_found = True


def test_a_waiting_value_keeps_the_answer_open_unless_the_model_is_sure_it_ends(router):
    """_Answer.allowed: with a tagged value no call took, the answer may not end
    (another call is written for it), unless the model gives <|end|> at least
    Router.end_sure: a stray tagged word ("randomize and play my X playlist" ->
    cancel_event(title="randomize")) then opens no call."""
    from sample import _Answer
    ans = _Answer(router, router.grammar(router.catalogue), "track ORD-1 and the weather in Oslo", [])
    ans.found, ans.found_keys = ["ORD-1", "Oslo"], [("order_id", "ORD-1", None), ("city", "Oslo", None)]
    first = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "ORD-1"}}])[:-len(wire.END)]
    ans.push(router.sp.encode(first))
    assert router.call_id in ans.r.vocab.allowed(ans.g, ans.state).tolist()
    logits = torch.zeros(router.model.config.vocab_size)

    def may_end(end_logit):
        logits[router.end_id] = end_logit
        return router.end_id in ans.allowed(lambda: logits).tolist()
    assert not may_end(0.0) and not may_end(2.0)          # the model unsure: a call for "Oslo" is written
    assert may_end(30.0)                                   # sure (p > 0.99): it may end
    assert router.end_sure == 0.99
    assert router.end_id not in ans.allowed().tolist()     # no logits, no exception


def test_a_run_surely_of_a_tool_not_called_yet_keeps_the_answer_open(router):
    """_Answer.allowed with runs held per tool (Router.tools_per_run): a run
    held for one tool alone, whose call the answer has not made, keeps it open
    even when the model is sure it ends ("play the album Abbey Road and turn off
    the kitchen lights": the lights' call is written); not when that tool needs
    a copied value no waiting run holds, nor with Router.call_waiting off."""
    from sample import _Answer
    request = "track ORD-1 and the air quality in Oslo"
    at = lambda w: (request.index(w), request.index(w) + len(w))

    def answer(held):
        ans = _Answer(router, router.grammar(router.catalogue), request, [])
        ans.found = ["ORD-1", "Oslo"]
        ans.state.spans.hold(held)
        first = wire.render_answer([{"name": "track_order", "arguments": {"order_id": "ORD-1"}}])[:-len(wire.END)]
        ans.push(router.sp.encode(first))
        return ans
    logits = torch.zeros(router.model.config.vocab_size)
    logits[router.end_id] = 30.0                            # the model sure the answer ends
    ans = answer({(b"track_order", "order_id"): [at("ORD-1")], (b"get_air_quality", "city"): [at("Oslo")]})
    assert ans.uncalled() == {b"get_air_quality"}
    assert router.end_id not in ans.allowed(lambda: logits).tolist()
    router.call_waiting = False
    try:
        assert router.end_id in ans.allowed(lambda: logits).tolist()
    finally:
        router.call_waiting = True
    # held for two tools (unsure), or for a tool needing another copied value: may end
    both = answer({(b"track_order", "order_id"): [at("ORD-1")], (b"get_air_quality", "city"): [at("Oslo")],
                   (b"get_weather", "city"): [at("Oslo")]})
    assert both.uncalled() == set() and router.end_id in both.allowed(lambda: logits).tolist()
    needy = next(t for t in router.catalogue if len(set(t["parameters"].get("required", [])) & {
        k for k, p in t["parameters"]["properties"].items() if p.get("type") == "string"}) > 1)
    key = sorted(needy["parameters"]["required"])[0]
    lacking = answer({(b"track_order", "order_id"): [at("ORD-1")], (needy["name"].encode(), key): [at("Oslo")]})
    assert lacking.uncalled() == set()


def test_each_tagged_run_goes_to_the_tool_its_words_name(router):
    """Router.tools_per_run: with the intent head read at every request token, each
    tagged run is a value of the tool its words rate highest among those that
    take its key: the draft holds both calls of a two-tool request, and the
    runs are held per (tool, key) for the decoder."""
    request = "where is my order 12345 and the air quality in Paris"
    g, req, tags, intents, at = _request_at(router, request)
    tag_logits = _tag_logits(req, tags, at, [(b"12345", "B-order_id"), (b"Paris", "B-city")])
    each = torch.full((len(req), len(intents)), -9.0)
    each[:, intents.index("track_order")] = 0.0
    each[at[b"Paris"], intents.index("get_air_quality")] = 5.0
    intent = each.mean(0)
    router.tools_per_run = True
    try:
        draft, whole, _, held = router.heads.draft((tag_logits, intent, each), _Answer(router, g, request, req),
                                                   router.catalogue)
    finally:
        router.tools_per_run = False
    # (a draft of two tools is verified only: a third call, of a value left untagged, stays possible)
    assert not whole and router.sp.decode(draft) == wire.render_answer(
        [{"name": "track_order", "arguments": {"order_id": "12345"}},
         {"name": "get_air_quality", "arguments": {"city": "Paris"}}])
    assert set(held) == {(b"track_order", "order_id"), (b"get_air_quality", "city")}
    # words that rate two tools alike (under Router.run_tool_sure): any tool that takes it may
    other = next(t["name"] for t in router.catalogue if t["name"] != "get_air_quality"
                 and "city" in t["parameters"]["properties"])
    each[at[b"Paris"], intents.index(other)] = 5.0
    router.tools_per_run = True
    try:
        _, _, _, held = router.heads.draft((tag_logits, intent, each), _Answer(router, g, request, req),
                                           router.catalogue)
    finally:
        router.tools_per_run = False
    city = {(t["name"].encode(), "city") for t in router.catalogue if "city" in t["parameters"]["properties"]}
    assert len(city) > 2 and set(held) == {(b"track_order", "order_id")} | city


def test_a_decline_for_a_missing_value_the_heads_found_is_decoded_again_as_a_call(router, monkeypatch):
    """Router.found_not_missing: "missing argument: city" while the tagger found a
    city in the request contradicts the heads; such an answer is decoded again
    with a call required (both decoders)."""
    import sample
    request = "where is my order 12345"
    g = router.grammar(router.catalogue)
    ans = _Answer(router, g, request, router.encode_request(request))
    ans.out = [router.nocall_id] + router.sp.encode(wire.REASON_MISSING + "order_id") + [router.end_id]
    ans.found_keys = [("order_id", "12345", None)]
    assert ans.says_missing_what_it_found()
    ans.found_keys = [("city", "12345", None)]
    assert not ans.says_missing_what_it_found()
    router.found_not_missing = False
    try:
        ans.found_keys = [("order_id", "12345", None)]
        assert not ans.says_missing_what_it_found()
    finally:
        router.found_not_missing = True
    # the first answer "says missing": the one returned is a call all the same
    said = []
    monkeypatch.setattr(sample._Answer, "says_missing_what_it_found", lambda self: not said and not said.append(1))
    ids, _ = router.generate_constrained(None, request, 64)
    assert ids[0] == router.call_id and said
    said.clear()
    assert router.decode_reference(None, request, 64)[0] == router.call_id and said
