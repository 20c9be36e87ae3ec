"""A Llama-style decoder-only transformer with two heads on one trunk.

    tokens ─ embed ─ [RMSNorm ─ attention(RoPE, GQA) ─ + ─ RMSNorm ─ SwiGLU ─ +] × n_layers ─ RMSNorm ─┬─ lm_head  → logits (B, T, V)
                                                                                                       └─ scalar_head → one value per position (B, T)

The LM head is the policy; the scalar head is the reward model's score and the PPO
critic's value (both read it, at different positions). Every sequence in a batch may be
padded on either side: ``attention_mask`` (B, T) marks real tokens, positions are counted
over real tokens only, so a left-padded prompt sees the same positions as an unpadded one.

Weight init (GPT-2 / nanoGPT): normal(0, init_std) for every matrix, and the two
projections that write into the residual stream (attention out, MLP down) scaled by
1/sqrt(2·n_layers) so the residual's variance does not grow with depth. RMSNorm gains
start at 1; the scalar head starts at zero so a fresh reward/value reads 0.

The same module is every imported model (minirlhf/interop): Llama, Mistral and SmolLM2
are this architecture; Qwen2 adds biases to q/k/v (`qkv_bias`); some models have a head
width other than dim / n_heads (`head_dim`); Llama 3.1 stretches the RoPE frequencies
(`rope_scaling="llama3"`). Computed as in transformers, so imported logits match theirs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = _knob(1024, "vocabulary size (the tokenizer is trained to this size)")
    dim: int = _knob(128, "width of the residual stream")
    n_layers: int = _knob(4, "transformer blocks")
    n_heads: int = _knob(4, "query heads")
    n_kv_heads: int = _knob(2, "key/value heads (grouped-query attention when < n_heads)")
    ffn_dim: int = _knob(384, "hidden width of the SwiGLU MLP")
    max_seq_len: int = _knob(128, "longest sequence (prompt + response) the model sees")
    rope_theta: float = _knob(10000.0, "RoPE base frequency")
    norm_eps: float = _knob(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _knob(True, "share the token embedding with the LM head")
    init_std: float = _knob(0.02, "std of the normal init of every weight matrix")
    # fields below exist for imported models (Llama 3, Qwen2, Mistral ...); their defaults are
    # the original architecture, so configs saved before they existed load unchanged
    head_dim: int = _knob(0, "width of one attention head (0: dim / n_heads)")
    qkv_bias: bool = _knob(False, "bias on the q/k/v projections (Qwen2)")
    rope_scaling: str = _knob("none", "RoPE frequency scaling: none | llama3 (Llama 3.1)")
    rope_factor: float = _knob(8.0, "llama3 RoPE scaling: factor of the low frequencies")
    rope_low_freq_factor: float = _knob(1.0, "llama3 RoPE scaling: low_freq_factor")
    rope_high_freq_factor: float = _knob(4.0, "llama3 RoPE scaling: high_freq_factor")
    rope_original_max_len: int = _knob(8192, "llama3 RoPE scaling: original_max_position_embeddings")

    def __post_init__(self):
        """ValueError `config: model.FIELD=VALUE: why` for the first field that cannot make a model."""
        def bad(name: str, why: str):
            raise ValueError(f"config: model.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "must be a positive integer")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 0:
            bad("head_dim", "must be an integer >= 0 (0: dim / n_heads)")
        if not self.head_dim and self.dim % self.n_heads:
            bad("dim", f"must be divisible by model.n_heads={self.n_heads} (or give model.head_dim)")
        if self.n_heads % self.n_kv_heads:
            bad("n_heads", f"must be divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even for RoPE (it rotates pairs of channels)")
        if self.head_dim_ % 2:
            bad("dim", f"dim / n_heads = {self.head_dim_} (the head width) must be even for RoPE (it rotates pairs "
                       f"of channels)")
        if self.rope_scaling not in ("none", "llama3"):
            bad("rope_scaling", "must be one of none, llama3")
        if self.rope_scaling == "llama3":
            for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
                if not getattr(self, name) > 0:
                    bad(name, "must be > 0 with model.rope_scaling=llama3")
            if not self.rope_low_freq_factor < self.rope_high_freq_factor:
                bad("rope_low_freq_factor", f"must be < model.rope_high_freq_factor={self.rope_high_freq_factor!r} "
                                            f"with model.rope_scaling=llama3")

    @property
    def head_dim_(self) -> int:
        """The width of one attention head, resolved (head_dim or dim / n_heads)."""
        return self.head_dim or self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32: under bf16 autocast the mean of squares loses too much precision
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, cfg: ModelConfig | None = None) -> torch.Tensor:
    """Angular frequency of each rotated pair, (head_dim/2,) fp32: theta^(-2i/head_dim) (Su et al. 2021).

    With cfg.rope_scaling == "llama3" (Llama 3.1, Meta's reference `apply_scaling`): wavelengths
    longer than original_max_len / low_freq_factor are stretched by `factor`, those shorter than
    original_max_len / high_freq_factor are kept, and the band between interpolates linearly in
    original_max_len / wavelength between the two."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if cfg is None or cfg.rope_scaling == "none":
        return inv_freq
    ctx, lo, hi, factor = (cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                           cfg.rope_factor)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0: fully stretched, 1: kept
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > ctx / lo, inv_freq / factor, scaled)
    return torch.where(wavelen < ctx / hi, inv_freq, scaled)


