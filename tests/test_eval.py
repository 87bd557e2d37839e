"""The scoring rules, each with a case that must fail."""

import json

import pytest

from evalsets import Skip, apibank_request, load_apibank, load_when2call, parse_apibank_call
from eval import (ERROR_CLASSES, breakdowns, classify_error, compare, decision_of, decision_report,
                  error_report, main, matched_calls, score_item, summarize, tools_bin, values_equal)
from formats import apibank_tool


def call(name, **args):
    return {"name": name, "arguments": args}


def pred(calls, reason=None, valid=True, error=None):
    return {"calls": calls, "reason": reason, "valid": valid, "error": error}


@pytest.mark.parametrize("a, b, eq", [
    (5, 5.0, True), (5, 6, False), (True, 1, False), ("5", 5, False), ("Paris", "paris", False),
    (["a", "b"], ["a", "b"], True), (["a", "b"], ["b", "a"], False), ({"x": 1}, {"x": 1.0}, True),
])
def test_values_equal_is_type_aware(a, b, eq):
    assert values_equal(a, b) is eq


def test_calls_compare_as_a_multiset():
    a, b = call("t", x=1), call("u", y="z")
    assert matched_calls([a, b], [b, a]) == 2
    assert matched_calls([a, a], [a, b]) == 1
    assert score_item(pred([b, a]), [a, b])["exact"]
    assert not score_item(pred([a, a]), [a, b])["exact"]


def test_missing_optional_argument_is_a_mismatch():
    assert not score_item(pred([call("t", x=1)]), [call("t", x=1, unit="c")])["exact"]


def test_no_call_scoring_and_reason_kind():
    out = score_item(pred([], "missing argument: city"), [], "missing argument: order_id")
    assert out["exact"] and out["reason_ok"]       # same kind of reason
    out = score_item(pred([], "chit-chat"), [], "missing argument: order_id")
    assert out["exact"] and not out["reason_ok"]
    assert not score_item(pred([call("t")]), [], "no tool fits")["exact"]


def test_summary_rates():
    rows = [({}, score_item(pred([call("t", x=1)]), [call("t", x=1)]), 10.0),
            ({}, score_item(pred([call("t", x=2)]), [call("t", x=1)]), 20.0),
            ({}, score_item(pred([call("t")]), [], "no tool fits"), 30.0),
            ({}, score_item(pred([], "no tool fits"), [call("t", x=1)]), 40.0),
            ({}, score_item(pred([], None, False, "unparseable: x"), [call("t", x=1)]), 50.0)]
    m = summarize(rows)
    assert m["n"] == 5 and m["exact"] == pytest.approx(1 / 5)
    assert m["false_call"] == 1.0                       # the one no-call item got a call
    assert m["missed"] == pytest.approx(1 / 4)          # one of four call items declined
    assert m["arg_acc"] == pytest.approx(1 / 2)         # of the two with the right tool
    assert m["valid"] == pytest.approx(4 / 5)
    assert m["latency_p50_ms"] == 30.0


# -----------------------------------------------------------------------------
# When2Call: loader and the call / ask / decline decision

def w2c_row(decision, tools, call=None, q="play Yesterday in the kitchen"):
    return {"question": q, "correct_answer": decision, "tools": [json.dumps(t) for t in tools],
            "answers": {"tool_call": json.dumps(call) if call else "{}"}}


PLAY = {"name": "Music_PlayMedia", "description": "Play a track.",
        "parameters": {"type": "dict", "required": ["track"],
                       "properties": {"track": {"type": "string"}, "volume": {"type": "float"}}}}


def test_when2call_loader_converts_and_counts_what_it_cannot(tmp_path):
    rows = [w2c_row("tool_call", [PLAY], {"name": "Music_PlayMedia", "arguments": {"track": "Yesterday"}}),
            w2c_row("request_for_info", [PLAY]),
            w2c_row("cannot_answer", []),
            w2c_row("cannot_answer", [{"name": "f", "parameters": {"type": "dict", "properties": {"x": {}}}}]),
            w2c_row("tool_call", [PLAY], {"name": "Music_PlayMedia", "arguments": {"track": 5}})]
    p = tmp_path / "w2c.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    items, skipped = load_when2call(str(p))
    assert [it["decision"] for it in items] == ["tool_call", "request_for_info", "cannot_answer"]
    assert items[0]["tools"][0]["parameters"]["properties"]["volume"]["type"] == "number"
    assert items[0]["calls"] == [{"name": "Music_PlayMedia", "arguments": {"track": "Yesterday"}}]
    assert sum(skipped.values()) == 2
    p.write_text(json.dumps({"question": "x"}))
    with pytest.raises(ValueError, match="not a When2Call item"):
        load_when2call(str(p))


