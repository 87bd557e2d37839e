import os
import random

import wire
from invent import (entry_from_tool, invent_tools, noisy, number_words, rephrase_tool,
                    words_of)
from synth import Generator, fill, grounded, load_catalogue, load_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALUES = os.path.join(ROOT, "assets", "values.json")


def test_invented_tools_are_valid_distinct_and_cover_every_type():
    inv = invent_tools(300, seed=1)
    names = [e["tool"]["name"] for e in inv]
    assert len(set(names)) == len(names)
    types, optional, enums, styles = set(), 0, 0, []
    for e in inv:
        tool = wire.normalize_tool(e["tool"])   # raises on a bad schema
        props, req = tool["parameters"]["properties"], set(tool["parameters"]["required"])
        assert set(e["slots"]) == set(props)
        types |= {p["type"] for p in props.values()}
        enums += any("enum" in p for p in props.values())
        optional += bool(set(props) - req)
        styles.append("." in tool["name"] or not tool["name"].islower())   # camel, Pascal, dotted
    assert types == {"string", "integer", "number", "boolean", "array"}
    assert enums > 30 and optional > 50
    assert 0.1 < sum(styles) / len(styles) < 0.6


def test_invented_requests_are_grounded_and_valid():
    inv = invent_tools(50, seed=2)
    gen = Generator(load_catalogue(os.path.join(ROOT, "assets", "catalogue.json")), load_json(VALUES),
                    invented=inv, p_invented=1.0)
    rng = random.Random(0)
    for e in inv:
        for _ in range(5):
            ex = gen.make(rng, "single", [e], [])
            assert ex["calls"][0]["name"] == e["tool"]["name"]
            assert wire.validate_answer({"calls": ex["calls"], "reason": None}, ex["tools"]) is None
            assert grounded(ex["request"], ex["calls"][0]["arguments"]), ex


def test_missing_phrasings_give_every_other_required_value():
    rng = random.Random(3)
    gen = Generator([], load_json(VALUES))
    for e in invent_tools(100, seed=3):
        for arg in e["missing"]:
            request, args = fill(e["missing"][arg][0], e, gen.maker, rng)
            required = set(e["tool"]["parameters"]["required"]) - {arg}
            assert arg not in args
            assert {k for k in required if e["slots"][k] != "bool"} <= set(args), (e["tool"], request)


def test_noise_never_touches_placeholders():
    rng = random.Random(0)
    t = "please send {message} to {contact} right away, thanks"
    outs = {noisy(t, rng, p_typo=1.0, p_filler=1.0) for _ in range(200)}
    assert len(outs) > 20
    for o in outs:
        assert "{message}" in o and "{contact}" in o
    d = noisy({"text": "call {contact} on speaker", "args": {"speaker": True}}, rng, 1.0, 1.0)
    assert d["args"] == {"speaker": True} and "{contact}" in d["text"]


def test_number_words():
    assert [number_words(n) for n in (0, 7, 15, 20, 42, 100, 305)] == \
        ["zero", "seven", "fifteen", "twenty", "forty-two", "one hundred", "three hundred and five"]
    assert number_words(1000) is None and number_words(-1) is None


def test_words_of_tool_names():
    assert words_of("track_order") == ["track", "order"]
    assert words_of("trackOrder") == ["track", "order"]
    assert words_of("api.Orders.get_status") == ["get", "status"]


def test_user_tools_get_usable_requests():
    """--tools: requests for a catalogue we never saw, with guessed value kinds."""
    tools = wire.load_tools(os.path.join(ROOT, "examples", "tools.json"))
    rng = random.Random(0)
    gen = Generator([], load_json(VALUES))
    for tool in tools:
        e = entry_from_tool(tool, rng)
        assert len(e["requests"]) >= 10
        for _ in range(20):
            request, call = gen._call(e, rng)
            assert call["name"] == tool["name"]
            assert wire.validate_call(call, {tool["name"]: tool}) is None, (request, call)


def test_rephrased_tool_keeps_name_and_parameters():
    e = load_catalogue(os.path.join(ROOT, "assets", "catalogue.json"))[0]
    rng = random.Random(1)
    descs = set()
    for _ in range(30):
        r = rephrase_tool(e, rng)
        assert r["tool"]["name"] == e["tool"]["name"]
        assert set(r["tool"]["parameters"]["properties"]) == set(e["tool"]["parameters"]["properties"])
        descs.add(r["tool"]["description"])
    assert len(descs) > 2
