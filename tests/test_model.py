import pytest
import torch
import torch.nn.functional as F

from model import (GPT, MLP, GPTConfig, KVCache, Layout, PRESETS, CheckpointError, SwiGLU, config_dict,
                   config_from_dict, config_from_preset, load_checkpoint, save_checkpoint)


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


# -----------------------------------------------------------------------------
# architecture switches: ffn, grouped-query attention, qk_norm

SWITCHES = {
    "ffn_none": dict(ffn="none"),
    "swiglu": dict(ffn="swiglu"),
    "gqa": dict(n_head=4, n_kv_head=2),
    "mqa_smear": dict(n_head=4, n_kv_head=1, smear_keys=True),
    "qk_norm_smear": dict(qk_norm=True, smear_keys=True),
    "all": dict(ffn="swiglu", n_head=4, n_kv_head=2, qk_norm=True, smear_keys=True),
}


def switched(name, impl="sdpa", seed=0):
    """A micro model with one switch set, its gains made non-trivial: smear gates
    and norm weights start at constants that could hide a mix-up (e.g. q_norm
    applied to keys, a smear gate indexed by the wrong head)."""
    torch.manual_seed(seed)
    model = GPT(micro(attn_impl=impl, **SWITCHES[name])).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("smear"):
                p.uniform_(-2, 2)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def twins(name):
    """The same weights under the explicit and the SDPA attention path."""
    explicit = switched(name, "explicit")
    fast = GPT(micro(attn_impl="sdpa", **SWITCHES[name])).eval()
    fast.load_state_dict(explicit.state_dict())
    return explicit, fast


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("name", SWITCHES)
def test_switch_shapes_and_causality(name, impl):
    model = switched(name, impl)
    x = torch.randint(0, 97, (3, 20))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % 97
    a, b = model(x), model(y)
    assert a.shape == (3, 20, 97) and a.dtype == torch.float32
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_explicit_and_sdpa_agree_with_and_without_cache(name):
    explicit, fast = twins(name)
    x = torch.randint(0, 97, (2, 30))
    assert torch.allclose(explicit(x), fast(x), atol=1e-5)
    ce, cf = (KVCache(explicit.config, 2, 30, "cpu") for _ in range(2))
    for s, e in [(0, 10), (10, 25), (25, 26), (26, 30)]:
        assert torch.allclose(explicit(x[:, s:e], ce), fast(x[:, s:e], cf), atol=1e-5)


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("name", SWITCHES)
def test_switch_cached_logits_equal_uncached(name, impl):
    model = switched(name, impl)
    x = torch.randint(0, 97, (2, 16))
    full = model(x)
    one = KVCache(model.config, 2, 16, "cpu")
    by_token = torch.cat([model(x[:, t:t + 1], one) for t in range(16)], dim=1)
    chunks = KVCache(model.config, 2, 16, "cpu")
    by_chunk = torch.cat([model(x[:, s:e], chunks) for s, e in [(0, 5), (5, 6), (6, 13), (13, 16)]], dim=1)
    assert torch.allclose(full, by_token, atol=1e-5)
    assert torch.allclose(full, by_chunk, atol=1e-5)
    assert one.pos == chunks.pos == 16


def packed_layout(p, lens):
    """Layout of one row [prefix of p tokens][request 1]...[request n] (train.py
    --share_prefix): each request sees the prefix and itself, at positions p.."""
    T = p + sum(lens)
    pos, prev = torch.arange(T), torch.arange(T) - 1
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    start = p
    for n in lens:
        mask[start:start + n, p:start] = False       # not the requests before it
        pos[start:start + n] = torch.arange(p, p + n)
        prev[start] = p - 1                           # its first token follows the prefix
        start += n
    return Layout(pos[None], mask[None, None], prev[None])


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("name", SWITCHES)
def test_switch_packed_layout_equals_separate_sequences(name, impl):
    model = switched(name, impl)
    prefix, a, b = (torch.randint(0, 97, (1, n)) for n in (6, 5, 4))
    h = model.hidden(torch.cat([prefix, a, b], dim=1), layout=packed_layout(6, [5, 4]))
    ha, hb = model.hidden(torch.cat([prefix, a], dim=1)), model.hidden(torch.cat([prefix, b], dim=1))
    assert torch.allclose(h[:, :11], ha, atol=1e-5)
    assert torch.allclose(h[:, 11:], hb[:, 6:], atol=1e-5)