def test_decisions_from_predictions():
    assert decision_of(pred([call("t")])) == "tool_call"
    assert decision_of(pred([], "missing argument: city")) == "request_for_info"
    assert decision_of(pred([], "no tool fits")) == "cannot_answer"
    assert decision_of(pred([], "chit-chat")) == "cannot_answer"
    assert decision_of(pred([], None, False, "unparseable: junk")) == "unparseable"
    rows = [({"decision": "tool_call"}, None, 0), ({"decision": "cannot_answer"}, None, 0)]
    preds = [{"decision": "tool_call", "too_long": False}, {"decision": "tool_call", "too_long": True}]
    rep = decision_report(rows, preds)
    assert rep["accuracy"] == 0.5 and rep["per_class"]["cannot_answer"] == 0.0 and rep["too_long"] == 1


# -----------------------------------------------------------------------------
# API-Bank: the API-description dialect, the expected request, the loader

HOTEL = {"name": "BookHotel", "description": "Book a hotel.",
         "input_parameters": {"hotel_name": {"type": "str", "description": "The hotel."},
                              "room_count": {"type": "int", "description": "Rooms."},
                              "pets": {"type": "bool", "description": "[Optional] Pets allowed."}},
         "output_parameters": {"order_id": {"type": "str", "description": "The order."}}}
MEETING = {"name": "AddMeeting", "description": "Add a meeting.",
           "input_parameters": {"topic": {"type": "str", "description": "Topic."},
                                "attendees": {"type": "list(str)", "description": "Names."},
                                "data": {"type": "list", "description": "Records."},
                                "price": {"type": "float", "description": "Only needed if paid."}}}


def test_apibank_dialect_becomes_json_schema():
    t = apibank_tool(HOTEL)
    props = t["parameters"]["properties"]
    assert [props[k]["type"] for k in props] == ["string", "integer", "boolean"]
    assert t["parameters"]["required"] == ["hotel_name", "room_count"]   # "[Optional]" is not
    assert "order_id" not in str(t)                                      # outputs are dropped
    m = apibank_tool(MEETING)["parameters"]
    assert m["properties"]["attendees"] == {"type": "array", "items": {"type": "string"}, "description": "Names."}
    assert m["properties"]["price"]["type"] == "number" and m["required"] == ["topic", "attendees", "data"]
    with pytest.raises(ValueError, match="unknown parameter type"):
        apibank_tool({"name": "f", "input_parameters": {"x": {"type": "complex", "description": ""}}})


def test_apibank_request_values_are_typed_by_the_schema():
    tools = [apibank_tool(HOTEL), apibank_tool(MEETING)]
    c = parse_apibank_call("API-Request: [BookHotel(hotel_name='Hilton', room_count='2', pets='False')]", tools)
    assert c == {"name": "BookHotel", "arguments": {"hotel_name": "Hilton", "room_count": 2, "pets": False}}
    # unescaped quotes inside list values (31 of the 399 real ones): cut at ", key="
    c = parse_apibank_call("API-Request: [AddMeeting(topic='Sales, Q3', attendees='['Ann Lee', 'Bob']', "
                           "data='[{'name': 'bp', 'value': '120/80'}]')]", tools)
    assert c["arguments"] == {"topic": "Sales, Q3", "attendees": ["Ann Lee", "Bob"],
                              "data": [{"name": "bp", "value": "120/80"}]}
    assert parse_apibank_call("[AddMeeting(topic='it\\'s', attendees='[]', data='[]')]", tools)[
        "arguments"]["topic"] == "it's"


