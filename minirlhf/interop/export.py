"""`python -m minirlhf export --ckpt runs/NAME/ppo --out DIR`: a checkpoint as a Hugging Face directory.

The policy (any stage's `model.safetensors`) becomes a causal LM that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with the same logits:
LlamaForCausalLM, or Qwen2ForCausalLM when the model has q/k/v biases (an imported Qwen2).
A reward model (the `rm` stage) or the PPO critic (`--model critic`) becomes
LlamaForSequenceClassification / Qwen2ForSequenceClassification with num_labels=1: its
`score` is our scalar head's weight. HF's score layer has no bias, so our head's bias is
dropped: every score shifts by the same constant, so pairwise preferences, the
Bradley-Terry probabilities σ(r_a − r_b) and PPO advantages are unchanged. HF reads the
score at the last token that is not `pad_token_id` — our end-of-turn token for a framed
(prompt, response) — so config.json's pad_token_id is never the end-of-turn token (another
special token is chosen when the tokenizer pads with it).

Files written: config.json (transformers 4.x layout: `rope_theta`/`rope_scaling`, which 5.x
reads too), model.safetensors, generation_config.json (causal LM: generation stops on the
end-of-turn token), tokenizer.json, tokenizer_config.json, chat_template.jinja. Our
SentencePiece tokenizer is converted (sp_export.py) and checked id for id on a test corpus;
the export refuses (ValueError) rather than ship a tokenizer that encodes differently.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import Transformer
from ..tokenizer import ChatTokenizer, Tokenizer
from .hf import hf_name

HEADS = ("causal-lm", "sequence-classification")


def to_hf_tokenizer(tokenizer: ChatTokenizer, check_texts=None):
    """The HFTokenizer to write: an imported one as it is; ours converted and verified."""
    if isinstance(tokenizer, Tokenizer):
        from .sp_export import sentencepiece_to_hf, verify_same_ids

        hf = sentencepiece_to_hf(tokenizer)
        verify_same_ids(tokenizer, hf, check_texts)
        return hf
    return tokenizer


def _score_pad_id(tok) -> int:
    """A pad id HF's sequence classifier can skip without skipping the end-of-turn token."""
    for i in (tok.pad_id, getattr(tok, "doc_eos_id", None), getattr(tok, "unk_id", None), *sorted(
            getattr(tok, "_special_ids", ()))):
        if i is not None and i != tok.eos_id:
            return int(i)
    raise ValueError("export: no special token other than the end-of-turn token to pad with; "
                     "a sequence classifier needs one")


def hf_config(model: Transformer, tok, head: str) -> dict:
    """config.json of the HF model equivalent to `model` (see the module docstring)."""
    c = model.cfg
    qwen = c.qkv_bias
    kind = "Qwen2" if qwen else "Llama"
    out = {
        "architectures": [f"{kind}For{'CausalLM' if head == 'causal-lm' else 'SequenceClassification'}"],
        "model_type": kind.lower(), "vocab_size": c.vocab_size, "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim_, "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling == "none" else {
            "rope_type": "llama3", "factor": c.rope_factor, "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor, "original_max_position_embeddings": c.rope_original_max_len},
        "tie_word_embeddings": bool(c.tie_embeddings and head == "causal-lm"),
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id if head == "causal-lm" else _score_pad_id(tok),
        "torch_dtype": "float32", "initializer_range": c.init_std, "use_cache": True,
    }
    if qwen:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if head != "causal-lm":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return out


def hf_state_dict(model: Transformer, head: str) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors: the trunk, plus lm_head (untied causal LM) or score (classifier)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        hn = hf_name(name)
        if hn == "lm_head.weight" and head != "causal-lm":
            continue
        if hn is not None:
            out[hn] = p.detach().float().cpu().contiguous()
    if head != "causal-lm":
        out["score.weight"] = model.scalar_head.weight.detach().float().cpu().contiguous()
    elif model.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def export_model(model: Transformer, tokenizer: ChatTokenizer, out_dir, head: str = "causal-lm",
                 check_texts=None) -> Path:
    """Write `model` + `tokenizer` as an HF directory (see the module docstring); returns it.
    The directory is written under a temporary name and renamed when complete. Raises
    ValueError when the tokenizer cannot be exported exactly or `head` is unknown."""
    if head not in HEADS:
        raise ValueError(f"export: head={head!r}: expected one of {', '.join(HEADS)}")
    hf_tok = to_hf_tokenizer(tokenizer, check_texts)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(hf_config(model, hf_tok, head), indent=2))
    save_file(hf_state_dict(model, head), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if head == "causal-lm":
        gen = {"bos_token_id": hf_tok.bos_id, "eos_token_id": hf_tok.eos_id, "pad_token_id": hf_tok.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    hf_tok.save(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ---- the command ----
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory of any stage (e.g. runs/quick/ppo)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--model", default="model",
                   help="which model of the checkpoint: model (policy / reward model) or critic (PPO's value model)")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="causal-lm (policy) or sequence-classification (reward/value); default: "
                        "sequence-classification for the rm stage and the critic, causal-lm otherwise")


def main(args) -> int:
    from .. import checkpoint

    meta = checkpoint.read_meta(args.ckpt)
    if args.model != "model" and args.model not in meta.get("extra_models", []):
        raise ValueError(f"{args.ckpt}: --model {args.model}: not in this checkpoint "
                         f"(has: model{''.join(', ' + m for m in meta.get('extra_models', []))})")
    head = args.head or ("sequence-classification" if meta.get("stage") == "rm" or args.model == "critic"
                         else "causal-lm")
    model = checkpoint.load_model_from(args.ckpt, args.model)
    tokenizer = checkpoint.load_tokenizer(args.ckpt)
    out = export_model(model, tokenizer, args.out, head)
    kind = "AutoModelForCausalLM" if head == "causal-lm" else "AutoModelForSequenceClassification (num_labels=1)"
    print(f"[export] {args.ckpt} ({args.model}, stage {meta.get('stage')}) -> {out}: load with transformers' {kind}")
    return 0
