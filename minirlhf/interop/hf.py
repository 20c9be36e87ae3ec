"""Hugging Face model directories in: config.json + safetensors (+ tokenizer) → our Transformer.

Architectures: Llama (incl. Llama 3.1 `llama3` RoPE scaling; SmolLM/SmolLM2 are Llama),
Mistral and Qwen2 (q/k/v bias). config.json is read in both layouts: transformers 4.x
(top-level `rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`). Whatever our model
cannot represent is refused with one line naming the field — never a silently different
model: another `rope_type`, a `hidden_act` other than SiLU ("silu", or "swish", its other
name in transformers), biases other than Qwen2's q/k/v, an odd head_dim, partial rotary
embeddings, a sliding window shorter than max_seq_len in a layer that slides (as
transformers decides: Mistral's every layer; Qwen2's layers from max_window_layers on, or
as layer_types says, only with use_sliding_window), quantized weights (quantization_config:
bitsandbytes, GPTQ, AWQ, ... store packed integers and scales we do not dequantize; a GGUF
file's quantized types are). Every field read is checked first (type and range:
`config.json: num_attention_heads: 0 must be >= 1`; an integer field must be a JSON integer,
not 9.0), and so are bos/eos/pad_token_id (ids inside the vocabulary).

Weights: model.safetensors, or shards listed in model.safetensors.index.json. Every tensor
the model needs must be present with its exact shape and finite values (else ValueError
naming file and tensor); tensors we do not use are refused too, except RoPE caches
(`rotary_emb.inv_freq`). tie_word_embeddings is read as transformers 5 reads it: a file
holding a different lm_head.weight is loaded untied (with a note). The tokenizer may not
have more ids than the model's vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..model import ModelConfig, Transformer
from ..files import read_json

SUPPORTED = ("llama", "mistral", "qwen2")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"

# our parameter name ← HF name, per layer ("{i}" is the layer) and global
_LAYER_NAMES = {
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}


def hf_name(ours: str) -> str | None:
    """The HF (Llama/Mistral/Qwen2 *ForCausalLM) name of one of our parameters; None for the
    scalar head, which a causal LM does not have."""
    if ours.startswith("scalar_head."):
        return None
    if ours == "embed.weight":
        return "model.embed_tokens.weight"
    if ours == "norm.weight":
        return "model.norm.weight"
    if ours == "lm_head.weight":
        return "lm_head.weight"
    _, i, rest = ours.split(".", 2)  # blocks.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"model.layers.{i}.{_LAYER_NAMES[module]}.{kind}"


def check_max_seq_len(max_seq_len) -> None:
    """max_seq_len is None (the model's own context) or a positive integer; else ValueError."""
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 1):
        raise ValueError(f"max_seq_len={max_seq_len!r}: must be a positive integer (or None: the model's context)")


