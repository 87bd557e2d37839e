"""The scoring rules, each with a case that must fail."""

import pytest

from eval import matched_calls, score_item, summarize, values_equal


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
