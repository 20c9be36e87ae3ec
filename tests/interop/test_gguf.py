"""GGUF files written in the test with the gguf writer (as llama.cpp's converter lays them out)
import with the expected weights, logits and tokenizer."""
import json

import numpy as np
import pytest
import torch

from minirlhf.interop import load_pretrained
from minirlhf.interop.gguf_import import _Meta, tokenizer_from_gguf

from .conftest import CHATML, TEXT, build_hf_model, byte_level_tokenizer, chat_ids, hf_logits, padded_batch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes q/k in: per head, row s·hd/2 + i → row 2i + s."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for s in range(2):
            for i in range(hd // 2):
                out[h * hd + 2 * i + s] = w[h * hd + s * hd // 2 + i]
    return out


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, *mod, kind = hf.split(".")
    return f"blk.{i}.{LAYER['.'.join(mod)]}.{kind}"


def write_tokenizer_metadata(w, hf_tok, pre: str, n_vocab: int) -> None:
    rust = json.loads(hf_tok.backend_tokenizer.to_str())
    vocab = hf_tok.get_vocab()
    tokens = [None] * n_vocab
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in rust["added_tokens"] if a["special"]}
    types = [3 if i in special else 5 if tokens[i] is None else 1 for i in range(n_vocab)]
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in rust["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                      ("unk", w.add_unk_token_id)):
        i = getattr(hf_tok, f"{name}_token_id")
        if i is not None:
            add(i)
    w.add_add_bos_token(False)
    if hf_tok.chat_template:
        w.add_chat_template(hf_tok.chat_template)


def write_gguf(path, hf_model, hf_tok, arch: str, pre: str, qtype=None) -> dict:
    """hf_model as llama.cpp would convert it (q/k permuted for arch llama); 2-D weights as
    qtype (None: F32). Returns {gguf name: the float32 array as given to the writer}."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    write_tokenizer_metadata(w, hf_tok, pre, c.vocab_size)
    written = {}
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy().copy()
        g = _gguf_name(name)
        if arch == "llama" and ".attn_q." in g:
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in g:
            a = llama_cpp_permute(a, c.num_key_value_heads)
        written[g] = a
        if qtype is not None and a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    model, tok = build_hf_model("llama-tied", d)
    return d, model, tok


@pytest.mark.parametrize("family,arch", [("llama-tied", "llama"), ("qwen2-bias", "qwen2")])
def test_unquantized_gguf_imports_with_the_same_logits(tmp_path, family, arch):
    hf_model, hf_tok = build_hf_model(family, tmp_path / "hf")
    pre = "smollm" if family == "llama-tied" else "qwen2"
    write_gguf(tmp_path / "m.gguf", hf_model, hf_tok, arch, pre)
    ours, tok = load_pretrained(tmp_path / "m.gguf", max_seq_len=64)
    assert ours.cfg.tie_embeddings == (family == "llama-tied") and ours.cfg.qkv_bias == (family == "qwen2-bias")
    tokens, mask = padded_batch(hf_model.config.vocab_size)
    with torch.no_grad():
        err = (ours(tokens, mask) - hf_logits(hf_model, tokens, mask))[mask].abs().max().item()
    assert err <= 1e-5, err
    assert tok.prompt_ids("Where is Lima?") == chat_ids(hf_tok, [{"role": "user", "content": "Where is Lima?"}])
    assert tok.eos_id == hf_tok.convert_tokens_to_ids("<|im_end|>")


def test_q_k_permutation_is_undone(smol, tmp_path):
    """Read back without undoing the permutation, q differs from HF's; with it, it is HF's exactly."""
    d, hf_model, hf_tok = smol
    written = write_gguf(tmp_path / "m.gguf", hf_model, hf_tok, "llama", "smollm")
    ours, _ = load_pretrained(tmp_path / "m.gguf")
    hf_q = hf_model.model.layers[1].self_attn.q_proj.weight.detach()
    hf_k = hf_model.model.layers[1].self_attn.k_proj.weight.detach()
    assert not np.array_equal(written["blk.1.attn_q.weight"], hf_q.numpy())
    assert torch.equal(ours.blocks[1].attn.wq.weight, hf_q)
    assert torch.equal(ours.blocks[1].attn.wk.weight, hf_k)


def _q8_0_by_hand(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q8_0 (ggml-common.h block_q8_0): blocks of 32 weights = fp16 scale d, then 32 int8 q; w = d·q."""
    blocks = raw.reshape(rows, cols // 32, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, cols)


def test_quantized_gguf_imports_the_dequantized_weights(smol, tmp_path):
    d, hf_model, hf_tok = smol
    written = write_gguf(tmp_path / "q8.gguf", hf_model, hf_tok, "llama", "smollm", qtype=Q.Q8_0)
    ours, _ = load_pretrained(tmp_path / "q8.gguf", max_seq_len=64)
    reader = gguf.GGUFReader(str(tmp_path / "q8.gguf"))
    raw = {t.name: t for t in reader.tensors}
    assert raw["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0 and raw["blk.0.attn_norm.weight"].tensor_type == Q.F32
    up = raw["blk.0.ffn_up.weight"]
    expected = _q8_0_by_hand(np.asarray(up.data), 96, 64)
    assert np.array_equal(ours.blocks[0].mlp.up.weight.detach().numpy(), expected)
    # q/k: dequantized in the file's row order, then un-permuted
    from minirlhf.interop.gguf_import import unpermute_qk

    q = raw["blk.0.attn_q.weight"]
    assert torch.equal(ours.blocks[0].attn.wq.weight, unpermute_qk(torch.from_numpy(_q8_0_by_hand(np.asarray(q.data), 64, 64)), 4))
    # 8-bit quantization error: half a step (step = max |w| / 127 per block of 32), plus the
    # rounding of the fp16 scale (relative 2^-11, times |q| <= 127)
    orig = hf_model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    step = np.abs(orig.reshape(96, 2, 32)).max(-1, keepdims=True) / 127
    assert (np.abs(expected - orig).reshape(96, 2, 32) <= step * (0.5 + 127 / 2048) + 1e-6).all()
    assert not np.array_equal(expected, orig)
    assert torch.equal(ours.blocks[0].attn_norm.weight, torch.from_numpy(written["blk.0.attn_norm.weight"]))


def test_q4_1_as_in_smollm2_is_close(smol, tmp_path):
    d, hf_model, hf_tok = smol
    write_gguf(tmp_path / "q4.gguf", hf_model, hf_tok, "llama", "smollm", qtype=Q.Q4_1)
    ours, _ = load_pretrained(tmp_path / "q4.gguf")
    orig = hf_model.model.layers[1].mlp.down_proj.weight.detach()
    got = ours.blocks[1].mlp.down.weight.detach()
    # Q4_1: 16 levels between each block's min and max
    blocks = orig.reshape(64, -1, 32)
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    assert ((got.reshape(64, -1, 32) - blocks).abs() <= step / 2 + 1e-3).all()


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_gguf_vocabulary_encodes_like_the_hf_tokenizer(tmp_path, pre):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    rust = byte_level_tokenizer(pre, specials, vocab_size=460)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="<|im_end|>",
                                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    hf_tok.chat_template = CHATML
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    write_tokenizer_metadata(w, hf_tok, pre, len(hf_tok) + 5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    tok = tokenizer_from_gguf(_Meta(reader, "t.gguf"))
    corpus = TEXT + ["Numbers 1234567 and 3.14159", "it's they'll WE'RE", "  spaces   and\n\n\nnewlines \r\n",
                     "ＦＵＬＬ width and é (e + \u0301) cafe\u0301", "<|im_end|> inside text"]
    for text in corpus:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == ids, text
        if tok.eos_id not in ids:  # (our decode stops at the end-of-turn token)
            assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    conv = [{"role": "user", "content": TEXT[2]}]
    assert tok.prompt_ids(conv) == chat_ids(hf_tok, conv)
