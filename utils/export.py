"""
Export a trained checkpoint as a plain directory that needs no pickle to read:

    python utils/export.py --ckpt out/demo/best.pt --out_dir out/demo/export
    python utils/export.py --ckpt out/small/best.pt --out_dir out/small/export --data_dir data/demo

writes into --out_dir
    model.safetensors   the weights, float32; the output head is tied to the input
                        embedding (GPT.head uses embed.weight), so it is stored once
    config.json         format name and version, the model config (GPTConfig's
                        fields), vocab size, special token ids, tokenizer sha256
    tok.model           the sentencepiece tokenizer the checkpoint was trained with

The tokenizer comes from the checkpoint's data dir (or --data_dir); its sha256 must
equal the one recorded in the checkpoint, since token ids mean nothing under
another tokenizer. Read the export back with load_export(dir): safetensors + json
only, no torch.load, so a downloaded export cannot run code when it is loaded.
Optimizer state, the training args and the step are not exported.
"""

import argparse
import json
import os
import shutil
import sys

# run from anywhere: the project's modules live one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safetensors.torch import load_file, save_file

from datadir import DataDirError, load_data_dir
from model import GPT, CheckpointError, check_tokenizer, config_dict, config_from_dict, file_sha256, load_checkpoint

FORMAT = "nanotool-export"
FORMAT_VERSION = 1     # bump when a reader of the old layout would misread the new one


def export(ckpt_path, out_dir, data_dir=None):
    """Write the export of ckpt_path into out_dir -> path of its config.json.
    Raises CheckpointError (one line) on a checkpoint, data dir or tokenizer we cannot use."""
    model, ckpt = load_checkpoint(ckpt_path, "cpu")
    data_dir = data_dir or ckpt.get("data_dir")
    if not data_dir or not os.path.isdir(data_dir):
        raise CheckpointError(f"{data_dir}: no such data dir (the checkpoint's tokenizer lives "
                              "there); pass the one it was trained on with --data_dir")
    try:
        meta = load_data_dir(data_dir).meta
    except DataDirError as e:
        raise CheckpointError(f"{e}; pass the data dir the checkpoint was trained on with --data_dir") from None
    tok_path, tok_sha = os.path.join(data_dir, "tok.model"), meta["tokenizer_sha256"]
    check_tokenizer(ckpt, tok_sha, ckpt_path)
    if meta.get("vocab_size") != model.config.vocab_size:
        raise CheckpointError(f"{data_dir}/meta.json: vocab_size {meta.get('vocab_size')} but the model has "
                              f"{model.config.vocab_size}")

    # state_dict holds no head weight (the head reads embed.weight), and the
    # RoPE tables are non-persistent buffers, rebuilt from the config on load
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": config_dict(model.config),
        "vocab_size": model.config.vocab_size,
        "special_tokens": meta["special_tokens"],
        "tokenizer": "tok.model",
        "tokenizer_sha256": tok_sha,
        "dtype": "float32",
        "trained": {"step": ckpt.get("step"), "best_val": ckpt.get("best_val")},
    }
    os.makedirs(out_dir, exist_ok=True)
    # each file goes in atomically (temp + rename), the config last: a directory
    # with a config.json holds the weights and tokenizer that config describes
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(state, weights + ".tmp", metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.replace(weights + ".tmp", weights)
    shutil.copyfile(tok_path, os.path.join(out_dir, "tok.model.tmp"))
    os.replace(os.path.join(out_dir, "tok.model.tmp"), os.path.join(out_dir, "tok.model"))
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    os.replace(config_path + ".tmp", config_path)
    return config_path


def load_export(export_dir, device="cpu"):
    """Load an export -> (model in eval mode, config.json as a dict).
    Reads json and safetensors only; never torch.load (no pickle)."""
    config_path = os.path.join(export_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing; not an export directory (see utils/export.py)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format {config.get('format')!r} version "
                              f"{config.get('format_version')!r}; this code reads {FORMAT!r} version {FORMAT_VERSION}")
    tok_path = os.path.join(export_dir, config["tokenizer"])
    if not os.path.isfile(tok_path) or file_sha256(tok_path) != config["tokenizer_sha256"]:
        raise CheckpointError(f"{tok_path}: missing or not the tokenizer config.json names (sha256 differs)")
    model = GPT(config_from_dict(config["model_config"]))
    # strict: a missing or extra tensor is an error, not a silently random weight
    model.load_state_dict(load_file(os.path.join(export_dir, "model.safetensors"), device=str(device)))
    model.to(device).eval()
    return model, config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/demo/best.pt")
    p.add_argument("--out_dir", default=None, help="default: <checkpoint's dir>/export")
    p.add_argument("--data_dir", default=None, help="where tok.model and meta.json are; default: the checkpoint's")
    args = p.parse_args(argv)
    out_dir = args.out_dir or os.path.join(os.path.dirname(args.ckpt), "export")
    try:
        config_path = export(args.ckpt, out_dir, args.data_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    n = sum(os.path.getsize(os.path.join(out_dir, f)) for f in ("model.safetensors", "tok.model", "config.json"))
    print(f"exported {args.ckpt} -> {out_dir} (model.safetensors, config.json, tok.model; {n / 1e6:.1f} MB)")
    return config_path


if __name__ == "__main__":
    main()
