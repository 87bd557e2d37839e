"""Retrieval before the model (retrieve.py): the retriever alone, the Router's use of it
(a catalogue in the prompt is cut to retrieve_k tools, a compiled one never), eval.py and
the server's pre-check with it, and utils/recall.py end to end on a tiny file."""

import json
import os

import pytest

import eval as evaluate
import request_checks
import retrieve
import wire
from sample import Router
from utils import recall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name, description, **params):
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": {k: {"type": "string", "description": d}
                                                            for k, d in params.items()}}}


CATALOGUE = [
    tool("set_timer", "Start a countdown timer.", minutes="Timer length in minutes."),
    tool("get_current_weather", "Current weather for a city.", city="City name."),
    tool("send_message", "Send a text message to a contact.", contact="Who to text.", text="The message."),
    tool("play_song", "Play a song by title or artist.", title="Song title."),
    tool("trackOrder", "Get the shipping status of an order.", order_id="Order number, e.g. ORD-1234."),
    tool("book_table", "Reserve a table at a restaurant.", restaurant="Restaurant name.", people="Party size."),
    tool("translate_text", "Translate a phrase into another language.", target_language="Language."),
    tool("create_note", "Write down a note.", text="The note."),
    tool("set_thermostat", "Set the heating temperature.", degrees="Target temperature."),
    tool("convert_currency", "Convert an amount of money between currencies.", amount="Amount."),
]


def names(tools):
    return [t["name"] for t in tools]


def test_words_split_names_and_drop_nothing_else():
    assert retrieve.words("getAPIToken track_order ORD-1234") == ["get", "api", "token", "track", "order", "ord", "1234"]


def test_the_obviously_relevant_tool_is_kept_among_many():
    for request, want in [("Where's my order ORD-1234?", "trackOrder"), ("what's the weather in Oslo", "get_current_weather"),
                          ("text Ann that I am late", "send_message"), ("convert 20 dollars to euros", "convert_currency")]:
        kept = retrieve.top_k(CATALOGUE, request, 3)
        assert want in names(kept) and len(kept) == 3, (request, names(kept))
        assert names(kept) == [n for n in names(CATALOGUE) if n in names(kept)]     # catalogue order
    index = retrieve.Index(CATALOGUE)
    scores = index.scores("please set a timer for ten minutes")
    assert max(range(len(scores)), key=scores.__getitem__) == 0


def test_short_catalogues_are_returned_unchanged_and_in_order():
    for k in (len(CATALOGUE), len(CATALOGUE) + 5):
        assert retrieve.top_k(CATALOGUE, "anything at all", k) is CATALOGUE
    assert retrieve.top_k([], "x", 3) == []
    # no word in common: the first k, in order (ties go to the earlier tool)
    assert names(retrieve.top_k(CATALOGUE, "zzz qqq", 2)) == ["set_timer", "get_current_weather"]


def test_a_tool_named_by_tool_choice_is_kept():
    kept = retrieve.Index(CATALOGUE).top_k("Where's my order ORD-1234?", 2, keep=("play_song",))
    assert "play_song" in names(kept) and "trackOrder" in names(kept) and len(kept) == 3


@pytest.fixture(scope="module")
def router(toy_ckpt):
    return Router(toy_ckpt, retrieve_k=3)


def seen_by_model(router, monkeypatch):
    """Record the tools each prompt is rendered from."""
    seen, encode = [], router.encode_prefix
    monkeypatch.setattr(router, "encode_prefix", lambda tools: seen.append(names(tools)) or encode(tools))
    return seen


def test_router_gives_the_model_only_k_tools_of_a_long_catalogue(router, monkeypatch):
    tools = wire.normalize_tools(CATALOGUE)
    seen = seen_by_model(router, monkeypatch)
    res = router.answer(tools, "Where's my order ORD-1234?", max_new_tokens=16)
    assert len(seen[-1]) == 3 and "trackOrder" in seen[-1] and res["retrieved"] == seen[-1]
    assert all(c["name"] in seen[-1] for c in res["calls"])
    # tool_choice naming a tool retrieval would drop: kept, and called
    res = router.answer(tools, "Where's my order ORD-1234?", max_new_tokens=16, tool_choice="play_song")
    assert "play_song" in seen[-1] and len(seen[-1]) == 4 and set(names(res["calls"])) == {"play_song"}
    # a short catalogue, and retrieval switched off: the whole catalogue
    assert router.answer(tools[:3], "Where's my order ORD-1234?", max_new_tokens=8)["retrieved"] is None
    assert seen[-1] == names(tools[:3])
    router.retrieve_k = 0
    try:
        assert router.answer(tools, "Where's my order ORD-1234?", max_new_tokens=8)["retrieved"] is None
        assert seen[-1] == names(tools)
    finally:
        router.retrieve_k = 3
    assert len(router.indexes) == 1      # one index for the one long catalogue asked twice


def test_a_catalogue_too_long_for_the_context_keeps_the_most_related_tools_that_fit(router, monkeypatch):
    import sample
    tools, order = wire.normalize_tools(CATALOGUE), "Where's my order ORD-1234?"
    best2 = retrieve.Index(tools).top_k(order, 2)
    n_two = len(router.encode_prompt(best2, order))
    # leave exactly the room of the two most related tools: the third no longer fits
    monkeypatch.setattr(sample, "FIT_ROOM", router.model.config.block_size - n_two)
    assert len(router.encode_prompt(retrieve.Index(tools).top_k(order, 3), order)) > n_two
    seen = seen_by_model(router, monkeypatch)
    for k in (3, 0):                 # retrieval's k, and the whole catalogue asked for
        router.retrieve_k = k
        try:
            res = router.answer(tools, order, max_new_tokens=8)
        finally:
            router.retrieve_k = 3
        assert seen[-1] == names(best2) == res["retrieved"] and "trackOrder" in seen[-1]
    # a catalogue that fits as it is reaches the model whole
    monkeypatch.setattr(sample, "FIT_ROOM", 64)
    assert router.answer(tools[:3], order, max_new_tokens=8)["retrieved"] is None and seen[-1] == names(tools[:3])


