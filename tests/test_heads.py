"""The aux heads of a catalogue-in-the-prompt model: pointer targets in the data,
the pointer losses, and drafting from them (compiled models: test_compiled.py)."""

import json
import os

import numpy as np
import pytest
import torch

import datadir
import grammar
import wire
from conftest import ROOT
from sample import Router, _Answer, settle
from test_grammar import _takes

TOOLS = wire.load_tools(os.path.join(ROOT, "examples", "tools.json"))


def test_catalogue_positions_point_at_the_names(toy_data):
    d = datadir.load_data_dir(toy_data)
    names, args = datadir.catalogue_positions(d.sp, TOOLS)
    ids = d.sp.encode(wire.render_prefix(TOOLS))
    for t in TOOLS:
        assert d.sp.decode(ids[names[t["name"]]:names[t["name"]] + 8]).startswith(t["name"][:4])
        for k in t["parameters"]["properties"]:
            assert d.sp.decode(ids[args[(t["name"], k)]:args[(t["name"], k)] + 6]).startswith(" " + k[:3])


def test_pointer_targets_are_the_called_tool_and_each_values_argument(toy_data):
    d = datadir.load_data_dir(toy_data)
    split = datadir.Split(toy_data, "train", 512)
    examples = datadir.read_jsonl(os.path.join(toy_data, "train.jsonl"))
    checked = 0
    for k, ex in enumerate(examples[:60]):
        if not ex["calls"] or k >= len(split):
            continue
        b = split.batch([k], d.special(wire.PAD))
        names, args = datadir.catalogue_positions(d.sp, ex["tools"])
        assert b.intent[0] == names[ex["calls"][0]["name"]]
        ptr = b.ptr[0][b.ptr[0] >= 0].tolist()
        valid = {p for (n, _), p in args.items() if n in {c["name"] for c in ex["calls"]}}
        assert set(ptr) <= valid
        checked += bool(ptr)
    assert checked > 5


def test_pointer_heads_train_and_log_their_losses(pointer_ckpt):
    log = open(os.path.join(os.path.dirname(pointer_ckpt), "log.txt")).read()
    assert "| tag " in log and "| intent " in log and "| arg " in log
    cfg = torch.load(pointer_ckpt, weights_only=True)["model_config"]
    assert cfg["pointer_heads"] and cfg["n_tags"] == 4 and cfg["n_intents"] == 0


@pytest.fixture(scope="module")
def router(pointer_ckpt):
    return Router(pointer_ckpt)


def test_a_draft_from_pointers_names_the_pointed_tool_and_argument(router):
    g = router.grammar(TOOLS)
    req = router.encode_request("weather in Oslo please")
    names, args = router.heads.catalogue_positions(TOOLS)
    n_cat = len(router.encode_prefix(TOOLS))
    tags = router.meta["tags"]
    tag_logits = torch.full((len(req), len(tags)), -9.0)
    tag_logits[:, tags.index("O")] = 0.0
    _, words, text = datadir.request_words(router.sp, "weather in Oslo please", router.heads.nbytes)
    at = next(tok for tok, a, z in words if text[a:z] == b"Oslo")     # the word's tag: on its first letter's token
    tag_logits[at, tags.index("B")] = 9.0
    intent = torch.zeros(n_cat)
    intent[names["get_current_weather"]] = 9.0
    arg = torch.zeros(len(req), n_cat)
    arg[:, args[("get_current_weather", "city")]] = 9.0
    ans = _Answer(router, g, "weather in Oslo please", req)
    draft, whole, found, _ = router.heads.draft((tag_logits, intent, arg), ans, TOOLS)
    assert whole and router.sp.decode(draft) == wire.render_answer(
        [{"name": "get_current_weather", "arguments": {"city": "Oslo"}}])
    assert found == ["Oslo"]                           # read a word at a time: the whole word
    intent[0] = 99.0                                   # pointing at <|tools|>: no call, no draft
    oslo = (text.index(b"Oslo") - 1, text.index(b"Oslo") + 3)       # (grammar.Spans' offsets: no leading space)
    assert router.heads.draft((tag_logits, intent, arg), ans, TOOLS) == ([], False, ["Oslo"], {"city": [oslo]})


