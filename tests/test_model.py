"""The transformer and its KV-cache generation, checked against uncached full forwards."""
import math

import pytest
import torch
import torch.nn.functional as F

from minirlhf.generate import filter_logits, generate, left_pad
from minirlhf.model import ModelConfig, Transformer, apply_rope, rope_tables

PAD, EOS = 0, 3


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                max_seq_len=40), **kw})
    model = Transformer(cfg).eval()
    # larger init than the default so that attention patterns are far from uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def test_causality_future_token_changes_no_earlier_output():
    model = tiny()
    x = torch.randint(4, 50, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 46 + 4
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)
    sa, sb = model.scalars(x), model.scalars(y)
    assert torch.allclose(sa[:, :7], sb[:, :7], atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_equals_attention_with_repeated_kv_heads(n_kv_heads):
    """GQA with kv_heads < heads is multi-head attention whose k/v heads are shared by groups."""
    model = tiny(n_kv_heads=n_kv_heads)
    attn = model.blocks[0].attn
    B, T, H, hd = 2, 9, 4, 8
    x = torch.randn(B, T, 32)
    cos, sin = rope_tables(hd, T, 10000.0)
    cos, sin = cos[None, None], sin[None, None]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    got = attn(x, cos, sin, mask)
    # independent reference: explicit softmax attention, kv head of query head h is h // (H / n_kv)
    q = attn.wq(x).view(B, T, H, hd).transpose(1, 2)
    k = attn.wk(x).view(B, T, n_kv_heads, hd).transpose(1, 2)
    v = attn.wv(x).view(B, T, n_kv_heads, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    outs = []
    for h in range(H):
        kh = h // (H // n_kv_heads)
        s = q[:, h] @ k[:, kh].transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(~mask[0, 0], float("-inf"))
        outs.append(s.softmax(-1) @ v[:, kh])
    ref = attn.wo(torch.stack(outs, 1).transpose(1, 2).reshape(B, T, -1))
    assert torch.allclose(got, ref, atol=1e-5)
    assert sum(p.numel() for p in attn.wk.parameters()) == 32 * 8 * n_kv_heads


def test_rope_scores_depend_only_on_relative_position():
    hd = 16
    cos, sin = rope_tables(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, hd), cos[i].view(1, 1, 1, -1), sin[i].view(1, 1, 1, -1))
        kj = apply_rope(k.view(1, 1, 1, hd), cos[j].view(1, 1, 1, -1), sin[j].view(1, 1, 1, -1))
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(9, 9) == pytest.approx(score(0, 0), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_left_padding_does_not_change_outputs():
    model = tiny()
    seq = torch.randint(4, 50, (1, 10))
    padded = torch.cat([torch.full((1, 5), PAD), seq], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], 1)
    assert torch.allclose(model(seq), model(padded, mask)[:, 5:], atol=1e-5)


def _full_forward_logprobs(model, gen, temperature):
    tokens, mask = gen.full()
    logits = model(tokens, mask).float()
    P = gen.prompt_tokens.size(1)
    # the logits at position P-1+t predict response token t
    lp = F.log_softmax(logits[:, P - 1:-1] / temperature, -1)
    return lp.gather(-1, gen.tokens[..., None]).squeeze(-1) * gen.mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_generation_equals_uncached_forward(temperature):
    model = tiny()
    prompts = [[2, 5, 6, 7, 8, 9, 10], [2, 11], [2, 12, 13, 14]]  # different lengths: left padding
    g = torch.Generator().manual_seed(1)
    gen = generate(model, prompts, max_new_tokens=15, eos_id=EOS, pad_id=PAD, temperature=temperature, generator=g)
    ref = _full_forward_logprobs(model, gen, temperature)
    assert gen.mask.any()
    assert torch.allclose(gen.logprobs, ref, atol=1e-5)
    # each response's logits step-by-step equal the full forward's logits too
    tokens, mask = gen.full()
    P = gen.prompt_tokens.size(1)
    full = model(tokens, mask)
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p + gen.tokens[b, :gen.lengths[b]].tolist()]))
        n = len(p) + int(gen.lengths[b])
        assert torch.allclose(alone[0, :n], full[b, P - len(p):P - len(p) + n], atol=1e-4)


def test_generation_is_seeded_and_deterministic():
    model = tiny()
    prompts = [[2, 5, 6], [2, 7]]
    a = generate(model, prompts, max_new_tokens=10, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompts, max_new_tokens=10, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


def test_eos_stops_each_sequence_on_its_own():
    model = tiny()
    with torch.no_grad():  # make EOS likely, so some sequences stop early and others do not
        model.lm_head.weight[EOS] *= 0
        model.lm_head.weight[EOS] += model.norm.weight.sign() * 0.05
    prompts = [[2, 4 + i] for i in range(16)]
    gen = generate(model, prompts, max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    stopped = (gen.tokens == EOS).any(1)
    assert stopped.any() and (~stopped).any()
    for b in range(16):
        n = int(gen.lengths[b])
        assert gen.mask[b, :n].all() and not gen.mask[b, n:].any()
        if stopped[b]:
            first = int((gen.tokens[b] == EOS).nonzero()[0])
            assert first == n - 1, "the response ends right after its first EOS"
            assert (gen.tokens[b, n:] == PAD).all() and (gen.logprobs[b, n:] == 0).all()
            assert not gen.truncated[b]
        else:
            assert n == 12 and gen.truncated[b]


def test_greedy_and_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # probs ≈ [.09, .67, .24, .03]: top_p 0.7 keeps tokens 1 and 2 (mass above token 2 is .67 < .7)
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    model = tiny()
    gen = generate(model, [[2, 5, 6]], max_new_tokens=5, eos_id=EOS, pad_id=PAD, temperature=0)
    tokens, mask = gen.full()
    logits = model(tokens, mask)
    assert torch.equal(logits[0, 2:2 + int(gen.lengths[0])].argmax(-1), gen.tokens[0, :int(gen.lengths[0])])


def test_left_pad_and_bad_input():
    t, m = left_pad([[1, 2, 3], [4]], PAD)
    assert t.tolist() == [[1, 2, 3], [0, 0, 4]] and m.tolist() == [[True] * 3, [False, False, True]]
    with pytest.raises(ValueError):
        left_pad([[1], []], PAD)
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 41, dtype=torch.long))