class Fields:
    """Typed reads of a config mapping (config.json, or a GGUF file's metadata): each value is
    checked where it is read, and anything wrong is one line `{where}: {prefix}{key}: what is
    wrong`. get(key) is the raw value (None when absent or null)."""

    def __init__(self, get, where: str, prefix: str = ""):
        self.get, self.where, self.prefix = get, where, prefix

    def error(self, key: str, what: str) -> ValueError:
        return ValueError(f"{self.where}: {self.prefix}{key}: {what}")

    def integer(self, key: str, default=None, minimum: int = 1):
        """An integer (not a float such as 9.0) >= minimum; default when absent (a missing key
        without default is an error)."""
        v = self.get(key)
        if v is None:
            if default is None:
                raise self.error(key, "missing")
            return default
        if isinstance(v, bool) or not isinstance(v, int):  # 9.0 too: as data files, an integer is written as one
            raise self.error(key, f"expected an integer, got {v!r}")
        if v < minimum:
            raise self.error(key, f"{v} must be >= {minimum}")
        return v

    def number(self, key: str, default=None, positive: bool = True) -> float:
        """A finite number (> 0 when positive); default when absent."""
        v = self.get(key)
        if v is None:
            if default is None:
                raise self.error(key, "missing")
            return float(default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(key, f"expected a number, got {v!r}")
        if not math.isfinite(v) or (positive and v <= 0):
            raise self.error(key, f"{v} must be a finite number{' > 0' if positive else ''}")
        return float(v)

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {v!r}")
        return v

    def string(self, key: str, default=None):
        v = self.get(key)
        if v is None:
            if default is None:
                raise self.error(key, "missing")
            return default
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {v!r}")
        return v


def _rope_settings(c: dict, where: str) -> dict:
    """rope_theta + llama3 scaling from either config.json layout, as ModelConfig fields."""
    top = Fields(c.get, where)
    if c.get("rope_parameters") is not None:  # transformers 5.x
        field = "rope_parameters"
        if not isinstance(c[field], dict):
            raise top.error(field, f"expected an object, got {c[field]!r}")
        rope = dict(c[field])
    else:  # transformers 4.x
        field = "rope_scaling"
        if c.get(field) is not None and not isinstance(c[field], dict):
            raise top.error(field, f"expected an object or null, got {c[field]!r}")
        rope = dict(c.get(field) or {})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        raise top.error(field, "per-layer-type RoPE parameters are not supported")
    f = Fields(rope.get, where, prefix=field + ".")
    rope_type = f.string("rope_type" if "rope_type" in rope else "type", "default")
    # rope_theta: in rope_parameters (5.x), else top-level (4.x)
    out = {"rope_theta": f.number("rope_theta") if rope.get("rope_theta") is not None
           else top.number("rope_theta", 10000.0)}
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if rope.get(key) is None:
                raise f.error(key, "missing (needed by rope_type 'llama3')")
        out.update(rope_scaling="llama3", rope_factor=f.number("factor"), rope_low_freq_factor=f.number("low_freq_factor"),
                   rope_high_freq_factor=f.number("high_freq_factor"),
                   rope_original_max_len=f.integer("original_max_position_embeddings"))
        if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
            raise f.error("high_freq_factor", f"{out['rope_high_freq_factor']} must be > low_freq_factor="
                          f"{out['rope_low_freq_factor']}")
        if f.number("attention_factor", 1.0) != 1.0:
            raise f.error("attention_factor", f"{rope['attention_factor']}: only 1.0 is supported")
    elif rope_type != "default":
        raise ValueError(f"{where}: {field}.rope_type={rope_type!r}: not supported (default, llama3)")
    prf = f.number("partial_rotary_factor", top.number("partial_rotary_factor", 1.0))
    if prf != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={prf}: only full rotary embeddings are supported")
    return out


def _sliding_layers(c: dict, f: Fields, model_type: str, n_layers: int) -> list[int]:
    """The layers that attend within a sliding window, as transformers reads the config: none for
    Llama; every layer for Mistral when sliding_window is set; for Qwen2 only with
    use_sliding_window, and then the layers layer_types marks "sliding_attention", or (no
    layer_types) the layers i >= max_window_layers (Qwen2Config)."""
    if model_type == "llama":
        return []
    if model_type == "mistral":
        return list(range(n_layers)) if c.get("sliding_window") is not None else []
    if not f.flag("use_sliding_window") or c.get("sliding_window") is None:
        return []
    types = c.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or \
                any(t not in ("full_attention", "sliding_attention") for t in types):
            raise f.error("layer_types", f"expected {n_layers} of 'full_attention' / 'sliding_attention'")
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    first = f.integer("max_window_layers", 28, minimum=0)  # Qwen2Config's default
    return list(range(first, n_layers))


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _check_token_ids(c: dict, f: Fields, vocab: int) -> None:
    """bos/eos/pad_token_id, when given (not null): a JSON integer, or (eos_token_id) a list of
    them, each a row of the embedding (0 <= id < vocab_size) — an id outside it is a config
    for another model (transformers would index past the embedding when it generates)."""
    for key in TOKEN_ID_FIELDS:
        v = c.get(key)
        if v is None:
            continue
        several = isinstance(v, list) and key == "eos_token_id"  # generation stops on any of them
        for name, x in ([(f"{key}[{i}]", x) for i, x in enumerate(v)] if several else [(key, v)]):
            if isinstance(x, bool) or not isinstance(x, int):
                raise f.error(name, f"expected a token id (an integer), got {x!r}")
            if not 0 <= x < vocab:
                raise f.error(name, f"{x} is outside the vocabulary (vocab_size {vocab})")


def model_config_from_hf(c: dict, max_seq_len: int | None, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF config.json dict; max_seq_len (None: the model's
    max_position_embeddings) sizes the RoPE tables. Every field we read is checked (type,
    range); raises ValueError `{where}: {field}: what is wrong`, and naming the field for
    whatever we cannot represent exactly."""
    return _read_config(c, max_seq_len, where)[0]


def _read_config(c: dict, max_seq_len: int | None, where: str) -> tuple[ModelConfig, int | None]:
    """(ModelConfig, the original's context): max_position_embeddings, or the sliding window
    when a layer slides (up to there full attention, ours, computes the same; None if unknown)."""
    if not isinstance(c, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(c).__name__}")
    check_max_seq_len(max_seq_len)
    f = Fields(c.get, where)
    mt = c.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"{where}: model_type={mt!r}: not supported ({', '.join(SUPPORTED)})")
    arch = c.get("architectures") or []
    if not isinstance(arch, list) or any(not isinstance(a, str) for a in arch):
        raise f.error("architectures", f"expected a list of class names, got {arch!r}")
    if any(not a.endswith("ForCausalLM") for a in arch):
        raise ValueError(f"{where}: architectures={arch}: only causal language models (*ForCausalLM) import")
    quant = c.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise f.error("quantization_config", f"quantized weights{f' ({method})' if isinstance(method, str) else ''} "
                      "are not supported (they are not dequantized here); give the full-precision model, or a "
                      "GGUF file (whose quantized types are)")
    act = f.string("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN: "swish" is SiLU too
        raise ValueError(f"{where}: hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if f.flag(key):
            raise ValueError(f"{where}: {key}=true: not supported (only Qwen2's q/k/v bias)")
    dim, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    kv_heads = f.integer("num_key_value_heads", heads)
    if heads % kv_heads:
        raise f.error("num_key_value_heads", f"{kv_heads} must divide num_attention_heads={heads}")
    explicit_head_dim = f.integer("head_dim", 0, minimum=0)
    if not explicit_head_dim and dim % heads:
        raise f.error("num_attention_heads", f"{heads} must divide hidden_size={dim} (or give head_dim)")
    head_dim = explicit_head_dim or dim // heads
    if head_dim % 2:
        raise ValueError(f"{where}: head_dim={head_dim}: must be even (RoPE rotates pairs)")
    n_layers = f.integer("num_hidden_layers")
    max_pos = f.integer("max_position_embeddings", 0, minimum=0) or None
    seq = max_seq_len or max_pos
    if seq is None:
        raise f.error("max_position_embeddings", "missing; give max_seq_len")
    if max_pos and seq > max_pos:
        raise ValueError(f"{where}: max_position_embeddings={max_pos}: shorter than max_seq_len={seq}")
    window = f.integer("sliding_window", 0) or None
    sliding = _sliding_layers(c, f, mt, n_layers) if window else []
    if sliding and window < seq:
        raise ValueError(f"{where}: sliding_window={window}: shorter than max_seq_len={seq} in layer "
                         f"{sliding[0]}{' and %d more' % (len(sliding) - 1) if len(sliding) > 1 else ''} "
                         "(sliding-window attention is not supported; use max_seq_len <= the window)")
    vocab = f.integer("vocab_size")
    _check_token_ids(c, f, vocab)
    cfg = ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads,
        ffn_dim=f.integer("intermediate_size"), max_seq_len=seq, norm_eps=f.number("rms_norm_eps", 1e-6),
        tie_embeddings=f.flag("tie_word_embeddings", False),
        head_dim=head_dim if head_dim != dim // heads or dim % heads else 0,
        qkv_bias=(mt == "qwen2"), **_rope_settings(c, where))
    context = min(max_pos, window) if max_pos and sliding else max_pos
    return cfg, context


def note(message: str) -> None:
    """A one-line note of the importer on stderr (not an error: the import goes on)."""
    print(f"[import] note: {message}", file=sys.stderr)


def _weight_files(d: Path) -> list[Path]:
    if (d / INDEX_FILE).is_file():
        index = read_json(d / INDEX_FILE)
        if not isinstance(index, dict):
            raise ValueError(f"{d / INDEX_FILE}: expected a JSON object with weight_map, got {type(index).__name__}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{d / INDEX_FILE}: weight_map: missing (an object tensor name -> shard file)")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v or Path(v).name != v), None)
        if bad is not None:
            raise ValueError(f"{d / INDEX_FILE}: weight_map.{bad}: expected a shard file name in this directory, "
                             f"got {weight_map[bad]!r}")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (d / f).is_file():
                raise ValueError(f"{d / INDEX_FILE}: weight_map: shard {f} is missing")
        return [d / f for f in files]
    if (d / SINGLE_FILE).is_file():
        return [d / SINGLE_FILE]
    raise ValueError(f"{d}: no {SINGLE_FILE} or {INDEX_FILE}")


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def untie_if_the_file_does(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], where: str) -> ModelConfig:
    """tie_word_embeddings=true, but the file holds both the embedding and an lm_head.weight that
    differs from it: the model is untied, with the file's head, as transformers 5 loads it
    (PreTrainedModel.tie_weights: both present and not torch.equal -> not tied; transformers
    4.x would tie and ignore the head). Said in a note line."""
    if not (cfg.tie_embeddings and EMBED in tensors and HEAD in tensors):
        return cfg
    embed, head = tensors[EMBED], tensors[HEAD]
    if embed.shape == head.shape and torch.equal(embed, head):
        return cfg
    note(f"{where}: tie_word_embeddings=true, but lm_head.weight differs from the embedding; "
         "loaded untied with the file's lm_head.weight, as transformers 5 does")
    return dataclasses.replace(cfg, tie_embeddings=False)


def check_vocab(tokenizer, cfg: ModelConfig, tokenizer_where: str, model_where: str) -> None:
    """Every token id the tokenizer can produce must have a row in the embedding."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer_where}: the tokenizer has {tokenizer.vocab_size} token ids, more than the "
                         f"model's vocabulary of {cfg.vocab_size} ({model_where})")


def load_state(model: Transformer, tensors: Mapping[str, torch.Tensor], where: str, shown=lambda name: name) -> None:
    """Copy HF-named tensors into the model; every parameter but the scalar head must be there
    with its shape, and finite. A tied LM head is the embedding (when the file has only
    lm_head.weight, the embedding is that, as transformers ties it). Raises ValueError naming
    the tensor (as `shown(hf_name)` calls it in the file)."""
    expected = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        hn = hf_name(name)
        if hn is not None:
            expected[hn] = p
    source = {hn: hn for hn in expected}
    if model.cfg.tie_embeddings and EMBED not in tensors and HEAD in tensors:
        source[EMBED] = HEAD
    missing = [n for n in expected if source[n] not in tensors]
    if missing:
        raise ValueError(f"{where}: tensor {shown(missing[0])} is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in tensors if n not in expected and not n.endswith("rotary_emb.inv_freq")
             and not (n == HEAD and model.cfg.tie_embeddings)]
    if extra:
        raise ValueError(f"{where}: tensor {shown(extra[0])} is not part of a {model.cfg.qkv_bias and 'Qwen2' or 'Llama'} "
                         "model we can represent")
    with torch.no_grad():
        for hn, p in expected.items():
            t = tensors[source[hn]]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{where}: tensor {shown(source[hn])} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
            if not torch.isfinite(p).all():
                raise ValueError(f"{where}: tensor {shown(source[hn])} holds NaN or infinite values")
        model.scalar_head.weight.zero_()
        model.scalar_head.bias.zero_()


class SafetensorsFiles(Mapping):
    """The tensors of safetensors files by name, each read from its file when asked for (so a
    model is loaded one tensor at a time, not all of them held twice). Raises ValueError
    naming the file when its header or a tensor's bytes are truncated or corrupt."""

    def __init__(self, files: list[Path]):
        self.where = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    self.where.update((k, f) for k in st.keys())
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ValueError(f"{f}: corrupt safetensors file: {str(e).splitlines()[0]}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            with safe_open(str(f), framework="pt") as st:
                return st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f}: corrupt safetensors file: tensor {name}: {str(e).splitlines()[0]}") from None

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)


def load_hf_dir(path, max_seq_len: int | None = None, device="cpu"):
    """(Transformer in fp32, HFTokenizer) of a Hugging Face model directory; see the module docstring.
    The scalar head (reward / value) starts at zero; the tokenizer records the model's own
    context (max_position_embeddings, or a shorter sliding window), which an export writes back. Raises ValueError (one
    line, naming the file and field or tensor) on anything unsupported or corrupt."""
    from .hf_tokenizer import HFTokenizer

    d = Path(path)
    cfg, context = _read_config(read_json(d / "config.json"), max_seq_len, where=str(d / "config.json"))
    files = _weight_files(d)
    if not (d / "tokenizer.json").is_file():
        raise ValueError(f"{d}: no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = HFTokenizer.load(d)
    check_vocab(tokenizer, cfg, str(d / "tokenizer.json"), f"{d / 'config.json'}: vocab_size")
    tensors = SafetensorsFiles(files)
    where = str(files[0] if len(files) == 1 else d / INDEX_FILE)
    cfg = untie_if_the_file_does(cfg, tensors, where)
    model = Transformer(cfg)
    load_state(model, tensors, where=where)
    tokenizer.context_len = context
    if not tokenizer.own_template:
        note(f"{d}: no chat template (chat_template.jinja, or chat_template in tokenizer_config.json); prompts "
             "are framed in our plain format 'User: ...\\nAssistant:'")
    return model.to(device).eval(), tokenizer