def _weather_heads(router, request, tagged):
    """The heads' logits for a request -> (its token ids, (tag, intent, arg)
    logits): the intent head names get_current_weather, the arg head points
    every word at its city, and the tagger marks the words in tagged B, the
    others O."""
    req = router.encode_request(request)
    names, args = router.heads.catalogue_positions(TOOLS)
    n_cat = len(router.encode_prefix(TOOLS))
    tags = router.meta["tags"]
    _, words, text = datadir.request_words(router.sp, request, router.heads.nbytes)
    intent = torch.zeros(n_cat)
    intent[names["get_current_weather"]] = 9.0
    arg = torch.zeros(len(req), n_cat)
    arg[:, args[("get_current_weather", "city")]] = 9.0
    tag_logits = torch.full((len(req), len(tags)), -9.0)
    tag_logits[:, tags.index("O")] = 0.0
    for word in tagged:
        tag_logits[next(tok for tok, a, z in words if text[a:z] == word), tags.index("B")] = 9.0
    return req, (tag_logits, intent, arg)


def test_a_decline_asks_for_a_value_the_intents_tool_needs_and_no_run_holds(router):
    """heads.Heads.asks_for and sample.settle: the intent head names
    get_current_weather and the tagger marks no city: a decline's reason is
    "missing argument: city", whatever reason the decoder wrote; a call is left
    alone. With the city tagged, or the rule off, nothing is asked."""
    request = "what is the weather like right now"
    call = router.sp.encode(wire.render_answer([{"name": "set_timer", "arguments": {"minutes": 5}}]))

    def settled(tagged, ids, on=True, budget=64):
        req, aux = _weather_heads(router, request, tagged)
        ans = _Answer(router, router.grammar(TOOLS), request, req)
        router.asks_general = on
        try:
            router.heads.answer(aux, ans, TOOLS, 64)
        finally:
            router.asks_general = True
        return wire.parse_answer(router.sp.decode(settle(router, ans, ids, TOOLS, budget)), TOOLS)

    missing = {"calls": [], "reason": wire.REASON_MISSING + "city"}
    assert settled([], list(router.decline_ids)) == missing
    assert settled([], call)["calls"][0]["name"] == "set_timer"
    assert settled([b"weather"], list(router.decline_ids))["reason"] == wire.REASON_NO_TOOL
    assert settled([], list(router.decline_ids), on=False)["reason"] == wire.REASON_NO_TOOL
    short = len(router.decline_ids)                      # the ask does not fit the budget: not asked
    assert len(router.sp.encode(wire.render_answer([], missing["reason"]))) > short
    assert settled([], list(router.decline_ids), budget=short)["reason"] == wire.REASON_NO_TOOL


def test_a_value_of_a_catalogue_in_the_prompt_is_a_run_tagged_for_its_argument(router):
    """hold_general: get_current_weather's city must be a run the arg head points at
    "city" for. Tagged: the city is that run, whatever else the request holds; not
    tagged: no tool that needs a city is offered, and an optional argument with no
    run is not written at all. Off: any request words."""
    request = "weather in Oslo or Paris please"

    def spans_after_heads(tagged, on=True):
        req, aux = _weather_heads(router, request, tagged)
        ans = _Answer(router, router.grammar(TOOLS), request, req)
        router.hold_general, router.answer_from_heads = on, False
        try:
            router.heads.answer(aux, ans, TOOLS, 64)
        finally:
            router.hold_general = router.answer_from_heads = True
        return ans.g, ans.state.spans

    city = grammar.spanned(grammar.value_node({"type": "string"}))
    g, spans = spans_after_heads([b"Paris"])
    assert _takes(city, spans.for_key("city"), "Paris") and not _takes(city, spans.for_key("city"), "Oslo")
    assert "get_current_weather" not in {n.decode() for n in g.blocked(spans)[0]}
    g, spans = spans_after_heads([])
    assert "get_current_weather" in {n.decode() for n in g.blocked(spans)[0]}
    optional = {(t["name"], k) for t in TOOLS for k, p in t["parameters"]["properties"].items()
                if k not in t["parameters"].get("required", []) and (t["name"], k) in router.spans_of(TOOLS)}
    assert optional and all(k in g.blocked(spans)[1].get(n.encode(), ()) for n, k in optional)
    g, spans = spans_after_heads([], on=False)
    assert _takes(city, spans.for_key("city"), "Oslo")
    assert "get_current_weather" not in {n.decode() for n in g.blocked(spans)[0]}


def test_decoders_agree_with_pointer_heads_drafting(router, toy_data):
    """The reference includes the heads' answer: the fast decoder (drafting, heads
    answering) gives its tokens, with no switch."""
    assert router.heads is not None and router.answer_from_heads
    for ex in [json.loads(l) for l in open(os.path.join(toy_data, "test.jsonl"))][:4]:
        ref = router.decode_reference(ex["tools"], ex["request"], 24)
        fast, _ = router.generate_constrained(ex["tools"], ex["request"], 24)
        assert fast == ref
    res = router.answer(TOOLS, "weather in Oslo please", 24)      # and answers validly
    assert res["valid"]
