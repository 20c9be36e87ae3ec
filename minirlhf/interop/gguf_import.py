"""GGUF files (llama.cpp) in: metadata + tensors → our Transformer, vocabulary → HFTokenizer.

Read with the `gguf` package (pure Python). Every tensor type `gguf.quants` can dequantize
is accepted (F32, F16, BF16, Q4_0 … Q8_0, the K-quants, …) and becomes fp32: a quantized
file gives the quantized model's weights exactly, not the original full-precision ones.

llama.cpp's converter permutes the rows of q and k for the `llama` architecture
(convert_hf_to_gguf.py, LlamaModel.permute): within each head the two halves that HF's
rotate-half RoPE pairs up are interleaved, because ggml rotates adjacent pairs. We undo it:
rows (h, i, s) of the file are rows (h, s, i) of the HF matrix, h the head, i < head_dim/2,
s ∈ {0, 1} the half. The `qwen2` architecture is stored unpermuted.

The tokenizer is rebuilt from the file's metadata: a byte-level BPE (`tokenizer.ggml.model`
= "gpt2") from tokenizer.ggml.tokens/merges, with the pre-tokenizer that
`tokenizer.ggml.pre` names (the regexes llama.cpp's llama-vocab.cpp uses, which are those
of the original tokenizer.json); control tokens become special added tokens, as in the HF
tokenizer. The chat template is tokenizer.chat_template. SentencePiece vocabularies
(`tokenizer.ggml.model` = "llama": Llama 2, Mistral, TinyLlama) and other pre-tokenizers
(llama.cpp's "default" included) are refused.

Every metadata key read is checked (type, range: `metadata llama.attention.head_count: 0
must be >= 1`), the eos token id must be in the vocabulary (another special token id out of
range is ignored with a note, as llama.cpp does), the vocabulary may not exceed the
embedding, and every weight must be finite.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model import ModelConfig, Transformer
from .hf import Fields, check_max_seq_len, check_vocab, load_state, note

SUPPORTED_ARCHS = ("llama", "qwen2")

# tokenizer.ggml.pre → (normalizer, pre-tokenizer pieces), as in the original tokenizer.json files
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZERS = {
    # name: (NFC normalizer?, split regex or None for GPT-2's built into ByteLevel, digits one by one?, ignore_merges)
    "gpt-2": (False, None, False, False),
    "smollm": (False, None, True, False),
    "llama-bpe": (False, _LLAMA3, False, True),
    "qwen2": (True, _QWEN2, False, False),
}


class _Meta:
    def __init__(self, reader, where: str):
        self.reader, self.where = reader, where

    def get(self, key, default=None):
        """The value of a metadata key: str, number, bool or a list of them (the reader's raw
        parts decoded here, as every gguf version lays them out)."""
        import gguf

        f = self.reader.fields.get(key)
        if f is None:
            return default
        string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
        try:
            if f.types[0] == array:
                if f.types[-1] == string:
                    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
                return [v for i in f.data for v in f.parts[i].tolist()]
            if f.types[0] == string:
                return bytes(f.parts[f.data[0]]).decode("utf-8")
            return f.parts[f.data[0]].tolist()[0]
        except UnicodeDecodeError:
            raise ValueError(f"{self.where}: metadata {key}: a string that is not UTF-8") from None

    def need(self, key):
        v = self.get(key)
        if v is None:
            raise ValueError(f"{self.where}: metadata {key}: missing")
        return v


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on damaged files
        raise ValueError(f"{path}: corrupt or unsupported GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def model_config_from_gguf(meta: _Meta, max_seq_len: int | None, tensor_names: set[str]) -> ModelConfig:
    """Our ModelConfig from the file's {arch}.* metadata; every key read is checked (type, range)
    and whatever we cannot represent refused: ValueError `{file}: metadata {key}: what is wrong`."""
    where = meta.where
    check_max_seq_len(max_seq_len)
    f = Fields(meta.get, where, prefix="metadata ")
    arch = f.string("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{where}: general.architecture={arch!r}: not supported ({', '.join(SUPPORTED_ARCHS)})")
    dim, heads = f.integer(f"{arch}.embedding_length"), f.integer(f"{arch}.attention.head_count")
    n_kv = meta.get(f"{arch}.attention.head_count_kv")
    if isinstance(n_kv, list):
        raise ValueError(f"{where}: {arch}.attention.head_count_kv: per-layer head counts are not supported")
    n_kv = f.integer(f"{arch}.attention.head_count_kv", heads)
    if heads % n_kv:
        raise f.error(f"{arch}.attention.head_count_kv", f"{n_kv} must divide {arch}.attention.head_count={heads}")
    if meta.get(f"{arch}.attention.key_length") is None and dim % heads:
        raise f.error(f"{arch}.attention.head_count", f"{heads} must divide {arch}.embedding_length={dim}")
    head_dim = f.integer(f"{arch}.attention.key_length", dim // heads)
    if f.integer(f"{arch}.attention.value_length", head_dim) != head_dim or head_dim % 2:
        raise ValueError(f"{where}: {arch}.attention.key_length/value_length: unsupported head size")
    rot = f.integer(f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ValueError(f"{where}: {arch}.rope.dimension_count={rot}: only full rotary embeddings (= head size "
                         f"{head_dim}) are supported")
    scaling = f.string(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{where}: {arch}.rope.scaling.type={scaling!r} / rope_freqs.weight: RoPE scaling in GGUF "
                         "files is not supported (import the Hugging Face directory instead)")
    ctx = f.integer(f"{arch}.context_length", 0, minimum=0) or None
    seq = max_seq_len or ctx
    if seq is None:
        raise f.error(f"{arch}.context_length", "missing; give max_seq_len")
    if ctx and seq > ctx:
        raise ValueError(f"{where}: {arch}.context_length={ctx}: shorter than max_seq_len={seq}")
    window = f.integer(f"{arch}.attention.sliding_window", 0, minimum=0)
    if window and window < seq:
        raise ValueError(f"{where}: {arch}.attention.sliding_window={window}: shorter than max_seq_len={seq}")
    vocab = f.integer(f"{arch}.vocab_size", 0, minimum=0) or len(meta.need("tokenizer.ggml.tokens"))
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=f.integer(f"{arch}.block_count"), n_heads=heads,
        n_kv_heads=n_kv, ffn_dim=f.integer(f"{arch}.feed_forward_length"), max_seq_len=seq,
        rope_theta=f.number(f"{arch}.rope.freq_base", 10000.0),
        norm_eps=f.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings="output.weight" not in tensor_names,
        head_dim=head_dim if head_dim != dim // heads or dim % heads else 0,
        qkv_bias="blk.0.attn_q.bias" in tensor_names)


_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def _hf_tensor_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


def _gguf_tensor_name(hf: str) -> str:
    """Inverse of _hf_tensor_name, for messages."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    _, _, i, *module, kind = hf.split(".")
    return f"blk.{i}.{next(g for g, h in _GGUF_NAMES.items() if h == '.'.join(module))}.{kind}"


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k row permutation (see the module docstring); w (n_heads·hd, ...)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(t, where: str) -> torch.Tensor:
    """One GGUF tensor as fp32, in PyTorch's (rows, cols) order (ggml lists dimensions reversed)."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        arr = gguf_dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{where}: tensor {t.name}: type {t.tensor_type.name} cannot be dequantized by the gguf "
                         "package") from None
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only


def tokenizer_from_gguf(meta: _Meta):
    """An HFTokenizer from the file's tokenizer.* metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    from .hf_tokenizer import HFTokenizer

    where = meta.where
    f = Fields(meta.get, where, prefix="metadata ")
    kind = f.string("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model={kind!r}: only byte-level BPE vocabularies ('gpt2') are "
                         "supported (SentencePiece vocabularies, 'llama', are not)")
    pre = f.string("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{where}: tokenizer.ggml.pre={pre!r}: not supported ({', '.join(PRE_TOKENIZERS)})")
    nfc, regex, digits, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = meta.need("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or any(not isinstance(t, str) for t in tokens):
        raise f.error("tokenizer.ggml.tokens", "expected a non-empty list of strings")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens):
        raise f.error("tokenizer.ggml.token_type", f"expected {len(tokens)} token types (one per token)")
    merges = meta.need("tokenizer.ggml.merges")
    if not isinstance(merges, list) or any(not isinstance(m, str) or " " not in m for m in merges):
        raise f.error("tokenizer.ggml.merges", "expected a list of strings 'left right'")
    merges = [tuple(m.split(" ", 1)) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens: duplicate tokens")
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    pieces = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is None:
        pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        pieces += [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces)
    tok.decoder = decoders.ByteLevel()
    control, user = 3, 4  # gguf.TokenType.CONTROL, USER_DEFINED
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == control, normalized=False)
                    for i in range(len(tokens)) if types[i] in (control, user)])
    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        key = f"tokenizer.ggml.{key}_token_id"
        if name == "eos_token" or meta.get(key) is not None:
            i = f.integer(key, minimum=0)
            if i >= len(tokens):
                if name == "eos_token":
                    raise f.error(key, f"{i} is out of range (the vocabulary has {len(tokens)} tokens)")
                note(f"{where}: metadata {key}={i} is out of range ({len(tokens)} tokens); ignored, as llama.cpp does")
                continue
            special[name] = tokens[i]
    template = f.string("tokenizer.chat_template") if meta.get("tokenizer.chat_template") is not None else None
    return HFTokenizer(tok, template, special,  # an empty template is refused there, as from a directory
                       add_bos=f.flag("tokenizer.ggml.add_bos_token"), where=f"{where}: metadata tokenizer.ggml",
                       template_where=f"{where}: metadata tokenizer.chat_template")


