"""utils/ablate.py: the flags file, the budget arithmetic, the log readers, the
table and plot from synthetic results, skipping finished runs, passing Ctrl-C on,
and one small ablation end to end on the toy data."""

import argparse
import json
import os
import sys

import pytest

from conftest import MICRO
from utils import ablate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        ablate.main(argv)
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -----------------------------------------------------------------------------
# input

def test_flags_file_is_read_in_order_and_notes_are_skipped(tmp_path):
    path = write(tmp_path / "v.json", {"_doc": "a note", "base": [], "cw": ["--length_window", "8"],
                                       "copy": ["--copy_head"]})
    v = ablate.load_variants(path)
    assert list(v) == ["base", "cw", "copy"] and v["cw"] == ["--length_window", "8"]
    assert list(ablate.pick_variants(v, "copy,base,copy")) == ["copy", "base"]
    assert ablate.pick_variants(v, None) == v
    with pytest.raises(ablate.AblateError, match="unknown variant nope; the flags file has: base, cw, copy"):
        ablate.pick_variants(v, "base,nope")


@pytest.mark.parametrize("text, msg", [
    ('{"base": [', "not valid JSON"),
    ('["--prefix_lm"]', "must be a JSON object"),
    ('{"base": "--prefix_lm"}', "must be a list of strings"),
    ('{"a b": []}', "names a folder"),
    ('{"_doc": "only a note"}', "no variants"),
])
def test_bad_flags_files_are_refused(tmp_path, text, msg):
    with pytest.raises(ablate.AblateError, match=msg):
        ablate.load_variants(write(tmp_path / "v.json", text))


def test_seeds():
    assert ablate.parse_seeds("1337, 1338,1337") == [1337, 1338]
    with pytest.raises(ablate.AblateError, match="whole numbers"):
        ablate.parse_seeds("1337,x")


def test_train_flags_are_checked_by_train_py_before_anything_runs():
    base, per = ablate.check_train_flags(["--preset", "tiny", "--data_dir", "d"],
                                         {"base": [], "lw": ["--length_window", "8"]})
    assert base.data_dir == "d" and per["base"].length_window == 256 and per["lw"].length_window == 8
    with pytest.raises(ablate.AblateError, match="variant typo: train.py does not take .*--prefx_lm"):
        ablate.check_train_flags([], {"base": [], "typo": ["--prefx_lm"]})
    with pytest.raises(ablate.AblateError, match="variant lw: .*invalid int value"):
        ablate.check_train_flags([], {"lw": ["--length_window", "eight"]})
    with pytest.raises(ablate.AblateError, match="--max_steps is set by ablate.py"):
        ablate.check_train_flags(["--max_steps", "5"], {"base": []})
    with pytest.raises(ablate.AblateError, match=r"--seed is set by ablate.py \(use --seeds\)"):
        ablate.check_train_flags([], {"s": ["--seed=3"]})
    with pytest.raises(ablate.AblateError, match="variant other: changes --data_dir"):
        ablate.check_train_flags(["--data_dir", "d"], {"base": [], "other": ["--data_dir", "e"]})


