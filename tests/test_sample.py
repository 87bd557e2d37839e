import json
import os

import pytest

import wire
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