def test_gqa_shares_each_kv_head_with_a_group_of_query_heads():
    # a GQA model equals plain multi-head attention whose key/value heads are
    # copies: kv head j repeated for query heads j*g .. j*g+g-1
    torch.manual_seed(0)
    gqa = GPT(micro(n_head=4, n_kv_head=2, smear_keys=True)).eval()
    mha = GPT(micro(n_head=4, smear_keys=True)).eval()
    C, hs, g = 32, 8, 2
    with torch.no_grad():
        for blk in gqa.blocks:
            blk.attn.smear.uniform_(-2, 2)
        state = gqa.state_dict()
        for i, blk in enumerate(gqa.blocks):
            q, k, v = blk.attn.qkv.weight.split([C, 2 * hs, 2 * hs])
            widen = lambda w: w.view(2, hs, C).repeat_interleave(g, dim=0).reshape(4 * hs, C)
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, widen(k), widen(v)])
            state[f"blocks.{i}.attn.smear"] = blk.attn.smear.repeat_interleave(g)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 20))
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_gqa_kv_cache_and_projection_shrink():
    plain, gqa = GPT(micro(n_head=4)), GPT(micro(n_head=4, n_kv_head=1))
    cp, cg = KVCache(plain.config, 2, 40, "cpu"), KVCache(gqa.config, 2, 40, "cpu")
    assert cg.k.shape == (2, 2, 1, 40, 8) and cp.k.shape == (2, 2, 4, 40, 8)
    assert cp.nbytes() == 4 * cg.nbytes()
    # keys and values: (C, C) each in plain attention, (C, C/4) each with one kv head of four
    assert gqa.blocks[0].attn.qkv.weight.shape == (32 + 2 * 8, 32)
    assert plain.num_params() - gqa.num_params() == 2 * 2 * 32 * (32 - 8)
    # n_kv_head = n_head is plain attention, weights and all
    same = GPT(micro(n_head=4, n_kv_head=4)).eval()
    same.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (1, 12))
    assert torch.equal(same(x), plain.eval()(x))


def test_ffn_none_drops_the_mlp_sub_block():
    gelu, none = GPT(micro()), GPT(micro(ffn="none"))
    C, H, L = 32, 64, 2
    # per block: fc and proj (2*C*H) and the norm in front of them (C)
    assert gelu.num_params() - none.num_params() == L * (2 * C * H + C)
    assert not any(isinstance(m, (MLP, SwiGLU)) for m in none.modules())
    assert not any("mlp" in k or "norm2" in k for k in none.state_dict())
    assert none.config.ffn_hidden == 0


def test_swiglu_width_and_parameter_count_as_documented():
    cfg = micro(ffn="swiglu")
    assert cfg.ffn_hidden == 40              # 2/3 of n_hidden=64 is 42.7, to a multiple of 8
    model = GPT(cfg)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, SwiGLU)
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 32 * 40
    assert GPT(micro()).num_params() - model.num_params() == 2 * (2 * 32 * 64 - 3 * 32 * 40)
    # at preset sizes the 2/3 rule keeps the total within 1% of the GELU model's
    for name in ("tiny", "small"):
        g = GPT(config_from_preset(name, vocab_size=4096)).num_params()
        s = GPT(config_from_preset(name, vocab_size=4096, ffn="swiglu")).num_params()
        assert abs(s - g) / g < 0.01, (name, g, s)


def test_swiglu_is_gated():
    # zeroing the gate matrix zeroes the branch (silu(0) = 0); GELU's fc has no such partner
    model = switched("swiglu")
    x = torch.randint(0, 97, (1, 10))
    before = model(x)
    with torch.no_grad():
        for blk in model.blocks:
            blk.mlp.gate.weight.zero_()
    after = model(x)
    attn_only = GPT(micro(ffn="none")).eval()
    attn_only.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, attn_only(x), atol=1e-5)