@pytest.mark.parametrize("text, why", [
    ("API-Request: BookHotel(hotel_name='Hilton', room_count='2')", "is not \\[ApiName"),
    ("API-Request: [BookHotel hotel_name='Hilton']", "is not \\[ApiName"),
    ("API-Request: [BookHotel('Hilton', '2')]", "not \\[ApiName|positional"),
    ("API-Request: [CancelHotel(order_id='1')]", "not among the described"),
    ("API-Request: [BookHotel(hotel_name='Hilton', room_count='two')]", "declared type: BookHotel.room_count"),
    ("API-Request: [BookHotel(hotel_name='Hilton', room_count='2', device_id='9')]", "does not declare"),
    ("API-Request: [BookHotel(hotel_name='Hilton')]", "does not validate"),       # room_count is required
])
def test_apibank_request_that_cannot_be_used_is_a_skip(text, why):
    with pytest.raises(Skip, match=why):
        parse_apibank_call(text, [apibank_tool(HOTEL)])


def apibank_sample(expected, dialogue="User: Book the Hilton, 2 rooms.\nAI: Sure.\nGenerate API Request:\n",
                   apis=(HOTEL,)):
    return {"file": "BookHotel-level-1-1.jsonl", "id": 0, "input": dialogue, "expected_output": expected,
            "instruction": "Generate an API request...\nAPI descriptions:\n" + "\n".join(json.dumps(a) for a in apis)}


def test_apibank_loader_converts_and_counts_what_it_cannot(tmp_path):
    good = "API-Request: [BookHotel(hotel_name='Hilton', room_count='2')]"
    rows = [apibank_sample(good),
            apibank_sample("API-Request: BookHotel(hotel_name='Hilton')"),          # unparseable
            apibank_sample(good, apis=({"name": "BookHotel", "input_parameters": {"x": {"type": "set"}}},)),
            apibank_sample(good, dialogue="Generate API Request:\n")]
    p = tmp_path / "level-1-api.json"
    p.write_text(json.dumps(rows))
    items, skipped = load_apibank(str(p))
    assert len(items) == 1 and sum(skipped.values()) == 3
    assert skipped["expected request is not [ApiName(key='value', ...)]"] == 1 and skipped["empty dialogue"] == 1
    assert any(k.startswith("API not convertible") for k in skipped)
    it = items[0]
    assert it["calls"] == [{"name": "BookHotel", "arguments": {"hotel_name": "Hilton", "room_count": 2}}]
    assert it["request"] == "User: Book the Hilton, 2 rooms. AI: Sure." and it["split"] == "apibank"
    # scored by our rules: a wrong value is not exact, nor is the right value as a string
    ok = score_item(pred(it["calls"]), it["calls"])
    assert ok["exact"]
    assert not score_item(pred([call("BookHotel", hotel_name="Hilton", room_count=3)]), it["calls"])["exact"]
    assert not score_item(pred([call("BookHotel", hotel_name="Hilton", room_count="2")]), it["calls"])["exact"]
    p.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="not an API-Bank file"):
        load_apibank(str(p))
    p.write_text(json.dumps([{"input": "x"}]))
    with pytest.raises(ValueError, match="not an API-Bank sample"):
        load_apibank(str(p))


def test_apibank_request_modes():
    d = ("User: My id is J4.\nAI: And the dates?\nAPI-Request: [GetUserToken(username='a')]->{'token': 't1'}\n"
         "User: March 5th to 12th.\nAI: Got it.\nGenerate API Request:\n")
    full = apibank_request(d)
    assert "J4" in full and "t1" in full and "Generate" not in full and "\n" not in full
    assert apibank_request(d, "last") == "User: March 5th to 12th."


# -----------------------------------------------------------------------------
# error taxonomy: one case that is the class, one close case that is not

T = [{"name": "t", "description": "", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}, "unit": {"type": "string"}, "extra": {"type": "integer"}}, "required": ["x"]}}]
TOO_LONG = {**pred([], None, False, "unparseable: prompt is 900 tokens"), "too_long": True}


