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


def _same_logits(d, hf_model, max_seq_len=32):
    ours, tok = load_pretrained(d, max_seq_len=max_seq_len)
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        err = (ours(tokens, mask) - hf_logits(hf_model, tokens, mask))[mask].abs().max().item()
    assert err <= 1e-5, err
    return ours, tok


def test_hidden_act_swish_is_silu(tmp_path):
    """transformers' ACT2FN maps "swish" to SiLU: the same model as "silu"."""
    hf_model, _ = build_hf_model("llama-tied", tmp_path, hidden_act="swish")
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == "swish"
    _same_logits(tmp_path, hf_model)


def test_tied_config_with_a_different_lm_head_loads_as_transformers_does(tmp_path, capsys):
    """tie_word_embeddings=true but the file holds its own lm_head.weight: transformers 5 does
    not tie (PreTrainedModel.tie_weights) and uses the file's head; so do we, with a note.
    The same head as the embedding stays tied; a file with only lm_head.weight ties the
    embedding to it."""
    from safetensors.torch import load_file, save_file

    build_hf_model("llama-tied", tmp_path)
    st = tmp_path / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(st).items()}
    assert "lm_head.weight" not in tensors
    torch.manual_seed(1)
    save_file({**tensors, "lm_head.weight": torch.randn_like(tensors["model.embed_tokens.weight"])}, st)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_model.lm_head.weight is not hf_model.model.embed_tokens.weight
    capsys.readouterr()
    ours, _ = _same_logits(tmp_path, hf_model)
    assert not ours.cfg.tie_embeddings
    assert "tie_word_embeddings=true, but lm_head.weight differs" in capsys.readouterr().err

    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, st)
    ours, _ = _same_logits(tmp_path, transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    assert ours.cfg.tie_embeddings

    head_only = {k: v for k, v in tensors.items() if k != "model.embed_tokens.weight"}
    save_file({**head_only, "lm_head.weight": tensors["model.embed_tokens.weight"] * 2}, st)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours, _ = _same_logits(tmp_path, hf_model)
    assert ours.cfg.tie_embeddings and torch.equal(ours.embed.weight, tensors["model.embed_tokens.weight"] * 2)


@pytest.mark.parametrize("max_window_layers,layer_types,ok", [
    (2, None, True),                                          # no layer slides (layers i >= 2 would)
    (1, None, False),                                         # layer 1 slides
    (0, ["full_attention", "full_attention"], True),          # layer_types decides
    (2, ["full_attention", "sliding_attention"], False),
])
def test_qwen2_sliding_window_only_where_a_layer_slides(tmp_path, capsys, max_window_layers, layer_types, ok):
    """Qwen2's use_sliding_window applies to the layers transformers makes slide (Qwen2Config:
    layer_types, else i >= max_window_layers); a window shorter than the context is refused
    only when some layer slides."""
    from minirlhf.cli import main as cli

    extra = dict(use_sliding_window=True, sliding_window=16, max_window_layers=max_window_layers)
    if layer_types:
        extra["layer_types"] = layer_types
    hf_model, _ = build_hf_model("qwen2-bias", tmp_path, **extra)
    capsys.readouterr()
    if ok:
        _same_logits(tmp_path, hf_model, max_seq_len=32)  # sequences of 20 > the window of 16
        return
    assert cli(["generate", "--init-from", str(tmp_path), "--prompt", "hi", "--max-seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sliding_window=16: shorter than max_seq_len=32 in layer 1" in err, err
    load_pretrained(tmp_path, max_seq_len=16)  # within the window: the same model


def test_a_directory_without_chat_template_says_so(hf_dirs, tmp_path, capsys):
    d, *_ = hf_dirs["llama-tied"]
    shutil.copytree(d, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").unlink()
    c = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    c.pop("chat_template", None)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(c))
    capsys.readouterr()
    _, tok = load_pretrained(tmp_path / "m", max_seq_len=32)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[import] note:" in err and "no chat template" in err, err
    assert tok.render("Hi") == "<|im_start|>User: Hi\nAssistant:"  # our plain format, with the model's bos
    load_pretrained(d, max_seq_len=32)
    assert capsys.readouterr().err == "", "no note when the model has its template"
