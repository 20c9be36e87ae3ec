"""Hugging Face directories → our Transformer: the same logits as transformers, the same greedy tokens."""
import json
import shutil

import pytest
import torch

from minirlhf.generate import generate
from minirlhf.interop import load_pretrained
from minirlhf.interop.hf import model_config_from_hf

from .conftest import FAMILIES, build_hf_model, hf_logits, padded_batch, to_v4_layout

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_with_left_padding(hf_dirs, family):
    d, hf_model, _ = hf_dirs[family]
    ours, _ = load_pretrained(d, max_seq_len=32)
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    ref = hf_logits(hf_model, tokens, mask)
    with torch.no_grad():
        got, scalars = ours(tokens, mask), ours.scalars(tokens, mask)
    assert got.shape == ref.shape
    err = (got - ref)[mask].abs().max().item()
    assert err <= 1e-5, err
    assert ref[mask].std() > 0.5  # logits far apart: the comparison is not between near-constants
    assert float(scalars.abs().max()) == 0.0, "the scalar head of an imported model starts at 0"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers_generate(hf_dirs, family):
    d, hf_model, hf_tok = hf_dirs[family]
    ours, tok = load_pretrained(d, max_seq_len=128)
    prompts = [tok.prompt_ids("Where is Lima?"), tok.prompt_ids("The fox eats what?")[:9], tok.prompt_ids("Hi")]
    gen = generate(ours, prompts, max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0)
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[:, width:]
    for b in range(len(prompts)):
        n = int(gen.lengths[b])
        assert gen.tokens[b, :n].tolist() == ref[b, :n].tolist()


@pytest.mark.parametrize("family", ["llama3-untied", "qwen2-bias"])
def test_transformers_4_config_layout(hf_dirs, family, tmp_path):
    d, hf_model, _ = hf_dirs[family]
    shutil.copytree(d, tmp_path / "v4")
    to_v4_layout(tmp_path / "v4")
    assert "rope_parameters" not in json.loads((tmp_path / "v4" / "config.json").read_text())
    ours, _ = load_pretrained(tmp_path / "v4", max_seq_len=32)
    new, _ = load_pretrained(d, max_seq_len=32)
    assert ours.cfg == new.cfg
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        assert (ours(tokens, mask) - hf_logits(hf_model, tokens, mask))[mask].abs().max() <= 1e-5


def test_llama3_rope_scaling_is_applied(hf_dirs):
    """Dropping the llama3 scaling changes the logits: the parity above depends on it."""
    d, hf_model, _ = hf_dirs["llama3-untied"]
    ours, _ = load_pretrained(d, max_seq_len=32)
    assert ours.cfg.rope_scaling == "llama3"
    import dataclasses

    from minirlhf.model import Transformer

    plain = Transformer(dataclasses.replace(ours.cfg, rope_scaling="none")).eval()
    plain.load_state_dict(ours.state_dict())
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        assert (plain(tokens, mask) - ours(tokens, mask))[mask].abs().max() > 1e-3


def test_sharded_checkpoint(tmp_path):
    hf_model, _ = build_hf_model("qwen2-bias", tmp_path, seed=3)
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours, _ = load_pretrained(tmp_path, max_seq_len=32)
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        assert (ours(tokens, mask) - hf_logits(hf_model, tokens, mask))[mask].abs().max() <= 1e-5


def test_max_seq_len_sizes_the_rope_tables(hf_dirs):
    d, *_ = hf_dirs["llama-tied"]
    ours, _ = load_pretrained(d, max_seq_len=24)
    assert ours.cfg.max_seq_len == 24 and ours.rope_cos.shape[0] == 24
    default, _ = load_pretrained(d)
    assert default.cfg.max_seq_len == 128  # the model's max_position_embeddings


def test_head_dim_other_than_dim_over_heads(tmp_path):
    hf_model, _ = build_hf_model("llama-tied", tmp_path, head_dim=24)
    ours, _ = load_pretrained(tmp_path, max_seq_len=32)
    assert ours.cfg.head_dim_ == 24 and ours.blocks[0].attn.wq.weight.shape == (96, 64)
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        assert (ours(tokens, mask) - hf_logits(hf_model, tokens, mask))[mask].abs().max() <= 1e-5


def test_config_mapping_of_each_family(hf_dirs):
    expect = {"llama-tied": dict(tie_embeddings=True, qkv_bias=False, rope_scaling="none"),
              "llama3-untied": dict(tie_embeddings=False, qkv_bias=False, rope_scaling="llama3", rope_factor=8.0,
                                    rope_original_max_len=16, rope_theta=500000.0),
              "qwen2-bias": dict(tie_embeddings=False, qkv_bias=True),
              "mistral": dict(tie_embeddings=False, qkv_bias=False)}
    for family, fields in expect.items():
        d, hf_model, _ = hf_dirs[family]
        cfg = model_config_from_hf(json.loads((d / "config.json").read_text()), 48)
        assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.max_seq_len) == (64, 2, 4, 2, 96, 48)
        assert cfg.vocab_size == hf_model.config.vocab_size
        for k, v in fields.items():
            assert getattr(cfg, k) == v, (family, k)