def test_configs_saved_before_the_interop_fields_still_load():
    """config.json of an existing checkpoint has none of the new fields: defaults = the old model."""
    old = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=40,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, init_std=0.02)
    cfg = ModelConfig(**old)
    assert cfg.head_dim_ == 8 and not cfg.qkv_bias and cfg.rope_scaling == "none"
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert all(not n.endswith(".bias") or n.startswith("scalar_head") for n, _ in model.named_parameters())
    cos, _ = rope_tables(8, 40, 10000.0)
    assert torch.equal(model.rope_cos, cos)


def test_llama3_rope_frequencies_match_the_reference_formula():
    """Hand-written loop of Meta's `apply_scaling` (llama-models, Llama 3.1) as the reference."""
    from minirlhf.model import rope_frequencies

    cfg = ModelConfig(dim=64, n_heads=2, n_kv_heads=1, rope_scaling="llama3", rope_factor=8.0,
                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=64)
    got = rope_frequencies(32, 500000.0, cfg)
    ref = []
    for i in range(16):
        f = 1.0 / 500000.0 ** (2 * i / 32)
        wavelen = 2 * math.pi / f
        if wavelen < 64 / 4.0:
            ref.append(f)
        elif wavelen > 64 / 1.0:
            ref.append(f / 8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            ref.append((1 - smooth) * f / 8.0 + smooth * f)
    assert torch.allclose(got, torch.tensor(ref), rtol=1e-6)
    plain = rope_frequencies(32, 500000.0)
    kinds = {(g / p).item() for g, p in zip(got, plain)}
    assert min(kinds) == pytest.approx(1 / 8) and max(kinds) == pytest.approx(1.0) and len(kinds) > 2


def test_qkv_bias_and_explicit_head_dim():
    model = tiny(qkv_bias=True, head_dim=12)
    attn = model.blocks[0].attn
    assert attn.wq.weight.shape == (48, 32) and attn.wk.bias.shape == (24,) and attn.wo.weight.shape == (32, 48)
    assert attn.wo.bias is None
    # the biases take part: changing one changes the output
    x = torch.randint(4, 50, (1, 6))
    a = model(x)
    with torch.no_grad():
        attn.wk.bias.add_(0.5)
    assert not torch.allclose(a, model(x), atol=1e-4)
    # and cached generation still equals the uncached forward
    gen = generate(model, [[2, 5, 6, 7], [2, 8]], max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gen.logprobs, _full_forward_logprobs(model, gen, 1.0), atol=1e-5)


@pytest.mark.parametrize("bad", [dict(rope_scaling="yarn"), dict(head_dim=7), dict(rope_scaling="llama3", rope_factor=0.0)])
def test_bad_model_configs(bad):
    with pytest.raises(ValueError, match="model"):
        ModelConfig(**bad)


def test_generation_reads_the_kv_cache_in_place(monkeypatch):
    """Each decoding step's attention reads k/v straight out of the preallocated cache: no
    per-step copy of the cache (expanding k/v for GQA would allocate new tensors every step)."""
    import minirlhf.model as M

    model = tiny(n_kv_heads=1)  # 4 query heads share one k/v head
    caches, seen = [], []
    real_new_cache, real_sdpa = model.new_cache, F.scaled_dot_product_attention

    def new_cache(*a):
        caches.extend(model_cache := real_new_cache(*a))
        return model_cache

    def sdpa(q, k, v, **kw):
        seen.append((k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr(), q.size(-2)))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(model, "new_cache", new_cache)
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", sdpa)
    generate(model, [[2, 5, 6], [2, 7]], max_new_tokens=5, eos_id=-1, pad_id=PAD, temperature=1.0,
             generator=torch.Generator().manual_seed(0))
    storages = {t.untyped_storage().data_ptr() for kv in caches for t in kv}
    assert len(seen) == 2 * 5  # 2 layers x (prefill + 4 decoding steps)
    assert all(k in storages and v in storages for k, v, _ in seen)


def test_sampling_by_the_inverse_cdf_matches_the_distribution():
    """generate.sample draws token i with probability probs[i] (chi-square against the exact
    counts), never a zero-probability token, and the same tokens again for the same seed."""
    from minirlhf.generate import sample

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    tokens = sample(probs, g)
    counts = torch.bincount(tokens[0::2], minlength=5).double()
    assert counts[1] == 0 and counts[4] == 0 and (tokens[1::2] == 4).all()
    expected = probs[0] * 20000
    keep = expected > 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001
    assert torch.equal(sample(probs, torch.Generator().manual_seed(0)), tokens)