def rope_tables(head_dim: int, max_pos: int, theta: float, cfg: ModelConfig | None = None):
    """cos/sin of RoPE (Su et al. 2021) for positions 0..max_pos-1, shape (max_pos, head_dim/2)."""
    inv_freq = rope_frequencies(head_dim, theta, cfg)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x (B, H, T, hd) by the angles of each position.

    cos/sin are (B, 1, T, hd/2), gathered at each token's own position, so the score
    q_i·k_j depends on i − j only (the property the tests check)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim_
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache=None, cache_pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # write this step's keys/values into the preallocated cache, attend over all so far
            cache_k, cache_v = cache
            cache_k[:, :, cache_pos:cache_pos + T] = k
            cache_v[:, :, cache_pos:cache_pos + T] = v
            k, v = cache_k[:, :, :cache_pos + T], cache_v[:, :, :cache_pos + T]
        out = grouped_attention(q, k, v, attn_mask, cached=cache is not None)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def grouped_attention(q, k, v, mask, cached: bool = False):
    """Grouped-query attention (Ainslie et al. 2023): softmax(q kᵀ/√hd + mask) v, where query
    head h reads k/v head h // G, G = n_heads / n_kv_heads.

    q (B, H, T, hd), k/v (B, Hkv, S, hd), mask (B, 1, T, S) bool (True = may attend) or None
    (causal, no padding); returns (B, H, T, hd). Reading the KV cache (cached=True), the G query
    heads of one group are stacked along the query axis, (B, Hkv, G·T, hd), so every k/v head is
    read in place: expanding k/v to H heads would copy the whole cache at every generation step,
    quadratic in the generated length. Over a whole sequence, SDPA's own grouped path
    (enable_gqa) is the faster one."""
    B, H, T, hd = q.shape
    G = H // k.size(1)
    if not cached or G == 1:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)
    q = q.reshape(B, k.size(1), G * T, hd)
    mask = mask[:, :, None].expand(-1, -1, G, -1, -1).reshape(mask.size(0), 1, G * T, mask.size(-1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, H, T, hd)


class SwiGLU(nn.Module):
    """The gated MLP of PaLM / Llama (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, attn_mask, cache=None, cache_pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, cache_pos)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.scalar_head = nn.Linear(cfg.dim, 1, bias=True)
        cos, sin = rope_tables(cfg.head_dim_, cfg.max_seq_len, cfg.rope_theta, cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self):
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = self.cfg.init_std
                if name.endswith(("attn.wo.weight", "mlp.down.weight")):
                    std /= math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
        nn.init.zeros_(self.scalar_head.weight)
        nn.init.zeros_(self.scalar_head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, tokens, attention_mask=None):
        """Final-norm hidden states (B, T, dim) of a batch padded on either side.

        attention_mask (B, T): 1 for real tokens, 0 for padding (default: all real)."""
        B, T = tokens.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        if attention_mask is None or bool(attention_mask.all()):  # no padding: plain causal attention
            positions, mask = torch.arange(T, device=tokens.device).expand(B, T), None
        else:
            attention_mask = attention_mask.bool()
            positions = positions_from_mask(attention_mask)
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = causal & attention_mask[:, None, :]
            # a padding query may see no real key at all; letting it see itself keeps SDPA finite
            mask = (mask | torch.eye(T, dtype=torch.bool, device=tokens.device))[:, None]
        cos, sin = self._rope_at(positions)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm(x)

    def forward(self, tokens, attention_mask=None, columns: slice | None = None):
        """Logits (B, T, V); with columns, (B, len(columns), V) at those positions only (the LM
        head, a large matmul for a real vocabulary, runs on them alone)."""
        h = self.hidden(tokens, attention_mask)
        return self.lm_head(h if columns is None else h[:, columns])

    def scalars(self, tokens, attention_mask=None, columns: slice | None = None):
        """The scalar head at every position (B, T), fp32 (or at `columns`): reward-model score / critic value."""
        h = self.hidden(tokens, attention_mask)
        return self.scalar_head(h if columns is None else h[:, columns]).squeeze(-1).float()

    def _rope_at(self, positions):
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    # ---- KV-cache inference: used by generate.py ----
    def new_cache(self, batch: int, length: int):
        c = self.cfg
        shape = (batch, c.n_kv_heads, length, c.head_dim_)
        dtype = self.embed.weight.dtype
        dev = self.embed.weight.device
        return [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
                for _ in self.blocks]

    def forward_cached(self, tokens, positions, key_mask, cache, cache_pos: int, last_only: bool = False):
        """Logits (B, t, V) for `tokens` (B, t) written at cache slots cache_pos.. cache_pos+t;
        with last_only, only the last token's (B, 1, V) (the LM head over a long prompt is waste).

        positions (B, t): each token's position; key_mask (B, cache_pos + t): which cache
        slots hold real tokens. Causality inside the t new tokens is enforced here."""
        B, t = tokens.shape
        total = cache_pos + t
        if total > self.cfg.max_seq_len:
            raise ValueError(f"generation reached {total} tokens, longer than model.max_seq_len={self.cfg.max_seq_len}")
        slot = torch.arange(total, device=tokens.device)
        causal = slot[None, :] <= (cache_pos + torch.arange(t, device=tokens.device))[:, None]  # (t, total)
        mask = causal[None] & key_mask.bool()[:, None, :]
        mask = mask | (slot[None, :] == (cache_pos + torch.arange(t, device=tokens.device))[:, None])[None]
        cos, sin = self._rope_at(positions)
        x = self.embed(tokens)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, cos, sin, mask[:, None], layer_cache, cache_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


def positions_from_mask(attention_mask):
    """Position of each token counted over real tokens only (0 for leading padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