def test_the_server_keeps_the_tool_tool_choice_names_and_says_what_the_model_saw(router):
    from fastapi.testclient import TestClient
    import serve
    order = "Where's my order ORD-1234?"
    with TestClient(serve.create_app(router, max_new_tokens=16)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": order}], "tools": [{"type": "function", "function": t} for t in CATALOGUE],
            "tool_choice": {"type": "function", "function": {"name": "play_song"}}})
        assert r.status_code == 200, r.text
        body = r.json()
        kept = body["x_nanotool"]["retrieved"]
        assert "play_song" in kept and "trackOrder" in kept and len(kept) == 4
        assert {c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]} == {"play_song"}
        shown = [t for t in wire.normalize_tools(CATALOGUE) if t["name"] in kept]
        assert body["usage"]["prompt_tokens"] == len(router.encode_prompt(shown, order))


def test_a_compiled_model_never_retrieves(compiled_ckpt, monkeypatch):
    compiled = Router(compiled_ckpt, retrieve_k=1)
    seen = seen_by_model(compiled, monkeypatch)
    res = compiled.answer(None, "where is my order 12345?", 24)
    assert res["retrieved"] is None and seen[-1] == names(compiled.catalogue) and len(seen[-1]) > 1


def test_eval_counts_a_gold_tool_retrieval_dropped_as_the_models_error(toy_ckpt, tmp_path, capsys):
    far = tool("play_song", "Play a song by title or artist.", title="Song title.")
    items = [{"tools": CATALOGUE, "request": "Where's my order ORD-1234?",
              "calls": [{"name": "play_song", "arguments": {"title": "ORD-1234"}}], "reason": None, "kind": "single"},
             {"tools": [far], "request": "play Hello", "calls": [{"name": "play_song", "arguments": {"title": "Hello"}}],
              "reason": None, "kind": "single"}]
    src, out = tmp_path / "t.jsonl", tmp_path / "e.json"
    src.write_text("".join(json.dumps(x) + "\n" for x in items))
    evaluate.main(["--ckpt", toy_ckpt, "--test_file", str(src), "--retrieve_k", "2", "--max_new_tokens", "16",
                   "--out", str(out)])
    assert "it dropped a gold tool on 1 of them" in capsys.readouterr().out
    res = json.load(open(out))
    assert res["retrieve_k"] == 2 and res["retrieval"] == {"cut": 1, "gold_dropped": 1}
    pred = json.loads(open(str(out).replace(".json", "_predictions.jsonl")).readline())
    assert not pred["exact"] and "play_song" not in pred["retrieved"] and len(pred["retrieved"]) == 2


def test_the_servers_length_precheck_counts_only_what_the_router_must_keep():
    tools = [tool(f"t{i:03d}", "A tool that does one thing with a value. " * 4, x="A value.") for i in range(100)]
    chars = len(wire.render_tools(tools))
    assert chars > request_checks.CHARS_PER_TOKEN * 512                     # too long whole ...
    kept = request_checks.shortest_chars(tools, chars)     # ... but the router cuts it to the tools that fit
    assert kept == len(wire.render_tool(tools[0]))
    request_checks.check_fits(kept, "hi", 512)
    huge = [tool("big", "A very long description. " * 1000, x="A value."), tools[0]]
    one = len(wire.render_tools(huge[:1]))
    assert request_checks.shortest_chars(huge[:1], one) == one               # one tool: the whole of it
    with pytest.raises(request_checks.BadRequest, match="context"):
        request_checks.check_fits(request_checks.shortest_chars(huge[:1], one), "hi", 512)


def test_recall_script_end_to_end(tmp_path, capsys):
    rows = [{"tools": CATALOGUE, "request": "Where's my order ORD-1234?", "split": "seen",
             "calls": [{"name": "trackOrder", "arguments": {}}]},
            {"tools": CATALOGUE, "request": "zzz", "split": "unseen",           # nothing in common: dropped at k=2
             "calls": [{"name": "create_note", "arguments": {}}]},
            {"tools": CATALOGUE[:2], "request": "hi", "split": "seen", "calls": [], "reason": "chit-chat"}]
    src, out = tmp_path / "items.jsonl", tmp_path / "recall.json"
    src.write_text("".join(json.dumps(x) + "\n" for x in rows))
    recall.main(["--jsonl", str(src), "--k", "2,10", "--pooled", "--variants", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "items.jsonl seen" in printed and "items.jsonl unseen" in printed
    res = json.load(open(out))
    assert len(res) == 2 * 2 * len(recall.VARIANTS)            # 2 splits x own/pooled x variants
    seen = next(r for r in res if r["set"] == "items.jsonl seen" and r["catalogue"] == "own" and r["variant"] == "chosen")
    assert seen["items"] == 1 and seen["skipped_no_call"] == 1
    assert seen["at"]["2"]["recall"] == 1.0 and seen["at"]["2"]["cut"] == 1
    unseen = next(r for r in res if r["set"] == "items.jsonl unseen" and r["catalogue"] == "own" and r["variant"] == "chosen")
    assert unseen["at"]["2"]["recall"] == 0.0 and unseen["at"]["10"] == dict(unseen["at"]["10"], recall=1.0, cut=0)
    pooled = next(r for r in res if r["set"] == "items.jsonl seen" and r["catalogue"] == "pooled")
    assert pooled["n_tools"] == len(CATALOGUE)
