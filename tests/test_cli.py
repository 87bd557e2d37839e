"""The real command lines, end to end, as a user runs them."""

import json
import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "examples", "tools.json")


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sample_prints_a_call_or_reason(toy_ckpt, toy_data):
    r = run("sample.py", "--ckpt", toy_ckpt, "--tools", TOOLS, "--json", "Where's my order ORD-1234?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"calls", "reason", "valid", "text", "latency_ms"}


def test_eval_writes_report(toy_ckpt, tmp_path):
    out = str(tmp_path / "e.json")
    r = run("eval.py", "--ckpt", toy_ckpt, "--limit", "12", "--max_new_tokens", "24", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "exact" in r.stdout and "seen" in r.stdout
    res = json.load(open(out))
    assert res["n_items"] == 12
    assert {"valid", "tool_acc", "arg_acc", "false_call", "missed", "exact", "f1",
            "latency_p50_ms"} <= set(res["groups"]["all"])
    assert len(open(out.replace(".json", "_predictions.jsonl")).readlines()) == 12


def test_eval_when2call_reports_decisions(toy_ckpt, tmp_path):
    tool = {"name": "play", "description": "Play a song.", "parameters": {
        "type": "dict", "required": ["song"], "properties": {"song": {"type": "string"}}}}
    rows = [{"question": "play Yesterday", "correct_answer": "tool_call", "tools": [json.dumps(tool)],
             "answers": {"tool_call": json.dumps({"name": "play", "arguments": {"song": "Yesterday"}})}},
            {"question": "play something", "correct_answer": "request_for_info", "tools": [json.dumps(tool)],
             "answers": {}},
            {"question": "paint my house " * 200, "correct_answer": "cannot_answer", "tools": [], "answers": {}}]
    src = tmp_path / "w2c.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = str(tmp_path / "w.json")
    r = run("eval.py", "--ckpt", toy_ckpt, "--when2call", str(src), "--max_new_tokens", "24", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "decision (call / ask / decline) accuracy" in r.stdout
    res = json.load(open(out))
    assert res["decisions"]["n"] == 3 and res["decisions"]["too_long"] == 1
    assert set(res["groups"]) >= {"tool_call", "request_for_info", "cannot_answer"}


def _one_clear_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_inputs_give_one_clear_line(toy_ckpt, toy_data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json")
    assert "not valid JSON" in _one_clear_line(run("sample.py", "--ckpt", toy_ckpt, "--tools", str(bad), "hi"))
    noname = tmp_path / "noname.json"
    noname.write_text('[{"description": "does things"}]')
    assert "missing 'name'" in _one_clear_line(run("sample.py", "--ckpt", toy_ckpt, "--tools", str(noname), "hi"))
    tools = TOOLS
    assert "empty" in _one_clear_line(run("sample.py", "--ckpt", toy_ckpt, "--tools", tools, "   "))
    assert "no such checkpoint" in _one_clear_line(
        run("sample.py", "--ckpt", str(tmp_path / "nope.pt"), "--tools", tools, "hi"))
    assert "no meta.json" in _one_clear_line(
        run("train.py", "--data_dir", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o")))


def test_checkpoint_with_other_tokenizer_is_refused(toy_ckpt, toy_data, tmp_path):
    """A data dir whose tokenizer is another one (consistent with its meta.json)."""
    import sentencepiece as spm
    from model import file_sha256
    other = str(tmp_path / "other")
    shutil.copytree(toy_data, other)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a different tokenizer for a test"] * 50),
                                   model_prefix=os.path.join(other, "tok"), vocab_size=16, minloglevel=2)
    meta = json.load(open(os.path.join(other, "meta.json")))
    meta["tokenizer_sha256"] = file_sha256(os.path.join(other, "tok.model"))
    json.dump(meta, open(os.path.join(other, "meta.json"), "w"))
    line = _one_clear_line(run("sample.py", "--ckpt", toy_ckpt, "--data_dir", other,
                               "--tools", TOOLS, "hi"))
    assert "different tokenizer" in line
