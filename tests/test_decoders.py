"""The reference decoder covers everything that answers: every fast path (each
speed-up off in turn, no cache at all, the heads' draft and the heads' answer)
gives decode_reference's tokens, on every kind of test item of a general model,
a compiled model with aux heads and a general model with pointer heads. And the
log-probabilities an answer reports are the decoder's own."""

import math
import os

import pytest
import torch

import datadir
import wire
from sample import Router

PATHS = {
    "every speed-up": {},
    "no prefix cache": dict(prefix_cache=False),
    "no speculation": dict(speculate=False),
    "no draft": dict(draft=False),
    "no forced spans": dict(forced_spans=False),
    "no KV cache": dict(use_cache=False, forced_spans=False, prefix_cache=False, speculate=False),
}


def items_of_each_kind(router, n=2):
    """The first n test items of each split (seen, unseen, new phrasing, ...)."""
    by_split = {}
    for ex in datadir.read_jsonl(os.path.join(router.ckpt["data_dir"], "test.jsonl")):
        by_split.setdefault(ex.get("split", ""), []).append(ex)
    return [ex for group in by_split.values() for ex in group[:n]]


def strings_only(router, tools, calls):
    """Could the heads' answer stand for these calls (heads.Heads.may_answer)?"""
    by_name = {t["name"]: t for t in tools}
    return calls and all(p.get("type") == "string" and "enum" not in p
                         for c in calls for p in by_name[c["name"]]["parameters"]["properties"].values())


@pytest.mark.parametrize("kind", ["toy_ckpt", "compiled_ckpt", "pointer_ckpt"])
def test_every_fast_path_gives_the_references_tokens(kind, request, monkeypatch):
    router = Router(request.getfixturevalue(kind))
    assert (router.heads is None) == (kind == "toy_ckpt")
    items = items_of_each_kind(router)
    assert len(items) >= 4
    if router.heads is not None:       # and one the heads' answer could stand for, wherever it is
        test = datadir.read_jsonl(os.path.join(router.ckpt["data_dir"], "test.jsonl"))
        items.append(next(ex for ex in test if strings_only(router, router.tools_for(ex.get("tools")), ex["calls"])))
    heads_answered = 0
    for ex in items:
        tools = router.tools_for(ex.get("tools"))
        for budget in (12, 40):
            ref = router.decode_reference(tools, ex["request"], budget)
            for name, kw in PATHS.items():
                fast, _ = router.generate_constrained(tools, ex["request"], budget, **kw)
                assert fast == ref, (kind, name, ex["request"], budget)
        if router.heads is None or not strings_only(router, tools, ex["calls"]):
            continue
        # the heads' answer: heads that draft the gold answer answer alone, on every path
        gold = router.sp.encode(wire.render_answer(ex["calls"]))
        with monkeypatch.context() as m:
            m.setattr(router.heads, "draft", lambda aux, ans, tools: (gold, True, [], {}))
            m.setattr(router, "hold_general", False)    # (this draft tags no run to hold its values to)
            ref = router.decode_reference(tools, ex["request"], 64)
            assert ref == gold
            for name, kw in PATHS.items():
                fast, info = router.generate_constrained(tools, ex["request"], 64, **kw)
                assert fast == gold and info["passes"] == 1, (kind, name)
            heads_answered += 1
    assert router.heads is None or heads_answered


def uncached_logprobs(router, tools, request, ids):
    """Log-probabilities of ids after the prompt from one uncached forward pass with
    the prompt's blocks (training's seg) -> (len(ids), V)."""
    prefix, req = router.encode_prefix(tools), router.encode_request(request)
    seq = prefix + req + ids[:-1]
    seg = [1] * len(prefix) + [2] * len(req) + [0] * (len(ids) - 1)
    with torch.inference_mode():
        out = router.model(torch.tensor([seq]), seg=torch.tensor([seg]))[0, len(prefix) + len(req) - 1:]
    return torch.log_softmax(out.float(), -1)


@pytest.fixture(scope="module")
def compiled(compiled_ckpt):
    return Router(compiled_ckpt)


def test_logprobs_are_the_decoders_own(compiled, monkeypatch):
    """A prefix-LM copy-head model with aux heads: each answer token's reported
    log-probability is what the reference decoder's own logits give it (where
    the reference computed logits), and what one forward pass with the prompt's
    blocks gives; the top-k are the likeliest of the whole vocabulary."""
    router, request = compiled, "where is my order 12345?"
    n_prompt = len(router.encode_prompt(None, request))
    seen, decode = {}, router.model.decode

    def recording(idx, cache, prompt=0, first=-1, aux=False):
        out = decode(idx, cache, prompt, first, aux)
        if first == -1 and prompt != 1:
            seen[cache.pos - n_prompt] = (out[0] if aux else out).clone()
        return out
    monkeypatch.setattr(router, "answer_from_heads", False)     # the decoder writes every token
    monkeypatch.setattr(router.model, "decode", recording)
    ref = router.decode_reference(None, request, 40, tool_choice="required")
    monkeypatch.setattr(router.model, "decode", decode)
    res = router.answer(None, request, 40, tool_choice="required", top_logprobs=3)
    ids = [t for t, _, _ in res["logprobs"]]
    assert ids == ref and router.sp.decode(ids) == res["text"]
    whole = uncached_logprobs(router, None, request, ids)
    assert len(seen) >= 2
    for j, row in seen.items():
        if j < len(ids):
            assert res["logprobs"][j][1] == pytest.approx(float(torch.log_softmax(row.float(), -1)[ids[j]]), abs=1e-4)
    for j, (t, lp, top) in enumerate(res["logprobs"]):
        assert lp == pytest.approx(float(whole[j, t]), abs=1e-4)
        assert [k for k, _ in top] == whole[j].topk(3).indices.tolist()
        assert lp <= top[0][1] + 1e-6
    # the heads' answer (no decoder pass): the same, from one pass over the cached prompt
    track = router.sp.encode(wire.render_answer([{"name": "track_order", "arguments": {"order_id": "12345"}}]))
    monkeypatch.setattr(router, "answer_from_heads", True)
    monkeypatch.setattr(router.heads, "draft", lambda aux, ans, tools: (track, True, [], {}))
    res = router.answer(None, request, 40, top_logprobs=0)
    assert [t for t, _, _ in res["logprobs"]] == track
    whole = uncached_logprobs(router, None, request, track)
    assert [lp for _, lp, _ in res["logprobs"]] == pytest.approx([float(whole[j, t]) for j, t in enumerate(track)],
                                                                 abs=1e-4)


def test_logprobs_through_the_official_client_on_a_copy_head_model(compiled):
    """The demo's kind of model (prefix LM, copy head, aux heads) answers a
    logprobs request with 200 and the decoder's own log-probabilities."""
    from fastapi.testclient import TestClient
    from openai import OpenAI
    import serve
    request = "where is my order 12345?"
    own = compiled.answer(None, request, 24, top_logprobs=2)["logprobs"]
    with TestClient(serve.create_app(compiled)) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="local", http_client=http, max_retries=0)
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": request}],
                                           max_tokens=24, logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert [e.logprob for e in entries] == pytest.approx([lp for _, lp, _ in own], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    assert all(sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-5 for e in entries)
