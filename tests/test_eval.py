"""The scoring rules, each with a case that must fail."""

import json

import pytest

from eval import (decision_of, decision_report, load_when2call, matched_calls, score_item,
                  summarize, values_equal)


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
