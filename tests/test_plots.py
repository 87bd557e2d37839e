"""plots.py: each picture from small synthetic inputs, and what it does when one is missing."""

import json

import pytest

from utils.plots import main, read_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

LOG = """step 10 | loss 7.7040 | lr 5.00e-04 | dt 401ms | tok/s 10,002 | ex/s 39.9 | 78.7 GFLOP/s
step 20 | loss 6.8633 | lr 1.00e-03 | dt 343ms | tok/s 9,724 | ex/s 46.6
val step 20 | val_loss 6.5000 | best 6.5000
step 30 | loss 5.0000 | kl 0.3 | ce 6.0 | lr 1.50e-03 | dt 383ms | tok/s 9,529 | ex/s 41.8
resumed from out/x/last.pt at step 20
step 30 | loss 4.5000 | lr 1.50e-03 | dt 383ms | tok/s 9,529 | ex/s 41.8
val step 40 | val_loss 4.2500 | best 4.2500
"""

RESULT = {"test_file": "data/demo/test.jsonl",
          "breakdowns": {"n_tools": {"1-2": {"n": 7, "exact": 0.3, "tool_acc": 0.7},
                                     "6-10": {"n": 15, "exact": 0.2, "tool_acc": 0.4}}},
          "calibration": {"ece": 0.25, "bins": [
              {"lo": 0.0, "hi": 0.1, "n": 6, "confidence": 0.05, "accuracy": 0.0},
              {"lo": 0.9, "hi": 1.0, "n": 2, "confidence": 0.95, "accuracy": 1.0}]}}


def test_log_lines_are_read_and_a_resumed_step_keeps_its_later_value(tmp_path):
    p = tmp_path / "log.txt"
    p.write_text(LOG)
    train, val = read_log(str(p))
    assert train == [(10, 7.704), (20, 6.8633), (30, 4.5)]
    assert val == [(20, 6.5), (40, 4.25)]


def test_all_three_plots_are_written_as_png(tmp_path, capsys):
    log = tmp_path / "run" / "log.txt"
    log.parent.mkdir()
    log.write_text(LOG)
    res = tmp_path / "eval.json"
    res.write_text(json.dumps(RESULT))
    out = tmp_path / "plots"
    main(["--log", str(log), "--eval", str(res), "--out_dir", str(out)])
    for name in ("loss.png", "by_n_tools.png", "calibration.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert capsys.readouterr().err == ""


def test_a_missing_input_skips_its_plot_with_a_message(tmp_path, capsys):
    res = tmp_path / "eval.json"
    res.write_text(json.dumps({**RESULT, "calibration": None}))      # a --no_constrain run has none
    out = tmp_path / "plots"
    main(["--log", str(tmp_path / "nope.txt"), "--eval", str(res), "--out_dir", str(out)])
    err = capsys.readouterr().err
    assert "skip loss.png" in err and "no such file" in err and "skip calibration.png" in err
    assert (out / "by_n_tools.png").exists()
    assert not (out / "loss.png").exists() and not (out / "calibration.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(SystemExit) as e:                                # nothing left to draw
        main(["--eval", str(bad), "--out_dir", str(out)])
    assert e.value.code == 1 and "not an eval.py result" in capsys.readouterr().err


def test_the_pipeline_picture_is_drawn_without_a_run(tmp_path):
    out = tmp_path / "docs" / "pipeline.png"
    main(["--pipeline", str(out)])
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000   # six boxes of text, not an empty canvas
