"""Generated values are copyable (runs of whole request words), and no-call
labels agree with the tools offered."""

import os
import random
import re

import wire
from invent import PARAMS, invent_tools
from synth import (Generator, classify_value, join_requests, load_catalogue, load_json, value_classes,
                   vary, word_span)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE = os.path.join(ROOT, "assets", "catalogue.json")
VALUES = os.path.join(ROOT, "assets", "values.json")
DEMO = "timers_alarms,messaging,calendar,weather,smart_home,music,notes_reminders,shopping".split(",")


def _demo():
    entries = [e for e in load_catalogue(CATALOGUE) if e["domain"] in DEMO]
    return entries, Generator(entries, load_json(VALUES))


def test_word_span_is_the_whole_word_rule():
    assert word_span("weather in La Paz?", "La Paz")
    assert word_span("a 20-minute timer", "20")
    assert word_span("call Ann's phone", "Ann")
    assert word_span("alarm at 5 p.m. please", "5 p.m.")
    assert not word_span("set timer 107 min", "10")
    assert not word_span('play "Our Starlit Journey"', "Our Starlit Journey")     # glued to a quote
    assert not word_span("remind me at 5 p.m.: call", "5 p.m.")                    # ".:" is one token
    assert not word_span("tip $25", "25")
    assert not word_span("text Ann", "ann")


def test_classes():
    assert classify_value("set it to 20 percent", 20, {})[0] == "span"
    assert classify_value("set it to twenty percent", 20, {}) == ("converted", "number in words")
    assert classify_value("under 12.50 dollars", 12.5, {})[0] == "bad"
    assert classify_value("unlock the door", False, {})[0] == "converted"
    assert classify_value("in celsius", "celsius", {"enum": ["celsius"]})[0] == "converted"
    assert classify_value("Super bowl party is off", "Super Bowl party", {}) == ("bad", "case differs")
    ex = {"request": "add milk and eggs to my list", "calls": [{"name": "add", "arguments": {"items": ["milk", "eggs"]}}]}
    tools = [{"name": "add", "parameters": {"properties": {"items": {"type": "array", "items": {"type": "string"}}}}}]
    assert [c[3] for c in value_classes(ex, tools)] == ["span", "span"]
    ex["calls"][0]["arguments"]["items"] = ["milk and eggs"]
    assert [c[3] for c in value_classes(ex, tools)] == ["bad"]       # a run of words, but two items
    ex["calls"][0]["arguments"]["items"] = ["c milk"]
    assert [c[3] for c in value_classes(ex, tools)] == ["bad"]


def test_templates_never_glue_a_placeholder_to_other_characters():
    """A value must begin a word and end before a space or punctuation: no
    '"{message}"', '${amount}', '{weight}kg' in any template (they made values the
    decoder's word rule cannot copy)."""
    glued = re.compile(r"(?<!\s)(?<!^)\{[A-Za-z_]+\}|\{[A-Za-z_]+\}(?=[\w\"'])")
    for e in load_catalogue(CATALOGUE):
        texts = [t["text"] if isinstance(t, dict) else t for t in e["requests"]]
        texts += [m for ms in e["missing"].values() for m in ms]
        for t in texts:
            assert not glued.search(t.replace("}'s", "} s")), (e["tool"]["name"], t)
    for spec in PARAMS:
        phrasings = spec[4] if spec[3] != "bool" else []
        for ph in phrasings:
            assert not glued.search(ph), ph


def test_generated_values_are_whole_word_spans():
    """The compiled demo's examples (and the general generator's, invented tools
    included): every value the span rule needs copied is one."""
    entries, gen = _demo()
    tools = [e["tool"] for e in entries]
    rng = random.Random(0)
    counts = {"span": 0, "converted": 0, "bad": 0}
    for _ in range(400):
        ex = gen.sibling(rng, entries, entries)
        for c in value_classes(ex, tools):
            counts[c[3]] += 1
            assert c[3] != "bad", (c, ex["request"])
    assert counts["span"] > 500 and counts["converted"] > 30
    everything = load_catalogue(CATALOGUE)
    gen = Generator(everything, load_json(VALUES), invented=invent_tools(100, 1), p_invented=0.5)
    for _ in range(300):
        ex = gen.sample(rng, everything, everything)
        bad = [c for c in value_classes(ex, ex["tools"]) if c[3] == "bad"]
        assert not bad, (bad, ex["request"])


