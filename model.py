"""
A small decoder-only transformer, written out by hand.

    x = embed(tokens)
    for each block:  x = x + attn(rmsnorm(x));  x = x + mlp(rmsnorm(x))   (no mlp: ffn="none")
    logits = rmsnorm(x) @ embed.T            (tied input/output embeddings)

Positions come from rotary embeddings (RoPE, Su et al. 2021) applied to queries
and keys, so there is no learned position table and the cache stores rotated keys.
Normalisation is RMSNorm (Zhang & Sennrich 2019), pre-norm as in GPT-2/LLaMA.

Presets (parameter counts at the default vocab of 4096, printed on creation):
    tiny  ~1.3M   4 layers, d=128   tests and the CPU demo (minutes)
    small ~5.0M   6 layers, d=256   the laptop model (tens of minutes)
    26m   ~25.2M  8 layers, d=512   the reference size (GPU, or hours on CPU)

Architecture switches (GPTConfig; the defaults are the original model, so old
checkpoints load unchanged and give the same logits):
    ffn="gelu"|"swiglu"|"none"  the MLP sub-block: GELU (GPT-2), gated SwiGLU
                                (Shazeer 2020) at equal parameters, or none at all
    n_kv_head=k                 grouped-query attention (Ainslie et al. 2023): k
                                key/value heads shared by the query heads; the KV
                                cache shrinks by n_head/k
    qk_norm=True                RMSNorm on each head's queries and keys before RoPE
                                (Dehghani et al. 2023; OLMo 2)

Also here: a KV cache for generation, and the one checkpoint save/load helper.
"""

import hashlib
import math
import os
from dataclasses import dataclass, asdict, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 4096    # read from the data dir's meta.json, never guessed
    block_size: int = 512     # longest sequence (prompt + answer) the model sees
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads; head size = n_embd // n_head
    n_embd: int = 128         # residual stream width
    n_hidden: int = 512       # MLP hidden width
    dropout: float = 0.0      # dropout on attention weights and residual branches
    rope_theta: float = 10000.0  # RoPE base frequency
    attn_impl: str = "sdpa"   # "sdpa" (fused kernel) or "explicit" (written out below)
    smear_keys: bool = False  # mix each key with the previous position's (see CausalSelfAttention)
    # Architecture switches for A/B runs. New fields must default to the old
    # behaviour: checkpoints store this dict, and one written before a field
    # existed is loaded with the field's default (config_from_dict).
    ffn: str = "gelu"         # MLP sub-block: "gelu", "swiglu" (hidden width 2/3 n_hidden) or "none"
    n_kv_head: int = 0        # key/value heads for grouped-query attention; 0 = n_head (plain)
    qk_norm: bool = False     # RMSNorm on each head's queries and keys before RoPE
    prefix_lm: bool = False   # prompt blocks (catalogue, request) read both ways; the answer stays causal
    copy_head: bool = False   # pointer-generator output: copy a token from the prompt or generate one
    n_tags: int = 0           # aux tagger: each request token's tag (which argument's value it is in)
    n_intents: int = 0        # aux intent head: the first tool, read at the last prompt token
    intent_vote: bool = False  # ... or at every request token, their log-probabilities averaged
    pointer_heads: bool = False  # aux heads for a catalogue in the prompt: point at the tool's / argument's name

    def __post_init__(self):
        # refuse bad combinations here, with the reason, rather than as a shape
        # error deep inside the first forward pass
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"unknown ffn {self.ffn!r}; choose from {', '.join(FFN_KINDS)}")
        if self.attn_impl not in ("sdpa", "explicit"):
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; choose sdpa or explicit")
        if self.intent_vote and not (self.n_intents and self.prefix_lm and not self.pointer_heads):
            raise ValueError("intent_vote needs a compiled model's intent head (--tagger) read both ways (--prefix_lm)")
        if self.n_head < 1 or self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd/n_head = {self.n_embd // self.n_head} must be even for RoPE")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}); "
                             "0 means one key/value head per query head")

    @property
    def kv_heads(self):
        """Key/value heads actually used (n_kv_head, with 0 meaning n_head)."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self):
        """Hidden width of the MLP actually built. SwiGLU has three matrices to
        GELU's two, so it gets 2/3 of n_hidden (rounded to a multiple of 8, which
        GPU matmuls like) to keep parameters and FLOPs equal, as Shazeer 2020 and
        LLaMA do; n_hidden stays the GELU-equivalent width, comparable across runs."""
        if self.ffn == "swiglu":
            return max(8, 8 * round(2 * self.n_hidden / 3 / 8))
        return self.n_hidden if self.ffn == "gelu" else 0


FFN_KINDS = ("gelu", "swiglu", "none")


# Every preset smears its keys: on our data it is what lets a small model learn
# to copy argument values within minutes (README, "Smeared keys").
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, n_hidden=512, block_size=512, smear_keys=True),
    "small": dict(n_layer=6, n_head=4, n_embd=256, n_hidden=768, block_size=512, smear_keys=True),
    "26m": dict(n_layer=8, n_head=8, n_embd=512, n_hidden=1792, block_size=1024, smear_keys=True),
}


def config_from_preset(preset, **overrides):
    """Preset values, then any override that is not None."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    kw = dict(PRESETS[preset])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**kw)


