"""Hugging Face model directories in: config.json + safetensors (+ tokenizer) → our Transformer.

Architectures: Llama (incl. Llama 3.1 `llama3` RoPE scaling; SmolLM/SmolLM2 are Llama),
Mistral and Qwen2 (q/k/v bias). config.json is read in both layouts: transformers 4.x
(top-level `rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`). Whatever our model
cannot represent is refused with one line naming the field — never a silently different
model: another `rope_type`, a `hidden_act` other than SiLU, biases other than Qwen2's q/k/v,
an odd head_dim, partial rotary embeddings, a sliding window shorter than max_seq_len.

Weights: model.safetensors, or shards listed in model.safetensors.index.json. Every tensor
the model needs must be present with its exact shape (else ValueError naming file and
tensor); tensors we do not use are refused too, except RoPE caches (`rotary_emb.inv_freq`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..model import ModelConfig, Transformer

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


def _rope_settings(c: dict, where: str) -> dict:
    """rope_theta + llama3 scaling from either config.json layout, as ModelConfig fields."""
    if isinstance(c.get("rope_parameters"), dict):  # transformers 5.x
        rope = dict(c["rope_parameters"])
        field = "rope_parameters"
    else:  # transformers 4.x
        rope = dict(c.get("rope_scaling") or {})
        field = "rope_scaling"
        if "rope_theta" in c:
            rope.setdefault("rope_theta", c["rope_theta"])
    if set(rope) and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{where}: {field}: per-layer-type RoPE parameters are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))}
    if rope_type == "llama3":
        try:
            out.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                       rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_len=int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise ValueError(f"{where}: {field}.{e.args[0]}: missing (needed by rope_type 'llama3')") from None
        if rope.get("attention_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: {field}.attention_factor={rope['attention_factor']}: only 1.0 is supported")
    elif rope_type != "default":
        raise ValueError(f"{where}: {field}.rope_type={rope_type!r}: not supported (default, llama3)")
    prf = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if prf != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={prf}: only full rotary embeddings are supported")
    return out


def model_config_from_hf(c: dict, max_seq_len: int | None, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF config.json dict; max_seq_len (None: the model's
    max_position_embeddings) sizes the RoPE tables. Raises ValueError naming the field
    whatever we cannot represent exactly."""
    def need(key):
        if key not in c:
            raise ValueError(f"{where}: {key}: missing")
        return c[key]

    mt = c.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"{where}: model_type={mt!r}: not supported ({', '.join(SUPPORTED)})")
    arch = c.get("architectures") or []
    if any(not a.endswith("ForCausalLM") for a in arch):
        raise ValueError(f"{where}: architectures={arch}: only causal language models (*ForCausalLM) import")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={c['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ValueError(f"{where}: {key}=true: not supported (only Qwen2's q/k/v bias)")
    dim, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = c.get("head_dim") or dim // heads
    if head_dim % 2 or (not c.get("head_dim") and dim % heads):
        raise ValueError(f"{where}: head_dim={head_dim}: must be even (and hidden_size divisible by heads)")
    max_pos = int(c.get("max_position_embeddings", 0)) or None
    seq = int(max_seq_len or max_pos or 0)
    if seq <= 0:
        raise ValueError(f"{where}: max_position_embeddings: missing; give max_seq_len")
    if max_pos and seq > max_pos:
        raise ValueError(f"{where}: max_position_embeddings={max_pos}: shorter than max_seq_len={seq}")
    window = c.get("sliding_window")
    if mt == "qwen2":
        used = c.get("use_sliding_window", False) or "sliding_attention" in (c.get("layer_types") or [])
        window = window if used else None
    elif mt == "llama":
        window = None
    if window is not None and int(window) < seq:
        raise ValueError(f"{where}: sliding_window={window}: shorter than max_seq_len={seq} "
                         "(sliding-window attention is not supported; use max_seq_len <= the window)")
    return ModelConfig(
        vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")), n_heads=heads,
        n_kv_heads=int(c.get("num_key_value_heads") or heads), ffn_dim=int(need("intermediate_size")),
        max_seq_len=seq, norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        head_dim=head_dim if head_dim != dim // heads or dim % heads else 0,
        qkv_bias=(mt == "qwen2"), **_rope_settings(c, where))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: {e.msg}") from None


def _weight_files(d: Path) -> list[Path]:
    if (d / INDEX_FILE).is_file():
        index = _read_json(d / INDEX_FILE)
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{d / INDEX_FILE}: weight_map: missing")
        files = sorted(set(index["weight_map"].values()))
        for f in files:
            if not (d / f).is_file():
                raise ValueError(f"{d / INDEX_FILE}: weight_map: shard {f} is missing")
        return [d / f for f in files]
    if (d / SINGLE_FILE).is_file():
        return [d / SINGLE_FILE]
    raise ValueError(f"{d}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_state(model: Transformer, tensors: Mapping[str, torch.Tensor], where: str, shown=lambda name: name) -> None:
    """Copy HF-named tensors into the model; every parameter but the scalar head must be there
    with its shape. The tied LM head is the embedding. Raises ValueError naming the tensor
    (as `shown(hf_name)` calls it in the file)."""
    expected = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        hn = hf_name(name)
        if hn is not None:
            expected[hn] = p
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{where}: tensor {shown(missing[0])} is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in tensors if n not in expected and not n.endswith("rotary_emb.inv_freq")
             and not (n == "lm_head.weight" and model.cfg.tie_embeddings)]
    if extra:
        raise ValueError(f"{where}: tensor {shown(extra[0])} is not part of a {model.cfg.qkv_bias and 'Qwen2' or 'Llama'} "
                         "model we can represent")
    with torch.no_grad():
        for hn, p in expected.items():
            t = tensors[hn]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{where}: tensor {shown(hn)} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
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
    The scalar head (reward / value) starts at zero. Raises ValueError (one line, naming the
    file and field or tensor) on anything unsupported or corrupt."""
    from .hf_tokenizer import HFTokenizer

    d = Path(path)
    cfg = model_config_from_hf(_read_json(d / "config.json"), max_seq_len, where=str(d / "config.json"))
    files = _weight_files(d)
    if not (d / "tokenizer.json").is_file():
        raise ValueError(f"{d}: no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = HFTokenizer.load(d)
    model = Transformer(cfg)
    load_state(model, SafetensorsFiles(files), where=str(files[0] if len(files) == 1 else d / INDEX_FILE))
    return model.to(device).eval(), tokenizer
