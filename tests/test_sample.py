import json
import os

import pytest

import grammar
import wire
import sample
from sample import MIN_ANSWER_TOKENS, Router

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def router(toy_ckpt):
    return Router(toy_ckpt)


def test_cached_and_uncached_greedy_give_the_same_tokens(router, toy_data):
    items = [json.loads(l) for l in open(os.path.join(toy_data, "test.jsonl"))][:3]
    for ex in items:
        ids = router.encode_prompt(ex["tools"], ex["request"])
        assert router.generate(ids, 20, use_cache=True) == router.generate(ids, 20, use_cache=False)


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_fast_decoder_gives_the_reference_decoders_tokens(router, toy_data, tool_choice):
    """generate_constrained (prefix cache, forced spans, copy speculation) is the
    plain loop of decode_reference made faster: the same tokens, and never more
    than the budget (the closing <|end|> included) unless even the shortest
    no-call does not fit."""
    items = [json.loads(l) for l in open(os.path.join(toy_data, "test.jsonl"))][:6]
    shortest = 2 + len(router.sp.encode(wire.REASON_NO_TOOL))
    for ex in items:
        for budget in (5, 12, 40):
            ref = router.decode_reference(ex["tools"], ex["request"], budget, tool_choice=tool_choice)
            fast, info = router.generate_constrained(ex["tools"], ex["request"], budget, tool_choice=tool_choice)
            assert fast == ref, (ex["request"], budget)
            assert len(fast) <= max(budget, shortest)
            assert fast[-1] == router.end_id


def test_answer_reports_validity_and_latency(router):
    tools = wire.load_tools(os.path.join(ROOT, "examples", "tools.json"))
    res = router.answer(tools, "Where's my order ORD-1234?", max_new_tokens=16)
    assert res["latency_ms"] > 0 and 0 < res["tokens"] <= 16
    assert res["valid"] == (res["error"] is None)
    with pytest.raises(ValueError, match="empty"):
        router.answer(tools, "  ")


def test_prompt_longer_than_context_is_refused(router):
    with pytest.raises(ValueError, match="context"):
        router.generate([5] * (router.model.config.block_size + 1))
    # the raw decoder, like the constrained ones, leaves MIN_ANSWER_TOKENS of room
    block = router.model.config.block_size
    with pytest.raises(ValueError, match="too little room"):
        router.generate([5] * (block - MIN_ANSWER_TOKENS + 1))
    assert len(router.generate([5] * (block - MIN_ANSWER_TOKENS), 64)) <= MIN_ANSWER_TOKENS


def test_a_catalogue_in_the_prompt_holds_numbers_to_the_ones_the_request_states(router):
    """The general data copies nearly every string and number from its request
    (data.py: meta span_values), so any catalogue's values are held to the request:
    a required number the request does not state leaves that tool nothing to call
    with, and a stated one is the only number a call can write."""
    assert router.meta["span_values"] and router.span_every
    tools = [{"name": "buy_tickets", "description": "Buy tickets for an event.", "parameters": {
        "type": "object", "properties": {"count": {"type": "integer"}, "event": {"type": "string"}},
        "required": ["count", "event"]}}]
    res = router.answer(tools, "buy tickets for the Toto concert", 40, tool_choice="required")
    assert res["calls"] == [] and res["valid"], res
    res = router.answer(tools, "buy 3 tickets for the Toto concert in July", 40, tool_choice="required")
    assert res["calls"] and all(c["arguments"]["count"] == 3 for c in res["calls"]), res
    spans = grammar.Spans("buy 3 tickets for the Toto concert in July")
    assert all(grammar.is_span(c["arguments"]["event"], spans) for c in res["calls"]), res


def test_a_call_without_ground_in_the_request_is_not_made(router):
    """sample.ground: a catalogue-in-the-prompt answer keeps a call when one of
    its values is a value of the request's (not a boolean or an enum member), or
    when the request shares a word with its tool; the others go, and an answer
    left with none declines. A call the client requires is left alone."""
    tools = wire.load_tools(os.path.join(ROOT, "examples", "tools.json"))
    weather_in_f = {"name": "get_current_weather", "arguments": {"unit": "fahrenheit"}}
    timer = {"name": "set_timer", "arguments": {"minutes": 5}}

    def grounded(calls, request, tool_choice="auto"):
        ids = router.sp.encode(wire.render_answer(calls))
        return wire.parse_answer(router.sp.decode(sample.ground(router, ids, tools, request, tool_choice)), tools)

    # no value from the request, no word of get_current_weather's: the call goes
    assert grounded([timer, weather_in_f], "five minutes on the clock")["calls"] == [timer]
    left = grounded([weather_in_f], "sign me up for the 10K race")
    assert left["calls"] == [] and left["reason"] == wire.REASON_NO_TOOL
    # a word of its tool's ("weather") is ground, and so is any value not from a fixed list
    assert grounded([weather_in_f], "how is the weather, in fahrenheit")["calls"] == [weather_in_f]
    oslo = {"name": "get_current_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}
    assert grounded([oslo], "Oslo tomorrow?")["calls"] == [oslo]
    # the client asks for a call: it is made
    assert grounded([weather_in_f], "sign me up for the 10K race", "required")["calls"] == [weather_in_f]
    router.grounded = False
    try:
        assert grounded([weather_in_f], "sign me up for the 10K race")["calls"] == [weather_in_f]
    finally:
        router.grounded = True
