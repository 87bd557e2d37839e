import pytest
import torch

from model import (GPT, GPTConfig, KVCache, PRESETS, CheckpointError, config_dict,
                   config_from_preset, load_checkpoint, save_checkpoint)


def micro(**kw):
    base = dict(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, n_hidden=64)
    base.update(kw)
    return GPTConfig(**base)


def test_forward_shapes_and_float32_logits():
    torch.manual_seed(0)
    model = GPT(micro()).eval()
    logits = model(torch.randint(0, 97, (3, 17)))
    assert logits.shape == (3, 17, 97)
    assert logits.dtype == torch.float32


def test_too_long_sequence_is_refused():
    model = GPT(micro(block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("impl, smear", [("explicit", False), ("sdpa", False), ("sdpa", True)])
def test_causality_future_tokens_do_not_change_past_logits(impl, smear):
    torch.manual_seed(0)
    model = GPT(micro(attn_impl=impl, smear_keys=smear)).eval()
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 97
    a, b = model(x), model(y)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:], atol=1e-3)


def test_explicit_and_sdpa_attention_agree_with_and_without_cache():
    torch.manual_seed(0)
    explicit = GPT(micro(attn_impl="explicit")).eval()
    fast = GPT(micro(attn_impl="sdpa")).eval()
    fast.load_state_dict(explicit.state_dict())
    x = torch.randint(0, 97, (2, 30))
    assert torch.allclose(explicit(x), fast(x), atol=1e-5)
    # chunked prefill through the cache: 10 tokens, then 15, then 1, then 4
    ce, cf = (KVCache(explicit.config, 2, 30, "cpu") for _ in range(2))
    for s, e in [(0, 10), (10, 25), (25, 26), (26, 30)]:
        assert torch.allclose(explicit(x[:, s:e], ce), fast(x[:, s:e], cf), atol=1e-5)


@pytest.mark.parametrize("smear", [False, True])
def test_cached_logits_equal_uncached(smear):
    torch.manual_seed(0)
    model = GPT(micro(smear_keys=smear)).eval()
    if smear:   # make the smear gates non-trivial so a cache bug would show
        for blk in model.blocks:
            blk.attn.smear.data.uniform_(-2, 2)
    x = torch.randint(0, 97, (1, 25))
    full = model(x)
    cache = KVCache(model.config, 1, 25, "cpu")
    parts = [model(x[:, :20], cache)] + [model(x[:, t:t + 1], cache) for t in range(20, 25)]
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5)
    assert cache.pos == 25


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = GPT(micro())
    x = torch.randint(0, 97, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_presets_have_the_promised_sizes():
    counts = {name: GPT(config_from_preset(name, vocab_size=4096)).num_params() for name in PRESETS}
    assert 0.8e6 < counts["tiny"] < 1.5e6
    assert 4e6 < counts["small"] < 6e6
    assert 25e6 <= counts["26m"] <= 27e6


def test_preset_overrides_and_unknown_preset():
    c = config_from_preset("tiny", n_layer=7, n_head=None)
    assert c.n_layer == 7 and c.n_head == PRESETS["tiny"]["n_head"]
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_preset("huge")


def test_checkpoint_round_trip_and_tokenizer_check(tmp_path):
    torch.manual_seed(0)
    model = GPT(micro())
    path = str(tmp_path / "c.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": config_dict(model.config),
                     "tokenizer_sha256": "abc"}, path)
    loaded, ckpt = load_checkpoint(path, tokenizer_sha256="abc")
    x = torch.randint(0, 97, (1, 10))
    assert torch.equal(model.eval()(x), loaded(x))
    with pytest.raises(CheckpointError, match="different tokenizer"):
        load_checkpoint(path, tokenizer_sha256="xyz")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path / "junk.pt"))