def config_from_dict(d):
    """GPTConfig from a stored dict (checkpoint or export). Fields the dict lacks
    take their defaults, which are the behaviour of the code that wrote it; keys
    this code does not know are ignored."""
    known = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in d.items() if k in known})


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    """x / rms(x) * weight; no mean subtraction and no bias, cheaper than LayerNorm."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # compute the statistic in float32 even under bf16/fp16 autocast
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta):
    """cos/sin tables of shape (max_len, head_dim/2) for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)            # (T, hs/2): angle for position t, pair i
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    """Rotate each (even, odd) pair of x's last dim by its position's angle.
    x: (B, nh, T, hs); cos, sin: (T, hs/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return torch.stack((y1, y2), dim=-1).flatten(-2).type_as(x)


class Layout(NamedTuple):
    """How the tokens of a packed training row relate (train.py --share_prefix):
    one tool prefix followed by several requests, each of which sees the prefix
    and itself but not the others, at the positions it would have alone.
        pos   (B, T) long   RoPE position of each token
        mask  (B, 1, T, T)  bool, True where query t may attend to key s
        prev  (B, T) long   index of the token before t in its own sequence (-1: none)
    """
    pos: torch.Tensor
    mask: torch.Tensor
    prev: torch.Tensor


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to
    max_len so decoding appends in place. pos = number of cached positions.
    Only the key/value heads are stored: with grouped-query attention that is
    n_kv_head of them, and the cache is n_head/n_kv_head times smaller."""

    def __init__(self, config, batch_size, max_len, device, dtype=torch.float32):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # the last position's key before smearing, per layer (for smear_keys)
        self.last_k = torch.zeros(shape[:3] + (hs,), device=device, dtype=dtype)
        # a copy head's sources (batch 1): the copy keys and token ids of the
        # prompt positions, n_src of them (see GPT.decode)
        self.src_keys = torch.zeros(max_len, config.n_embd, device=device, dtype=dtype) if config.copy_head else None
        self.src_ids = torch.zeros(max_len, dtype=torch.long, device=device)
        self.n_src = 0
        self.catalogue_h = None    # pointer heads: the hidden states of the catalogue block
        self.max_len = max_len
        self.pos = 0

    def rewind(self, pos, last_k, n_src):
        """Back to an earlier point of the sequence: what came after is overwritten
        as the sequence continues."""
        self.pos, self.n_src = pos, n_src
        self.last_k.copy_(last_k)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.last_k))

    def append(self, layer, k, v):
        """Store a chunk's keys/values (B, nkv, T, hs) after the cached ones ->
        all keys and values so far (B, nkv, pos+T, hs). pos moves on in GPT.hidden,
        once every layer has appended."""
        B, T = k.size(0), k.size(2)
        self.k[layer, :B, :, self.pos:self.pos + T] = k
        self.v[layer, :B, :, self.pos:self.pos + T] = v
        return self.k[layer, :B, :, :self.pos + T], self.v[layer, :B, :, :self.pos + T]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        # Grouped-query attention (Ainslie et al. 2023, "GQA"): only n_kv_head
        # key/value heads, each shared by n_head/n_kv_head consecutive query heads.
        # The point is decoding: every new token reads the whole KV cache, and the
        # cache (and that memory traffic) shrinks by n_head/n_kv_head.
        # With n_kv_head = n_head this is one (C, 3C) matrix, as before, so the
        # weights of older checkpoints keep their meaning.
        self.kv_dim = self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_dim, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        # QK-norm (Dehghani et al. 2023, ViT-22B; OLMo 2 uses RMSNorm): normalise
        # each head's query and key. Dehghani et al. saw training diverge as
        # attention logits grew without bound; with unit-RMS q and k they can only
        # grow through the learned gains, which tolerates larger learning rates.
        # One learned gain per head dimension, shared by all heads, as in Qwen3.
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        # Smeared keys (Olsson et al. 2022, "In-context learning and induction
        # heads"): key_t = (1 - s) * key_t + s * key_{t-1}, with a learned s per
        # head. A key then also says which token came before it, which is what an
        # induction (copy) head looks for; a plain transformer must first learn a
        # previous-token head in an earlier layer to get that, and small models sit
        # on a long loss plateau until it does. With GQA the gate is per key head.
        self.smear = nn.Parameter(torch.zeros(self.n_kv_head)) if config.smear_keys else None

    def forward(self, x, cos, sin, cache=None, layer=0, layout=None, mask=None):
        """x: (B, T, C) -> (B, T, C). mask: which keys each query sees (see
        attention_mask; None: plain causal from position 0)."""
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([C, self.kv_dim, self.kv_dim], dim=2)
        # (B, T, nh*hs) -> (B, nh, T, hs); keys and values have nkv heads
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, nkv, hs).transpose(1, 2)     # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)     # (B, nkv, T, hs)
        if self.q_norm is not None:
            # before smearing, so the cache's last_k and the smear mix normalised
            # keys, and before RoPE, which is a rotation and keeps the norm
            q, k = self.q_norm(q), self.k_norm(k)
        if self.smear is not None:
            k = self.smeared(k, cache, layer, layout)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # append this chunk's keys/values, then attend over everything cached
            k, v = cache.append(layer, k, v)          # (B, nkv, start+T, hs)
        p = self.dropout if self.training else 0.0

        if self.attn_impl == "explicit":
            if nkv != nh:
                # give each query head its group's key/value head: kv head j serves
                # query heads j*g .. j*g+g-1 (g = nh/nkv), hence repeat_interleave
                k = k.repeat_interleave(nh // nkv, dim=1)   # (B, nh, S, hs)
                v = v.repeat_interleave(nh // nkv, dim=1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, S)
            if mask is None:   # query i sits at position i and may see keys 0..i
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att.float(), dim=-1).type_as(q)
            att = F.dropout(att, p=p, training=self.training)
            y = att @ v                                  # (B, nh, T, hs)
        else:
            # the fused kernel; enable_gqa does the same head grouping as the
            # repeat_interleave above (a test checks the two paths agree)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None,
                                               enable_gqa=nkv != nh)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return F.dropout(self.proj(y), p=p, training=self.training)

    def smeared(self, k, cache, layer, layout):
        """key_t -> (1 - s) * key_t + s * key_{t-1}, s = sigmoid(gate) per key head.
        The previous key comes from the row itself, from the cache (decoding
        continues a sequence: the cached last raw key), or from layout.prev
        (packed rows, where the previous token of a sequence is given per position)."""
        B, nkv, T, hs = k.shape
        if layout is not None:
            prev_idx = layout.prev[:, None, :, None]                   # (B, 1, T, 1), -1: none
            k_prev = k.gather(2, prev_idx.clamp(min=0).expand(B, nkv, T, hs))
            k_prev = k_prev * (prev_idx >= 0).to(k.dtype)
        else:
            prev = torch.zeros_like(k[:, :, :1]) if cache is None or cache.pos == 0 \
                else cache.last_k[layer, :B, :, None].clone().to(k.dtype)
            if cache is not None:
                cache.last_k[layer, :B] = k[:, :, -1]
            k_prev = torch.cat([prev, k[:, :, :-1]], dim=2)        # key of position t-1
        s = torch.sigmoid(self.smear).view(1, -1, 1, 1)             # (1, nkv, 1, 1)
        return (1 - s) * k + s * k_prev