def test_qk_norm_changes_the_output_and_bounds_the_logits():
    torch.manual_seed(0)
    off = GPT(micro()).eval()
    on = GPT(micro(qk_norm=True)).eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"blocks.{i}.attn.{n}_norm.weight" for i in range(2) for n in "qk")
    assert not unexpected
    x = torch.randint(0, 97, (2, 16))
    a, b = off(x), on(x)
    assert not torch.allclose(a, b, atol=1e-3)
    # with qk_norm, scaling the query weights cannot change attention; without it, it does
    with torch.no_grad():
        for m in (off, on):
            for blk in m.blocks:
                blk.attn.qkv.weight[:32] *= 10
    assert torch.allclose(on(x), b, atol=1e-4)
    assert not torch.allclose(off(x), a, atol=1e-3)
    # and both learned gains are in use (neither norm is applied twice)
    for n in ("q_norm", "k_norm"):
        with torch.no_grad():
            getattr(on.blocks[0].attn, n).weight.mul_(3)
        c = on(x)
        assert not torch.allclose(c, b, atol=1e-3), n
        b = c


@pytest.mark.parametrize("kw, msg", [
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_kv_head=-1), "multiple of n_kv_head"),
    (dict(ffn="relu"), "unknown ffn"),
    (dict(attn_impl="flash"), "unknown attn_impl"),
    (dict(n_head=3), "multiple of n_head"),
])
def test_invalid_configs_are_refused_with_the_reason(kw, msg):
    with pytest.raises(ValueError, match=msg):
        micro(**kw)
    with pytest.raises(ValueError, match=msg):     # train.py's way in
        config_from_preset("tiny", **kw)


def test_default_switches_keep_the_old_model_and_old_checkpoints_load(tmp_path):
    # the defaults must build exactly the pre-switch model: same keys and shapes
    model = GPT(micro(smear_keys=True))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("blocks.0.")}
    assert shapes == {"blocks.0.norm1.weight": (32,), "blocks.0.attn.qkv.weight": (96, 32),
                      "blocks.0.attn.proj.weight": (32, 32), "blocks.0.attn.smear": (2,),
                      "blocks.0.norm2.weight": (32,), "blocks.0.mlp.fc.weight": (64, 32),
                      "blocks.0.mlp.proj.weight": (32, 64)}
    # a checkpoint written before the switches existed has none of their fields
    old = {k: v for k, v in config_dict(model.config).items() if k not in ("ffn", "n_kv_head", "qk_norm")}
    path = str(tmp_path / "old.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": old}, path)
    loaded, _ = load_checkpoint(path)
    assert (loaded.config.ffn, loaded.config.n_kv_head, loaded.config.qk_norm) == ("gelu", 0, False)
    assert config_from_dict(old) == loaded.config == model.config
    x = torch.randint(0, 97, (1, 10))
    assert torch.equal(loaded(x), model.eval()(x))


# -----------------------------------------------------------------------------
# prefix LM and the copy head

def _prompt_model(impl="sdpa", **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, n_hidden=64, block_size=32, smear_keys=True,
                    attn_impl=impl, **kw)
    return GPT(cfg).eval()


# 3 catalogue tokens (up to <|user|>), 4 request tokens, 5 answer tokens
SEG = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0]])


def _changed(x, at):
    y = x.clone()
    y[0, at] = x[0, at] % 49 + 1
    return y


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_prefix_lm_reads_each_prompt_block_both_ways_and_the_answer_causally(impl):
    m = _prompt_model(impl, prefix_lm=True)
    x = torch.randint(1, 50, (1, 12))
    with torch.no_grad():
        h = m.hidden(x, seg=SEG)
        later_request = m.hidden(_changed(x, 6), seg=SEG)
        answer = m.hidden(_changed(x, 10), seg=SEG)
        plain = _prompt_model(impl, prefix_lm=False)
        p1, p2 = plain.hidden(x, seg=SEG), plain.hidden(_changed(x, 6), seg=SEG)
    assert (later_request[0, 3] - h[0, 3]).abs().max() > 1e-4       # the request reads itself both ways
    assert torch.allclose(later_request[0, :3], h[0, :3], atol=1e-6)  # the catalogue never sees the request
    assert torch.allclose(answer[0, :10], h[0, :10], atol=1e-6)       # the answer is causal
    assert torch.allclose(p1[0, :6], p2[0, :6], atol=1e-6)           # no prefix_lm: causal everywhere


