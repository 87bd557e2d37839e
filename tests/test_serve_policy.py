"""serve.py's answer policy as pure functions, without a server: which answers are
asked of the teacher, which one is sent, dedupe, finish_reason, parallel trimming,
and which answers are logged as training labels."""

import serve
import wire

M = "nanotool-toy"
A = {"name": "track_order", "arguments": {"order_id": "ORD-1"}}
B = {"name": "set_timer", "arguments": {"minutes": 5}}


def res(calls=(A,), valid=True, confidence=0.9, truncated=False, error=None):
    """A Router.answer result."""
    return {"calls": list(calls), "reason": None if calls else wire.REASON_NO_TOOL, "valid": valid, "error": error,
            "text": "", "tokens": 9, "confidence": confidence, "truncated": truncated}


def test_an_invalid_local_answer_becomes_a_no_call_and_is_never_a_label():
    ans = serve.local_answer(res(valid=False, error="track_order: bad"), 7)
    assert ans["calls"] == [] and ans["reason"] == wire.REASON_NO_TOOL and ans["local_error"] == "track_order: bad"
    assert ans["prompt_tokens"] == 7 and ans["completion_tokens"] == 9
    sent, label = serve.settle(ans, M)
    assert sent["finish_reason"] == "stop" and label is None


def test_the_teacher_is_asked_when_unsure_cut_or_invalid_never_for_none():
    sure, unsure = serve.local_answer(res(), 7), serve.local_answer(res(confidence=0.3), 7)
    cut, bad = serve.local_answer(res(truncated=True), 7), serve.local_answer(res(valid=False, error="x"), 7)
    assert not serve.wants_teacher(sure, "auto", 0.5)
    assert all(serve.wants_teacher(a, "auto", 0.5) for a in (unsure, cut, bad))
    assert serve.wants_teacher(unsure, "required", 0.5) and not serve.wants_teacher(unsure, "none", 0.5)


def test_the_teachers_answer_replaces_the_calls_and_drops_the_local_logprobs():
    ans = dict(serve.local_answer(res(confidence=0.3), 7), logprobs=[{"token": "x"}])
    sent, label = serve.settle(ans, M, teacher=("fake:teacher", {"calls": [B], "reason": None}, None))
    assert sent["answered_by"] == "fake:teacher" and sent["calls"] == [B] and sent["logprobs"] is None
    assert sent["confidence"] == 0.3 and sent["finish_reason"] == "tool_calls" and label["calls"] == [B]
    sent, label = serve.settle(ans, M, teacher=("fake:teacher", None, "TimeoutError: down"))
    assert sent["answered_by"] == M and sent["calls"] == [A] and sent["fallback_error"] == "TimeoutError: down"


def test_duplicates_once_finish_reason_and_parallel_trimming_after_the_label():
    sent, label = serve.settle(serve.local_answer(res([A, A, B, A]), 7), M, parallel=False)
    assert sent["calls"] == [A] and sent["duplicates_dropped"] == 2 and sent["finish_reason"] == "tool_calls"
    assert label["calls"] == [A, B]        # the label is the model's whole decision, not the client's cut


def test_length_only_when_the_local_answer_was_cut_and_then_no_label():
    sent, label = serve.settle(serve.local_answer(res(truncated=True), 7), M)
    assert sent["finish_reason"] == "length" and sent["calls"] == [A] and label is None
    sent, label = serve.settle(serve.local_answer(res([], truncated=True), 7), M,
                               teacher=("fake:teacher", {"calls": [], "reason": "No tool fits."}, None))
    assert sent["finish_reason"] == "stop" and label is not None   # the teacher's whole answer: a label


def test_labels_are_tool_choice_auto_decisions_only():
    ans = serve.local_answer(res(), 7)
    assert serve.settle(ans, M, choice="auto")[1] is not None
    assert serve.settle(ans, M, choice="required")[1] is None and serve.settle(ans, M, choice="track_order")[1] is None
    sent, label = serve.settle(serve.no_tool_answer(3), M)
    assert sent["calls"] == [] and sent["finish_reason"] == "stop" and label is None   # nothing was decided


def test_settle_leaves_its_input_alone():
    ans = serve.local_answer(res([A, A]), 7)
    serve.settle(ans, M, parallel=False, teacher=("t", None, "down"))
    assert ans["calls"] == [A, A] and "answered_by" not in ans and "fallback_error" not in ans