@pytest.mark.parametrize("cls, p, gold, gold_reason, not_p", [
    ("prompt too long", TOO_LONG, [call("t", x=1)], None, pred([], None, False, "unparseable: x")),
    ("unparseable", pred([], None, False, "unparseable: junk"), [call("t", x=1)], None,
     pred([call("zz", x=1)], None, False, "unknown tool 'zz'")),
    ("spurious call", pred([call("t", x=1)]), [], "no tool fits", pred([], "no tool fits")),
    ("spurious call", pred([call("t", x=1), call("u")]), [call("t", x=1)], None, pred([call("u")])),
    ("missed call", pred([], "no tool fits"), [call("t", x=1)], None, pred([call("u")])),
    ("missed call", pred([call("t", x=1)]), [call("t", x=1), call("u")], None, pred([call("t", x=1), call("v")])),
    ("wrong tool", pred([call("u", x=1)]), [call("t", x=1)], None, pred([call("t", x=2)])),
    ("missing argument", pred([call("t", x=1)]), [call("t", x=1, unit="c")], None,
     pred([call("t", x=1, unit="c", extra=2)])),
    ("extra argument", pred([call("t", x=1, extra=2)]), [call("t", x=1)], None, pred([call("t", x=2)])),
    ("wrong type", pred([call("t", x="1")]), [call("t", x=1)], None, pred([call("t", x=1.0)])),
    ("wrong type", pred([call("t", x=2.5)]), [call("t", x=2)], None, pred([call("t", x=3)])),  # schema: integer
    ("wrong value", pred([call("t", x=1, unit="C")]), [call("t", x=1, unit="c")], None,
     pred([call("t", x=1, unit="c")])),
    ("wrong reason", pred([], "no tool fits"), [], "chit-chat", pred([], "chit-chat")),
    ("wrong reason", pred([], "chit-chat"), [], "missing argument: order_id", pred([], "missing argument: city")),
])
def test_each_error_class_and_a_case_that_is_not_it(cls, p, gold, gold_reason, not_p):
    assert classify_error(p, gold, gold_reason, T) == cls
    assert classify_error(not_p, gold, gold_reason, T) != cls


def test_error_class_precedence_and_pairing():
    assert ERROR_CLASSES.index("wrong tool") < ERROR_CLASSES.index("missing argument") < \
        ERROR_CLASSES.index("wrong value")
    # missing y and a wrong x: the missing key counts (it comes first)
    assert classify_error(pred([call("t", x=2)]), [call("t", x=1, y=2)], None, T) == "missing argument"
    # two calls of one tool in another order: paired by least difference, so one wrong value
    assert classify_error(pred([call("t", x=2), call("t", x=3)]), [call("t", x=1), call("t", x=2)], None, T) \
        == "wrong value"
    # right answers are no error at all, whatever the order of calls
    assert classify_error(pred([call("u"), call("t", x=1)]), [call("t", x=1), call("u")], None, T) is None


def test_error_report_counts_examples_and_confusions():
    def rec(cls, gold, got):
        return {"error_class": cls, "request": "r", "gold": gold, "gold_reason": None, "pred": got,
                "pred_reason": None, "text": ""}
    recs = [rec("wrong tool", [call("a")], [call("b")]) for _ in range(4)]
    recs += [rec("wrong tool", [call("a"), call("c")], [call("b"), call("d"), call("e")]),
             rec("wrong value", [call("a", x=1)], [call("a", x=2)]), rec(None, [call("a")], [call("a")])]
    rep = error_report(recs)
    assert rep["n"] == 7 and rep["n_wrong"] == 6
    assert rep["counts"] == {"wrong tool": 5, "wrong value": 1}
    assert len(rep["examples"]["wrong tool"]) == 3 and rep["examples"]["wrong value"][0]["pred"] == "a(x=2)"
    conf = {(c["gold"], c["pred"]): c["n"] for c in rep["confusions"]}
    assert conf == {("a", "b"): 5, ("c", "d"): 1, ("(none)", "e"): 1}
    assert rep["confusions"][0] == {"gold": "a", "pred": "b", "n": 5}


# -----------------------------------------------------------------------------
# breakdowns and --compare

def test_breakdown_bins():
    assert [tools_bin(n) for n in (0, 1, 2, 3, 5, 6, 10, 11, 40)] == \
        ["0", "1-2", "1-2", "3-5", "3-5", "6-10", "6-10", "11+", "11+"]

    def row(n_tools, n_calls, ok, **extra):
        gold = [call("t", x=i) for i in range(n_calls)]
        ex = {"tools": [{}] * n_tools, "calls": gold, **extra}
        return ex, score_item(pred(gold if ok else [], "no tool fits"), gold, "no tool fits"), 1.0
    rows = [row(1, 1, True), row(2, 0, True), row(4, 2, False), row(12, 5, False), row(12, 3, True)]
    bd = breakdowns(rows)
    assert list(bd["n_tools"]) == ["1-2", "3-5", "11+"]             # empty bins left out, in order
    assert bd["n_tools"]["1-2"]["n"] == 2 and bd["n_tools"]["11+"]["exact"] == 0.5
    assert list(bd["n_calls"]) == ["0", "1", "2", "3+"] and bd["n_calls"]["3+"]["n"] == 2
    assert "domain" not in bd                                       # no item has one
    rows.append(row(3, 1, True, domain="music"))
    assert breakdowns(rows)["domain"] == {"music": summarize(rows[-1:])}