def attention_mask(T, start=0, layout=None, seg=None, device=None):
    """Which keys each of T queries may see, as a bool mask (True: may attend), or
    None for a plain causal sequence from position 0 (the fused kernel's is_causal).
    The queries sit at positions start..start+T-1, after `start` cached keys.
        causal      query i sees keys 0..start+i
        layout      packed rows bring their own (B, 1, T, T) mask
        seg (B, T)  prefix LM: tokens of the same prompt block (seg > 0: 1 the
                    catalogue, 2 the request) also see each other both ways, the
                    answer (seg 0) stays causal; cached keys are all seen.
    -> None, (T, start+T) or (B, 1, T, start+T)."""
    if layout is not None:
        return layout.mask
    if seg is None:
        if start == 0:
            return None
        return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    same_block = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)     # (B, T, T)
    mask = causal | same_block
    if start:
        mask = torch.cat([torch.ones(seg.size(0), T, start, dtype=torch.bool, device=device), mask], dim=2)
    return mask[:, None]                                                          # (B, 1, T, start+T)


class PointerHeads(nn.Module):
    """Intent and slot classification for a catalogue read from the prompt: the
    classes are positions in it. intent(h, keys): from the last prompt token, scores
    over positions, trained to point at the called tool's name (or at <|tools|>
    for no call); arg(h, keys): from each request token, scores trained to point at
    the name of the argument whose value the token is in."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.q_intent, self.k_intent = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.q_arg, self.k_arg = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)

    def intent(self, h, keys_h):
        return self.q_intent(h) @ self.k_intent(keys_h).transpose(-2, -1) / math.sqrt(h.size(-1))

    def arg(self, h, keys_h):
        return self.q_arg(h) @ self.k_arg(keys_h).transpose(-2, -1) / math.sqrt(h.size(-1))


class CopyHead(nn.Module):
    """Pointer-generator output (Vinyals et al. 2015; See et al. 2017): the next
    token is either generated from the vocabulary or copied from the prompt.
        copy(w) = sum of attention a_j over the prompt positions j holding token w,
                  a = softmax over prompt positions of (W_q h_t) . (W_k h_j) / sqrt(C)
        p(w)    = g * softmax(logits)(w) + (1 - g) * copy(w),   g = sigmoid(w_g . h_t + b)
    An argument value is then "point at the request" instead of "find these
    words in a vocabulary of thousands", which is what a small model gets wrong
    most (garbled copies, the first token of a value)."""

    def __init__(self, config):
        super().__init__()
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.gate = nn.Linear(config.n_embd, 1)

    def scores(self, h, keys):
        """Queries from h (..., T, C) against keys (..., S, C) made by self.k ->
        (..., T, S) attention scores."""
        return self.q(h) @ keys.transpose(-2, -1) / math.sqrt(h.size(-1))

    def mix(self, logits, h, scores, src_ids, valid):
        """logits (N, V) of the vocabulary head at N positions with hidden states h
        (N, C); scores (N, S) over S source positions holding tokens src_ids (N, S),
        valid (N, S) marking the real sources -> log p (N, V), float32."""
        attn = F.softmax(scores.float().masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
        copy = torch.zeros_like(logits, dtype=torch.float32).scatter_add_(1, src_ids, attn)
        g = self.gate(h).float()                                   # (N, 1), a logit
        return torch.logaddexp(F.logsigmoid(g) + F.log_softmax(logits.float(), dim=-1),
                               F.logsigmoid(-g) + torch.log(copy + 1e-9))


class MLP(nn.Module):
    """GPT-2's MLP: proj(gelu(fc x)), hidden width n_hidden."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x):
        x = self.proj(F.gelu(self.fc(x)))                # (B, T, C) -> (B, T, H) -> (B, T, C)
        return F.dropout(x, p=self.dropout, training=self.training)


