"""Shared fixtures: one toy data dir and one toy checkpoint per test session,
made through the real data.py / train.py entry points (in-process, for speed)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Micro model: fast enough to train a few steps inside the suite.
MICRO = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_hidden", "64", "--block_size", "512"]


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """Scripts run in-process here: one that switches autograd off for good breaks every
    later training test with a confusing error, so name the culprit instead."""
    import torch
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left autograd switched off (torch.set_grad_enabled(False) in a script's main?)")


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


@pytest.fixture(scope="session")
def compiled_data(tmp_path_factory):
    """A compiled catalogue (two domains of the hand-written catalogue)."""
    import data
    out = str(tmp_path_factory.mktemp("data") / "compiled")
    data.main(["--compiled", "--domains", "shopping,weather", "--out_dir", out, "--n_train", "300",
               "--n_val", "30", "--n_test", "20", "--n_test_unseen", "10", "--vocab_size", "500", "--seed", "3"])
    return out


@pytest.fixture(scope="session")
def compiled_ckpt(compiled_data, tmp_path_factory):
    """A few steps of a prefix-LM model with a copy head and the aux heads on compiled_data."""
    import train
    out = str(tmp_path_factory.mktemp("out") / "compiled")
    train.main(["--data_dir", compiled_data, "--out_dir", out, "--preset", "tiny", *MICRO, "--prefix_lm",
                "--copy_head", "--tagger", "--max_steps", "6", "--batch_size", "8", "--eval_interval", "3",
                "--eval_batches", "1", "--log_interval", "1", "--warmup_steps", "2"])
    return os.path.join(out, "best.pt")


@pytest.fixture(scope="session")
def pointer_ckpt(toy_data, tmp_path_factory):
    """A few steps of a catalogue-in-the-prompt model with pointer heads (--tagger)."""
    import train
    out = str(tmp_path_factory.mktemp("out") / "pointer")
    train.main(["--data_dir", toy_data, "--out_dir", out, "--preset", "tiny", *MICRO, "--prefix_lm", "--tagger",
                "--max_steps", "4", "--batch_size", "4", "--eval_interval", "3", "--eval_batches", "1",
                "--log_interval", "1", "--warmup_steps", "2"])
    return os.path.join(out, "best.pt")