def result_json(path, exact, n=10, errors=None):
    m = {"n": n, "valid": 1.0, "tool_acc": exact + 0.1, "exact": exact, "latency_p50_ms": 50.0}
    path.write_text(json.dumps({"ckpt": "x.pt", "test_file": "t.jsonl", "n_items": n,
                                "groups": {"all": m, "seen": m},
                                "breakdowns": {"n_tools": {"1-2": {"exact": exact}, "3-5": {"exact": 0.5}}},
                                "errors": {"counts": errors or {"wrong tool": 3}}}))
    return str(path)


def test_compare_prints_files_side_by_side_with_differences(tmp_path, capsys):
    a = result_json(tmp_path / "a.json", 0.25)
    b = result_json(tmp_path / "b.json", 0.40, errors={"wrong tool": 1, "wrong value": 2})
    main(["--compare", a, b])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("all exact"))
    assert "25.0%" in line and "40.0% (+15.0)" in line
    assert "n_tools=1-2 exact" in out and "n_tools=3-5 exact" in out
    assert next(l for l in out.splitlines() if l.startswith("errors: wrong tool")).endswith("1 (-2)")
    assert "arg_acc" not in out                 # a metric neither file has is left out
    assert f"[1] {a}" in out and f"[2] {b}" in out


def test_compare_refuses_a_missing_or_invalid_file(tmp_path, capsys):
    a = result_json(tmp_path / "a.json", 0.25)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"some": "thing"}))
    for path, msg in ((tmp_path / "nope.json", "no such file"), (bad, "not valid JSON"),
                      (other, "not an eval.py result")):
        with pytest.raises(SystemExit) as e:
            main(["--compare", a, str(path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="no such file"):
        compare([str(tmp_path / "nope.json")])


def test_eval_on_apibank_end_to_end(toy_ckpt, tmp_path, capsys):
    good = "API-Request: [BookHotel(hotel_name='Hilton', room_count='2')]"
    rows = [apibank_sample(good), apibank_sample(good, dialogue="User: " + "book it " * 400 + "\n"),
            apibank_sample("API-Request: [BookHotel(hotel_name='Hilton', room_count='2', device_id='1')]")]
    src = tmp_path / "level-1-api.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "ab.json"
    main(["--ckpt", toy_ckpt, "--apibank", str(src), "--limit", "5", "--max_new_tokens", "24", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "skipped 1 item: expected call uses an argument its API does not declare" in printed
    assert "breakdown" in printed and "errors:" in printed and "no domain breakdown" in printed
    res = json.load(open(out))
    assert res["n_items"] == 2 and res["errors"]["counts"]["prompt too long"] == 1
    assert res["breakdowns"]["n_tools"]["1-2"]["n"] == 2 and res["breakdowns"]["n_calls"]["1"]["n"] == 2
    lines = [json.loads(l) for l in open(str(out).replace(".json", "_predictions.jsonl"))]
    assert len(lines) == 2 and lines[1]["error_class"] == "prompt too long"


def test_the_stop_decision_and_repeats_are_scored_on_their_own():
    """count_ok: as many calls as the gold (the decision to stop); repeats: the
    same call twice in one answer."""
    from eval import score_item, summarize
    call = {"name": "f", "arguments": {"x": 1}}
    pred = lambda calls: {"calls": calls, "reason": None, "valid": True, "error": None}
    twice = score_item(pred([call, call]), [call])
    assert not twice["count_ok"] and twice["repeats"] and not twice["exact"]
    once = score_item(pred([call]), [call])
    assert once["count_ok"] and not once["repeats"]
    other = score_item(pred([{"name": "f", "arguments": {"x": 2}}]), [call])
    assert other["count_ok"] and not other["exact"]
    m = summarize([(None, twice, 1.0), (None, once, 1.0)])
    assert m["count_ok"] == 0.5 and m["repeats"] == 0.5