def test_bad_input_on_the_command_line_is_one_line(tmp_path, capsys, toy_data):
    flags = write(tmp_path / "v.json", {"base": [], "copy": ["--copy_head"]})
    common = ["--flags", flags, "--minutes", "1", "--dry_run"]
    assert "unknown variant" in one_error_line(capsys, common + ["--variants", "base,nope",
                                                                 "--train_args", f"--data_dir {toy_data}"])
    assert "no such data dir" in one_error_line(capsys, common + ["--train_args", f"--data_dir {tmp_path}/none"])
    bad = write(tmp_path / "bad.json", "{")
    assert "not valid JSON" in one_error_line(capsys, ["--flags", bad, "--steps", "2", "--dry_run"])
    assert "no such file" in one_error_line(capsys, common + ["--train_args", f"--data_dir {toy_data}",
                                                              "--apibank", str(tmp_path / "none.json")])
    # a good one: the plan is printed, nothing is trained
    ablate.main(common + ["--train_args", f"--data_dir {toy_data}", "--out_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "2 runs" in out and "copy-s1337" in out and "--copy_head" in out
    assert not os.path.exists(tmp_path / "o")


def test_split_val_scores_the_val_split(tmp_path, toy_data):
    """--split val: settings are chosen on val; the default scores test."""
    flags = write(tmp_path / "v.json", {"base": []})
    common = ["--flags", flags, "--minutes", "1", "--train_args", f"--data_dir {toy_data}"]
    assert ablate.configure(ablate.parse_args(common)).test_file == os.path.join(toy_data, "test.jsonl")
    cfg = ablate.configure(ablate.parse_args(common + ["--split", "val"]))
    assert cfg.test_file == os.path.join(toy_data, "val.jsonl") and "val.jsonl" in cfg.eval_settings["test_desc"]


# -----------------------------------------------------------------------------
# the budget and the logs

def test_steps_for_budget():
    # 10 min, 0.1 s a step, 2 s an evaluation every 250 steps: 600 / (0.1 + 2/250)
    assert ablate.steps_for_budget(10, 0.1, 2.0, 250) == 5555
    # --curve 4: three evaluations inside the loop cost 6 s of the 600
    assert ablate.steps_for_budget(10, 0.1, 2.0, 250, curve=4) == 5940
    assert ablate.curve_interval(5940, 4) == 1485   # evaluations at 1485, 2970, 4455 + the final
    assert ablate.steps_for_budget(0.001, 10.0, 0.0, 250) == 1   # never 0 steps


def test_probe_timing_separates_the_step_from_the_evaluation():
    # slow first steps (left out), 100 ms a step, an evaluation of 2 s at the top of step 19
    lines = [f"step {s} | loss 5.0 | lr 1e-3 | dt {900 if s < 4 else 2100 if s == 20 else 100}ms | tok/s 1"
             for s in range(1, 21)] + ["val step 20 | val_loss 4.0 | best 4.0"]
    step_s, val_s = ablate.probe_timing(lines, val_step=19)
    assert step_s == pytest.approx(0.1) and val_s == pytest.approx(2.0)
    with pytest.raises(ablate.RunFailed, match="too few"):
        ablate.probe_timing(lines[:6], val_step=19)


def test_log_minutes_sum_the_step_times_and_a_resume_goes_back(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("step 10 | loss 5 | lr 1 | dt 600ms | tok/s 1\n"       # 6 s
                   "step 20 | loss 4 | lr 1 | dt 600ms | tok/s 1\n"       # 12 s
                   "val step 20 | val_loss 4.5 | best 4.5\n"
                   "step 30 | loss 3 | lr 1 | dt 1200ms | tok/s 1\n"      # 24 s, then lost
                   "resumed from x/last.pt at step 20\n"
                   "step 30 | loss 3 | lr 1 | dt 600ms | tok/s 1\n"       # 18 s
                   "val step 30 | val_loss 3.5 | best 3.5\n")
    curve = ablate.read_log_times(str(log))
    assert [(round(60 * m, 6), l, s) for m, l, s in curve] == [(12.0, 4.5, 20), (18.0, 3.5, 30)]


def test_test_subset_takes_the_first_n_of_each_split(tmp_path):
    items = [{"split": "seen", "i": i} for i in range(5)] + [{"split": "unseen", "i": i} for i in range(5)]
    src = write(tmp_path / "test.jsonl", "\n".join(json.dumps(x) for x in items))
    per = ablate.test_subset(src, 2, str(tmp_path / "sub.jsonl"))
    got = [json.loads(l) for l in open(tmp_path / "sub.jsonl")]
    assert per == {"seen": 2, "unseen": 2}
    assert [(x["split"], x["i"]) for x in got] == [("seen", 0), ("seen", 1), ("unseen", 0), ("unseen", 1)]


# -----------------------------------------------------------------------------
# the table and the plot

def row(variant, seed, seen, unseen, steps=1000):
    return {"variant": variant, "seed": seed, "dir": f"o/{variant}-s{seed}", "flags": [], "steps": steps,
            "max_steps": 1100, "minutes": 10.0, "val_loss": 0.5 + seen, "best_val": 0.5, "seen_exact": seen,
            "unseen_exact": unseen, "false_call": 0.1, "valid": 1.0, "apibank_exact": None, "when2call_acc": 0.4,
            "curve": [{"step": 500, "minutes": 5.0, "seen_exact": seen / 2, "unseen_exact": unseen / 2},
                      {"step": 1000, "minutes": 10.0, "seen_exact": seen, "unseen_exact": unseen}],
            "val_curve": [(5.0, 1.0, 500), (10.0, 0.5, 1000)]}


def report_cfg(tmp_path, minutes=10.0):
    return argparse.Namespace(
        name="levers", budget={"minutes": minutes}, probe_steps=30, curve=2, base=argparse.Namespace(data_dir="d"),
        common=["--preset", "tiny"], seeds=[1, 2], variants={"base": [], "copy": ["--copy_head"]},
        eval_settings={"test_desc": "`d/test.jsonl`", "limit_desc": "all items", "apibank": None,
                       "when2call": "w.jsonl"}, out_dir=str(tmp_path))


def test_table_json_and_plot_from_synthetic_results(tmp_path):
    rows = [row("base", 1, 0.40, 0.10), row("base", 2, 0.50, 0.20), row("copy", 1, 0.70, 0.30),
            {"variant": "copy", "seed": 2, "dir": "o/copy-s2", "failed": "train.py exited with status 1: boom"}]
    md = ablate.write_report(report_cfg(tmp_path), rows)
    assert md == (tmp_path / "ablation.md").read_text()
    assert "Equal wall-clock time: 10 min" in md and "30-step timing probe" in md
    # API-Bank was not scored in any run: its column is left out
    assert "| base | 1 | 1,000 / 1,100 | 10.0 | 0.9000 | 40.0% | 10.0% | 10.0% | 100.0% | 40.0% |" in md
    assert "API-Bank" not in md.split("| variant |")[1].splitlines()[0] and "When2Call decision |" in md
    assert "| **base** | mean of 2 | 1,000 ± 0 | 10.0 ± 0.0 | 0.9500 ± 0.0707 | 45.0 ± 7.1% | 15.0 ± 7.1% |" in md
    assert "| copy | 2 | failed: train.py exited with status 1: boom |" in md
    assert "**copy**" not in md   # one finished seed: no mean row
    assert "- `copy`: `--copy_head`" in md
    rep = json.loads((tmp_path / "ablation.json").read_text())
    assert rep["means"]["base"]["seen_exact"] == pytest.approx(0.45) and len(rep["runs"]) == 4
    assert (tmp_path / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    # equal steps: said so, and steps shown alone
    rep["budget"] = {"steps": 1000}
    md = ablate.table_md(rep)
    assert "Equal steps: 1,000 optimizer steps per run" in md and "| base | 1 | 1,000 | 10.0 |" in md


def test_mean_curve_averages_point_by_point_over_seeds():
    runs = [row("base", 1, 0.4, 0.1), row("base", 2, 0.6, 0.3)]
    runs[1]["curve"].append({"step": 1500, "minutes": 15.0, "seen_exact": 0.9, "unseen_exact": 0.9})
    assert ablate.mean_curve(runs, "seen_exact") == [(5.0, pytest.approx(0.25)), (10.0, pytest.approx(0.5))]


# -----------------------------------------------------------------------------
# continuing: finished runs skipped, other settings refused, Ctrl-C passed on

def fake_cfg(tmp_path, budget):
    cfg = report_cfg(tmp_path)
    cfg.budget, cfg.curve, cfg.eval_args = budget, 0, []
    return cfg


def test_a_finished_run_is_skipped_and_other_settings_are_refused(tmp_path, monkeypatch):
    cfg = fake_cfg(tmp_path, {"minutes": 10.0})
    run = ablate.Run("base", [], 1, str(tmp_path))
    os.makedirs(run.dir)
    ablate.write_json(run.path("plan.json"), {"settings": ablate.run_settings(cfg, run), "max_steps": 5})
    ablate.write_json(run.path("result.json"), {**row("base", 1, 0.4, 0.1), "eval_settings": cfg.eval_settings})
    monkeypatch.setattr(ablate, "run_child", lambda *a, **k: pytest.fail("nothing should run"))
    logged = []
    got, fresh = ablate.do_run(cfg, run, logged.append)
    assert got["seen_exact"] == 0.4 and not fresh
    assert "finished earlier" in logged[0]
    # the same out dir with another budget: refused, not silently mixed
    with pytest.raises(ablate.AblateError, match="holds a run with other settings"):
        ablate.do_run(fake_cfg(tmp_path, {"minutes": 20.0}), run, logged.append)


def test_watch_links_each_new_last_pt_and_prints_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ablate, "PROGRESS_S", 0.0)
    last = tmp_path / "last.pt"

    def save(text):   # the way model.save_checkpoint writes: a new file renamed over the old
        (tmp_path / "last.pt.tmp").write_text(text)
        os.replace(tmp_path / "last.pt.tmp", last)

    save("from before a resume")
    watch = ablate.Watch(str(tmp_path), "base-s1", 100, keep=True)
    watch()
    assert not list(tmp_path.glob("snap_*"))   # the old last.pt is not new
    save("step 50")
    with open(tmp_path / "log.txt", "a") as f:
        f.write("step 50 | loss 1 | lr 1 | dt 10ms\nval step 50 | val_loss 0.7500 | best 0.7500\nval step 6")
    watch()
    watch()   # nothing new: no second copy, no second line
    save("step 100")
    watch()
    assert [p.read_text() for p in sorted(tmp_path.glob("snap_*.pt"))] == ["step 50", "step 100"]
    out = capsys.readouterr().out.splitlines()
    assert out == ["  base-s1: step 50/100 | val_loss 0.7500 | 0.0 min"]   # the half line waits


def test_snapshots_are_kept_without_the_optimizer_and_named_by_step(tmp_path):
    import torch
    for n, step in ((1, 50), (2, 100)):
        torch.save({"model": {"w": torch.ones(2)}, "model_config": {}, "optimizer": {"m": torch.ones(4)},
                    "step": step, "train_seconds": step / 10}, tmp_path / f"snap_{n}.pt")
    kept = ablate.keep_snapshots(str(tmp_path))
    assert [(k["step"], k["seconds"]) for k in kept] == [(50, 5.0), (100, 10.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_100.pt", "ckpt_50.pt"]
    ck = torch.load(tmp_path / "ckpt_100.pt", weights_only=True)
    assert "optimizer" not in ck and ck["step"] == 100 and torch.equal(ck["model"]["w"], torch.ones(2))


CHILD = """
import signal, sys, time
def stop(*a):
    open(sys.argv[1], "w").write("saved")
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, signal.SIG_IGN)   # as in a background run
open(sys.argv[1] + ".up", "w").close()
time.sleep(30)
"""


def test_ctrl_c_is_passed_to_the_child_which_saves_before_it_exits(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "POLL_S", 0.05)
    flag = str(tmp_path / "saved")

    def every():   # Ctrl-C arrives once the child is up
        if os.path.exists(flag + ".up"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ablate.run_child([sys.executable, "-c", CHILD, flag], str(tmp_path / "out.txt"), every=every)
    assert open(flag).read() == "saved"


# -----------------------------------------------------------------------------
# end to end: 2 variants x 2 steps on the toy data, then again (all skipped)

def test_two_variants_end_to_end_then_skipped(toy_data, tmp_path, capsys, monkeypatch):
    # one thread per child: on a busy 2-core machine two torch threads contend and a
    # micro step takes ~1.7 s instead of ~0.05 s
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = write(tmp_path / "v.json", {"base": [], "cw": ["--length_window", "8"]})
    out = str(tmp_path / "abl")
    argv = ["--flags", flags, "--steps", "2", "--out_dir", out, "--eval_limit", "2",
            "--eval_args", "--max_new_tokens 16",
            "--train_args", " ".join(["--data_dir", toy_data, "--preset", "tiny", *MICRO, "--batch_size", "4",
                                      "--eval_batches", "1", "--log_interval", "1", "--warmup_steps", "1"])]
    ablate.main(argv)
    text = capsys.readouterr().out
    assert "[2/2] cw-s1337" in text and "wrote" in text
    md = open(os.path.join(out, "ablation.md")).read()
    assert "Equal steps: 2 optimizer steps" in md and "first 2 items of each split" in md
    assert "| base | 1337 | 2 |" in md and "| cw | 1337 | 2 |" in md
    rep = json.load(open(os.path.join(out, "ablation.json")))
    for r in rep["runs"]:
        assert r["steps"] == 2 and r["seen_exact"] is not None and r["unseen_exact"] is not None
        assert r["val_curve"] and r["val_curve"][-1][2] == 2
        assert json.load(open(os.path.join(r["dir"], f"eval_step{r['best_step']}_test_n2.json")))["n_items"] == 4
    assert open(os.path.join(out, "ablation.png"), "rb").read(8) == PNG_MAGIC
    # the same command again: nothing re-runs
    ablate.main(argv)
    text = capsys.readouterr().out
    assert "2 of 2 runs finished earlier" in text and text.count("finished earlier:") == 2


def test_compute_curve_fits_the_runs_and_predicts_from_their_tokens(toy_ckpt, tmp_path, capsys):
    import shutil

    import torch

    from utils import compute_curve
    ckpt = torch.load(toy_ckpt, weights_only=True)
    assert ckpt["train_tokens"] > 0          # train.py counts what it trained on
    # three budgets, each 10x the tokens of the last, error halving each time
    for i, (tokens, acc) in enumerate([(1e6, 0.2), (1e7, 0.6), (1e8, 0.8)]):
        run = tmp_path / f"b{i}" / "v-s1337"
        run.mkdir(parents=True)
        torch.save({**ckpt, "train_tokens": int(tokens)}, run / "best.pt")
        write(run / "result.json", {"unseen_exact": acc, "minutes": i})
    out = str(tmp_path / "curve.png")
    compute_curve.main([str(tmp_path / f"b{i}") for i in range(3)] + ["--predict_tflops", "1e-3",
                       "--predict_hours", "1", "--out", out])
    text = capsys.readouterr().out
    runs = compute_curve.read_runs([str(tmp_path / "b0")], "unseen_exact")
    assert runs[0]["flops"] == 6 * runs[0]["params"] * 10 ** 6 and runs[0]["params"] > 0
    a, b = compute_curve.fit(compute_curve.read_runs([str(tmp_path / f"b{i}") for i in range(3)], "unseen_exact"))
    assert b < 0 and compute_curve.predict(a, b, 6 * runs[0]["params"] * 1e9) > 0.8
    assert "prediction: 1 h at 0.001 TFLOP/s" in text and open(out, "rb").read(8) == PNG_MAGIC
    shutil.rmtree(tmp_path / "b0" / "v-s1337")
    with pytest.raises(SystemExit):            # an empty folder is a clear error, not a traceback
        compute_curve.main([str(tmp_path / "b0")])
    assert "no finished run" in capsys.readouterr().err
