import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from utils import export
from model import GPT, GPTConfig, CheckpointError, config_dict, file_sha256, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_round_trip_gives_identical_logits(toy_ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "export")
    export.main(["--ckpt", toy_ckpt, "--out_dir", out])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tok.model"]
    model, ckpt = load_checkpoint(toy_ckpt)
    data_dir = ckpt["data_dir"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    assert cfg["format"] == "nanotool-export" and cfg["format_version"] == export.FORMAT_VERSION
    assert cfg["model_config"] == config_dict(model.config)
    assert cfg["vocab_size"] == meta["vocab_size"] and cfg["special_tokens"] == meta["special_tokens"]
    assert cfg["tokenizer_sha256"] == ckpt["tokenizer_sha256"] == file_sha256(os.path.join(out, "tok.model"))
    # the tied embedding is stored once, and every tensor of the model is there
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert "embed.weight" in keys and not any("head" in k for k in keys)

    # loading must not go through torch.load (pickle)
    def no_pickle(*a, **k):
        raise AssertionError("load_export called torch.load")
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, loaded_cfg = export.load_export(out)
    assert loaded_cfg == cfg and not loaded.training
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_export_keeps_the_architecture_switches(toy_data, tmp_path):
    # a checkpoint with every switch on survives the round trip
    meta = json.load(open(os.path.join(toy_data, "meta.json")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=64, n_layer=2, n_head=4, n_embd=32,
                          n_hidden=64, smear_keys=True, ffn="swiglu", n_kv_head=2, qk_norm=True)).eval()
    ckpt = str(tmp_path / "c.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": config_dict(model.config),
                     "data_dir": toy_data, "tokenizer_sha256": meta["tokenizer_sha256"]}, ckpt)
    export.export(ckpt, str(tmp_path / "e"))
    loaded, cfg = export.load_export(str(tmp_path / "e"))
    assert (cfg["model_config"]["ffn"], cfg["model_config"]["n_kv_head"], cfg["model_config"]["qk_norm"]) \
        == ("swiglu", 2, True)
    x = torch.randint(0, meta["vocab_size"], (2, 30))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def run_main(argv, capsys):
    """export.main -> (exit code, stderr), for the error cases."""
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err   # one line
    return e.value.code, err


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    code, err = run_main(["--ckpt", str(tmp_path / "none.pt"), "--out_dir", str(tmp_path / "e")], capsys)
    assert code == 2 and "no such checkpoint" in err
    assert not os.path.exists(tmp_path / "e")


def test_tokenizer_mismatch_and_missing_data_dir_are_refused(toy_ckpt, toy_data, tmp_path, capsys):
    other = str(tmp_path / "other")
    shutil.copytree(toy_data, other)
    with open(os.path.join(other, "tok.model"), "ab") as f:
        f.write(b"\0")                      # a tokenizer file swapped under meta.json
    out = str(tmp_path / "e")
    code, err = run_main(["--ckpt", toy_ckpt, "--out_dir", out, "--data_dir", other], capsys)
    assert code == 2 and "not the tokenizer meta.json was written with" in err
    os.remove(os.path.join(other, "tok.model"))
    code, err = run_main(["--ckpt", toy_ckpt, "--out_dir", out, "--data_dir", other], capsys)
    assert "no tok.model" in err
    code, err = run_main(["--ckpt", toy_ckpt, "--out_dir", out, "--data_dir", str(tmp_path / "nowhere")], capsys)
    assert "no such data dir" in err
    assert not os.path.exists(out)          # nothing half-written


def test_load_export_refuses_a_swapped_tokenizer(toy_ckpt, tmp_path):
    out = str(tmp_path / "e")
    export.export(toy_ckpt, out)
    with open(os.path.join(out, "tok.model"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        export.load_export(out)
    with pytest.raises(CheckpointError, match="not an export"):
        export.load_export(str(tmp_path))


def test_cli_end_to_end(toy_ckpt, tmp_path):
    out = str(tmp_path / "e")
    ok = subprocess.run([sys.executable, "utils/export.py", "--ckpt", toy_ckpt, "--out_dir", out],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "exported" in ok.stdout and os.path.isfile(os.path.join(out, "model.safetensors"))
    model, _ = export.load_export(out)
    assert model.num_params() == load_checkpoint(toy_ckpt)[0].num_params()
