"""Shared fixtures: one toy data dir and one toy checkpoint per test session,
made through the real data.py / train.py entry points (in-process, for speed)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Micro model: fast enough to train a few steps inside the suite.
MICRO = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_hidden", "64", "--block_size", "512"]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    import data
    out = str(tmp_path_factory.mktemp("data") / "toy")
    data.main(["--out_dir", out, "--n_train", "400", "--n_val", "40", "--n_test", "30",
               "--n_test_unseen", "20", "--vocab_size", "600", "--seed", "7", "--group", "4"])
    return out


@pytest.fixture(scope="session")
def toy_ckpt(toy_data, tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp("out") / "toy")
    train.main(["--data_dir", toy_data, "--out_dir", out, "--preset", "tiny", *MICRO,
                "--max_steps", "6", "--batch_size", "4", "--eval_interval", "3",
                "--eval_batches", "1", "--log_interval", "1", "--warmup_steps", "2"])
    return os.path.join(out, "best.pt")