def test_multi_call_requests_do_not_run_a_value_into_the_next_request():
    rng = random.Random(0)
    for _ in range(50):
        text = join_requests(["Add to my cart: chips", "Turn off the lamp", "Lamp 2 off"], rng,
                             [{"items": ["chips"]}, {"device": "lamp"}, {"device": "Lamp 2"}])
        assert not re.search(r"chips,? and", text) and "turn off" in text and "Lamp 2 off" in text, text
    entries, gen = _demo()
    rng = random.Random(1)
    sizes = {}
    for _ in range(300):
        ex = gen.make(rng, "multi", [rng.choice(entries) for _ in range(rng.choice([2, 3]))], entries, entries)
        sizes[len(ex["calls"])] = sizes.get(len(ex["calls"]), 0) + 1
        assert not [c for c in value_classes(ex, [e["tool"] for e in entries]) if c[3] == "bad"], ex
    assert set(sizes) == {2, 3}


def test_varied_case_never_touches_a_value_and_reaches_both_cases_of_a_sentence_start():
    rng = random.Random(0)
    call = {"name": "add_contact", "arguments": {"name": "Ann Lee", "phone": "555-0100"}}
    text = "save Ann Lee as a contact? number is 555-0100. Also call at 5 p.m. tomorrow"
    seen = set()
    for _ in range(400):
        out = vary(text, rng, [call])
        assert word_span(out, "Ann Lee") and "555-0100" in out and "p.m. tomorrow" in out.lower(), out
        assert out.lower().rstrip(".") == text.lower().rstrip("."), out
        seen |= {w for w in out.split() if w.lower() in ("save", "number")}
    assert seen == {"save", "Save", "number", "Number"}


def _template_regexes(entry):
    """A tool's request templates (and missing-value phrasings) as regexes: does a
    request come from this tool?"""
    out = []
    texts = [t["text"] if isinstance(t, dict) else t for t in entry["requests"]]
    texts += [m for ms in entry["missing"].values() for m in ms]
    for t in texts:
        parts = re.split(r"\{[A-Za-z_]+\}", t.strip().rstrip(".!?"))
        if len(" ".join(parts).split()) < 3:     # "look up {hashtag}" would match any "look up ..."
            continue
        out.append(re.compile("(?i)^" + ".+".join(map(re.escape, parts)) + "[.!?]?$"))
    return out


def _check_no_call_reasons(examples, entries, pools):
    fits = pools["out_of_scope_fits"]
    by_name = {e["tool"]["name"]: e for e in entries}
    n = 0
    for ex in examples:
        offered = {t["name"] for t in ex["tools"]}
        kind = wire.reason_kind(ex["reason"])
        if kind == "no tool fits":
            n += 1
            if ex["request"] in pools["out_of_scope"]:      # listed by hand: who could serve it
                assert not offered & set(fits.get(ex["request"], ())), (ex["request"], offered)
                continue
            for name in offered & set(by_name):             # a request made for another tool
                assert not any(r.match(ex["request"]) for r in _template_regexes(by_name[name])), \
                    (ex["request"], name)
        elif kind == "missing argument":
            arg = ex["reason"][len(wire.REASON_MISSING):]
            assert any(arg in t["parameters"].get("required", []) for t in ex["tools"]), ex
    return n


def test_no_call_reasons_agree_with_the_offered_tools():
    """'block this phone number' is a missing value when block_number is offered,
    never 'no tool fits'; no-tool requests come from tools that are not offered."""
    pools = load_json(VALUES)
    assert "block_number" in pools["out_of_scope_fits"]["block this phone number"]
    known = {e["tool"]["name"] for e in load_catalogue(CATALOGUE)}
    assert {t for ts in pools["out_of_scope_fits"].values() for t in ts} <= known
    entries, _ = _demo()
    gen = Generator(entries, pools, noise=False)
    rng = random.Random(2)
    shares = {"notool": 0.8, "missing": 0.2}
    exs = [gen.sibling(rng, entries, entries, shares) for _ in range(300)]
    assert _check_no_call_reasons(exs, entries, pools) > 150
    everything = load_catalogue(CATALOGUE)
    gen = Generator(everything, pools, noise=False, invented=invent_tools(100, 3), p_invented=0.3)
    exs = [gen.sample(rng, everything, everything, shares) for _ in range(300)]
    assert _check_no_call_reasons(exs, everything, pools) > 150
    for ex in exs:     # an invented tool whose object the request names could serve it
        if ex["request"] in pools["out_of_scope"]:
            for t in ex["tools"]:
                if t["name"] not in known:
                    assert not set(re.findall(r"[a-z]+", t["name"].lower())) - {"api", "tools", "svc", "v2", "app"} \
                        <= set(re.findall(r"[a-z]+", ex["request"].lower())), (t["name"], ex["request"])