@pytest.mark.parametrize("switches", [dict(prefix_lm=True), dict(copy_head=True),
                                      dict(prefix_lm=True, copy_head=True)])
def test_decoding_in_prompt_blocks_equals_the_training_forward(switches):
    """GPT.decode (catalogue block, request block, then answer tokens one by one,
    with a KV cache) scores the answer positions as training's forward with seg
    does; prompt positions differ only for the copy head, and they carry no loss."""
    m = _prompt_model(**switches)
    x = torch.randint(1, 50, (1, 12))
    with torch.no_grad():
        full = m(x, seg=SEG)[0]                                  # (12, V)
        cache = KVCache(m.config, 1, 32, "cpu")
        m.decode(x[:, :3], cache, prompt=1)
        rows = [m.decode(x[:, 3:7], cache, prompt=2)]            # predicts the first answer token
        for t in range(7, 12):
            rows.append(m.decode(x[:, t:t + 1], cache))
    assert torch.allclose(torch.stack(rows), full[6:], atol=1e-5)


def test_copy_head_gives_a_distribution_and_copies_prompt_tokens():
    m = _prompt_model(copy_head=True)
    x = torch.randint(1, 50, (1, 12))
    with torch.no_grad():
        logp = m(x, seg=SEG)[0]
        assert torch.allclose(logp.logsumexp(-1), torch.zeros(12), atol=1e-4)   # sums to one
        m.copy.gate.bias.fill_(-30.0)                             # the gate says: copy
        p = m(x, seg=SEG)[0, 7:].exp()                            # answer positions
    prompt_ids = x[0, :7].unique()
    assert torch.allclose(p[:, prompt_ids].sum(-1), torch.ones(5), atol=1e-4)


def test_copy_head_needs_the_prompt_blocks():
    m = _prompt_model(copy_head=True)
    with pytest.raises(ValueError, match="seg"):
        m(torch.randint(1, 50, (1, 12)))


def test_intent_vote_reads_the_mean_of_every_request_tokens_intent_as_training_does():
    """With intent_vote, decode's intent scores are the mean log-probability of the
    intent head over the request block's tokens, as training's forward gives them
    (train.aux_loss trains every request token, seg 2); without it, the last token's."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, n_layer=2, n_head=2, n_embd=32, n_hidden=64, block_size=32,
               prefix_lm=True, n_tags=5, n_intents=7)
    x = torch.randint(1, 50, (1, 12))
    for vote in (False, True):
        torch.manual_seed(0)
        m = GPT(GPTConfig(**cfg, intent_vote=vote)).eval()
        with torch.no_grad():
            _, _, intents, _ = m(x, seg=SEG, aux=True)              # (1, 12, 7)
            cache = KVCache(m.config, 1, 32, "cpu")
            m.decode(x[:, :3], cache, prompt=1)
            _, _, got, each = m.decode(x[:, 3:7], cache, prompt=2, aux=True)
        want = F.log_softmax(intents[0, 3:7], -1).mean(0) if vote else intents[0, 6]
        assert torch.allclose(got, want, atol=1e-5), vote
        # and each token's own reading (heads.Heads.run_tools), with the vote only
        assert (each is None) != vote and (not vote or torch.allclose(each, F.log_softmax(intents[0, 3:7], -1), atol=1e-5))
    # the two differ: a vote is not the last token's reading
    assert not torch.allclose(F.log_softmax(intents[0, 3:7], -1).mean(0), F.log_softmax(intents[0, 6], -1), atol=1e-3)
    with pytest.raises(ValueError, match="intent_vote needs"):
        GPTConfig(**{**cfg, "prefix_lm": False}, intent_vote=True)
    with pytest.raises(ValueError, match="intent_vote needs"):
        GPTConfig(**{**cfg, "n_intents": 0}, intent_vote=True)