def load_gguf(path, max_seq_len: int | None = None, device="cpu"):
    """(Transformer in fp32, HFTokenizer) of a GGUF file; see the module docstring. The scalar
    head starts at zero. Raises ValueError (one line, naming the file and key or tensor) on
    anything unsupported or corrupt."""
    path = Path(path)
    reader = _open(path)
    meta = _Meta(reader, str(path))
    names = {t.name for t in reader.tensors}
    cfg = model_config_from_gguf(meta, max_seq_len, names)
    tokenizer = tokenizer_from_gguf(meta)
    arch = meta.get("general.architecture")
    check_vocab(tokenizer, cfg, f"{path}: metadata tokenizer.ggml.tokens", f"{path}: metadata {arch}.vocab_size")
    permuted = arch == "llama"
    tensors = {}
    for t in reader.tensors:
        hn = _hf_tensor_name(t.name)
        if hn is None:
            raise ValueError(f"{path}: tensor {t.name} is not part of a model we can represent")
        w = dequantize(t, str(path))
        if permuted and t.name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            w = unpermute_qk(w, cfg.n_heads if "attn_q" in t.name else cfg.n_kv_heads)
        tensors[hn] = w
    model = Transformer(cfg)
    load_state(model, tensors, where=str(path), shown=_gguf_tensor_name)
    # the original's context (the sliding window when shorter), as hf.py records it
    tokenizer.context_len = min([v for v in (meta.get(f"{arch}.context_length"),
                                             meta.get(f"{arch}.attention.sliding_window")) if v] or [None])
    if not tokenizer.own_template:
        note(f"{path}: no chat template (metadata tokenizer.chat_template); prompts are framed in our plain "
             "format 'User: ...\\nAssistant:'")
    return model.to(device).eval(), tokenizer