class SwiGLU(nn.Module):
    """Gated MLP (Shazeer 2020, "GLU Variants Improve Transformer"), as in LLaMA:
    proj(silu(gate x) * (up x)). The gate lets each hidden unit switch its own
    linear feature on and off; at equal parameters it beat GELU in that paper.
    Hidden width is config.ffn_hidden = 2/3 n_hidden, so 3*C*H' ~= GELU's 2*C*H."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)   # W1
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)     # W3
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)   # W2
        self.dropout = config.dropout

    def forward(self, x):
        x = self.proj(F.silu(self.gate(x)) * self.up(x))  # (B, T, C) -> (B, T, H') -> (B, T, C)
        return F.dropout(x, p=self.dropout, training=self.training)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        # ffn="none": attention-only blocks. The MLP holds 60-67% of a block's
        # parameters in the presets, while much of our task is copying spans from
        # the prompt, which is attention's job: the A/B asks what the MLP buys.
        if config.ffn == "none":
            self.norm2 = self.mlp = None
        else:
            self.norm2 = RMSNorm(config.n_embd)
            self.mlp = MLP(config) if config.ffn == "gelu" else SwiGLU(config)

    def forward(self, x, cos, sin, cache=None, layer=0, layout=None, mask=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache, layer, layout, mask)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd)
        self.copy = CopyHead(config) if config.copy_head else None
        # Aux heads on the prompt (a classic intent/slot tagger, as JointBERT has):
        # trained beside the answer, they give every request token a signal of its
        # own, and a compiled router drafts a whole answer from them (sample.py)
        self.tagger = nn.Linear(config.n_embd, config.n_tags) if config.n_tags else None
        self.intent = nn.Linear(config.n_embd, config.n_intents) if config.n_intents else None
        # With the catalogue in the prompt the classes are read from it: the intent
        # points at the called tool's name, each tagged request token at its
        # argument's name (scores over prompt positions, as the copy head's)
        self.point = PointerHeads(config) if config.pointer_heads else None
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        # buffers, not parameters: they move with .to(device) but are not trained or saved
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        """All initialisation in one place: N(0, 0.02) everywhere, with the output
        projections of each residual branch scaled down by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth (GPT-2)."""
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02
                if name.endswith("proj.weight"):
                    std /= math.sqrt(2 * self.config.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, cache=None, layout=None, sel=None, seg=None, aux=False):
        """idx: (B, T) token ids -> logits (B, T, vocab) in float32.
        With a cache, idx continues the cached sequence at position cache.pos.
        sel: (B, T) bool -> logits of the selected positions only, (N, vocab):
        training needs the answer positions alone, and the vocabulary projection
        is a third of a tiny model's compute. seg (B, T): the prompt blocks (see
        attention_mask; 0 for answer tokens), for prefix_lm and copy_head.
        With copy_head the "logits" are log-probabilities (a mixture has no
        logits); softmax and cross-entropy treat them the same.
        aux=True -> (that, tag logits (B, T, n_tags), intent logits (B, T, n_intents)
        or, with pointer heads, intent and argument pointer scores (B, T, T) over
        positions, None for a head the model does not have)."""
        h = self.hidden(idx, cache, layout, seg)       # (B, T, C)
        out = self._scores(h, idx, sel, seg)
        if not aux:
            return out
        tags = self.tagger(h) if self.tagger is not None else None
        if self.point is not None:                     # (B, T, T): every position over every position
            return out, tags, self.point.intent(h, h), self.point.arg(h, h)
        return out, tags, self.intent(h) if self.intent is not None else None, None

    def _scores(self, h, idx, sel, seg):
        """Final hidden states -> the output scores (see forward)."""
        if self.copy is None:
            return self.head(h if sel is None else h[sel])
        if seg is None:
            raise ValueError("a copy head needs seg: which positions are the prompt it copies from")
        # every position may copy from the prompt positions of its own row
        keys = self.copy.k(h)                                    # (B, T, C)
        scores = self.copy.scores(h, keys)                       # (B, T, T)
        B, T = idx.shape
        src_ids = idx[:, None, :].expand(B, T, T)
        valid = (seg > 0)[:, None, :].expand(B, T, T)
        if sel is not None:
            h, scores, src_ids, valid = h[sel], scores[sel], src_ids[sel], valid[sel]
        else:
            h, scores, src_ids, valid = (t.reshape(B * T, *t.shape[2:]) for t in (h, scores, src_ids, valid))
        out = self.copy.mix(self.head(h), h, scores, src_ids, valid)
        return out if sel is not None else out.view(B, T, -1)

    def head(self, h):
        """Final hidden states (..., C) -> logits (..., vocab), float32 before any
        softmax or loss."""
        return F.linear(h, self.embed.weight).float()   # tied with the input embedding

    def decode(self, idx, cache, prompt=0, first=-1, aux=False):
        """Continue the cached sequence (batch 1) with idx (1, T) -> scores of the
        last position (V), or of positions first.. (T - first, V); float32 logits,
        or log-probabilities with a copy head.
        prompt: 0 for answer tokens; 1 (the catalogue, up to <|user|>) or 2 (the
        request) for a prompt block, which a prefix LM reads both ways and a copy
        head copies from. Training's seg gives the same blocks (a test checks).
        aux=True -> (that, tag logits of every position (T, n_tags), intent logits
        of the last position (n_intents), None; with intent_vote the mean of every
        position's intent log-probabilities and those (T, n_intents)); with pointer heads the last two
        are the intent's and each position's argument pointer scores over the
        catalogue block ((n_catalogue), (T, n_catalogue)); None for a head the model lacks."""
        T = idx.size(1)
        seg = torch.full_like(idx, prompt) if prompt else None
        h = self.hidden(idx, cache, seg=seg)[0]                      # (T, C)
        if self.point is not None and prompt == 1:     # the catalogue: what the pointers point at
            cache.catalogue_h = h
        heads = None
        if aux:
            tags = self.tagger(h) if self.tagger is not None else None
            if self.point is not None:
                cat = cache.catalogue_h                  # (n_catalogue, C)
                heads = (tags, self.point.intent(h[-1:], cat)[0], self.point.arg(h, cat))
            else:
                heads = (tags, *(self.intent_of(h, prompt) if self.intent is not None else (None, None)))
        if self.copy is not None and prompt:
            n = cache.n_src
            cache.src_keys[n:n + T] = self.copy.k(h)
            cache.src_ids[n:n + T] = idx[0]
            cache.n_src = n + T
        h = h[-1:] if first == -1 else h[first:]
        if self.copy is None:
            out = self.head(h)
        else:
            keys, ids = cache.src_keys[:cache.n_src], cache.src_ids[:cache.n_src]
            out = self.copy.mix(self.head(h), h, self.copy.scores(h, keys), ids.expand(len(h), -1),
                                torch.ones(len(h), cache.n_src, dtype=torch.bool, device=h.device))
        out = out[0] if first == -1 else out
        return (out, *heads) if aux else out

    def intent_of(self, h, prompt):
        """The intent head's scores of a request block's hidden states h (T, C) ->
        (those of its last token, None); or with intent_vote (the mean of every
        token's log-probabilities (each token has read the whole request, prefix
        LM), each token's (T, n_intents): at a tagged word, the tool of the call
        its value is in)."""
        if self.config.intent_vote and prompt == 2:
            each = F.log_softmax(self.intent(h).float(), -1)
            return each.mean(0), each
        return self.intent(h[-1]), None

    def hidden(self, idx, cache=None, layout=None, seg=None):
        """idx: (B, T) -> final normalised hidden states (B, T, C).
        layout (training on packed rows, see Layout): per-token positions,
        attention mask and previous-token index instead of one plain sequence.
        seg (B, T): prompt blocks, read both ways if the model is a prefix LM."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if layout is not None:
            cos = self.rope_cos[layout.pos].unsqueeze(1)   # (B, 1, T, hs/2)
            sin = self.rope_sin[layout.pos].unsqueeze(1)
        else:
            cos = self.rope_cos[start:start + T]
            sin = self.rope_sin[start:start + T]
        mask = attention_mask(T, start, layout, seg if self.config.prefix_lm else None, idx.device)
        x = self.embed(idx)                           # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, layout, mask)
        if cache is not None:
            cache.pos = start + T
        return self.norm(x)


# -----------------------------------------------------------------------------
# checkpoints

class CheckpointError(RuntimeError):
    """A checkpoint we cannot use; the message says why."""


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(ckpt, path):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu", tokenizer_sha256=None):
    """Load a checkpoint -> (model in eval mode, checkpoint dict).

    If tokenizer_sha256 is given, the checkpoint must have been trained with
    that exact tokenizer: token ids mean nothing under a different one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a nanotool checkpoint (no model / model_config)")
    if tokenizer_sha256 is not None:
        check_tokenizer(ckpt, tokenizer_sha256, path)
    model = GPT(config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, ckpt


def check_tokenizer(ckpt, tokenizer_sha256, path="checkpoint"):
    """Token ids mean nothing under a different tokenizer: refuse the mismatch."""
    if ckpt.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointError(
            f"{path}: trained with a different tokenizer than the one given "
            f"(checkpoint {str(ckpt.get('tokenizer_sha256'))[:12]}, data {tokenizer_sha256[:12]}); "
            "use the data dir it was trained on")


def config_dict(config):
    return asdict(config)
