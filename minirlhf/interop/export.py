"""`python -m minirlhf export --ckpt runs/NAME/ppo --out DIR`: a checkpoint as a Hugging Face directory.

The policy (the `model.safetensors` of any stage but `rm`) becomes a causal LM that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with the same logits:
LlamaForCausalLM, or Qwen2ForCausalLM when the model has q/k/v biases (an imported Qwen2).
An imported Mistral is written as LlamaForCausalLM: with the sliding window out of reach
(the importer refuses a window shorter than the run's context) the two compute the same.
A reward model (the `rm` stage) or the PPO critic (`--model critic`) becomes
LlamaForSequenceClassification / Qwen2ForSequenceClassification with num_labels=1: its
`score` is our scalar head's weight. HF's score layer has no bias, so our head's bias is
dropped: every score shifts by the same constant (recorded as `score_bias` in
minirlhf_export.json), so pairwise preferences, the Bradley-Terry probabilities
σ(r_a − r_b) and PPO advantages are unchanged.

Scoring with the exported reward model: HF reads the score at the rightmost token that is
not `pad_token_id`, and we read it at the end-of-turn token that closes the response. So
the ids must end with that token (config.json's `eos_token_id`), exactly as we frame an
exchange:
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
          + tok(response, add_special_tokens=False).input_ids + [config.eos_token_id]
— not apply_chat_template over the whole conversation, whose template may write more
after the end-of-turn token (ChatML's "\n"), which HF would then score. Padding on either
side is fine: config.json's pad_token_id is the exported tokenizer's pad token, never the
end-of-turn token (another special token is chosen when the model pads with it). Then HF's
score = ours − score_bias.

Files written: config.json (transformers 4.x layout: `rope_theta`/`rope_scaling`, which 5.x
reads too; `max_position_embeddings` is the imported model's own context, or the run's
max_seq_len for our own models), model.safetensors, generation_config.json (causal LM:
generation stops on the end-of-turn token), tokenizer.json, tokenizer_config.json,
chat_template.jinja, and minirlhf_export.json (what was exported from where, and the list of
files written; it marks the directory as an export, which a later export may replace). Our
SentencePiece tokenizer is converted (sp_export.py) and checked id for id on a test corpus;
the export refuses (ValueError) rather than ship a tokenizer that encodes differently. The
directory and its files get the usual permissions (0777 / 0666 less the umask).

--out is written under a temporary name and renamed into place; it must be new, empty or
an earlier export holding only the files that export wrote: never the checkpoint, a
directory holding it or inside it, a directory inside an earlier export, or one holding
anything else (a file of the user's, a subdirectory) — refused in one line naming it,
before anything is written, nothing deleted.

Each model has one role: a policy (the `model` of every stage but `rm`) writes responses and
exports as a causal LM; a reward model (stage `rm`) or the PPO critic scores them and exports
as a sequence classifier. Asking for the other head is refused (check_role), as `generate`
and `label` refuse a reward model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
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


def score_pad_id(tok) -> int:
    """The pad id of an exported sequence classifier: one HF can skip without skipping the
    end-of-turn token (see the module docstring). The tokenizer's pad token when it is not the
    end-of-turn token, else its end-of-text, unknown or another special token (bos last)."""
    others = sorted(getattr(tok, "_special_ids", ()))
    for i in (tok.pad_id, getattr(tok, "doc_eos_id", None), getattr(tok, "unk_id", None),
              *[i for i in others if i != tok.bos_id], tok.bos_id):
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
        "max_position_embeddings": max(c.max_seq_len, getattr(tok, "context_len", None) or 0), "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling == "none" else {
            "rope_type": "llama3", "factor": c.rope_factor, "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor, "original_max_position_embeddings": c.rope_original_max_len},
        "tie_word_embeddings": bool(c.tie_embeddings and head == "causal-lm"),
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
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


MARKER = "minirlhf_export.json"


# what an export wrote before its marker listed its files (any head, any tokenizer)
_FILES_OF_AN_EXPORT = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja", MARKER)


def check_role(ckpt, stage, model: str = "model", head: str = "causal-lm", *, export: bool = False) -> None:
    """Refuse (ValueError, one line) a checkpoint's model in a role it was not trained for: a
    reward model (stage "rm") or a value model (`model` other than "model": PPO's critic) as a
    causal LM (to generate from, or exported with head "causal-lm"), or a policy (the model of
    any other stage, whose scalar head is never trained) as a sequence classifier. export: the
    message suggests the other --head too."""
    policy = model == "model" and stage != "rm"
    if head == "causal-lm" and not policy:
        what, instead = (("a reward model's checkpoint (stage rm)", "a policy's (a stage such as runs/quick/sft "
                          "or runs/quick/ppo)") if model == "model" else
                         (f"--model {model}: PPO's value model", "the policy (--model model)"))
        hint = "export it with --head sequence-classification (its default), or give" if export else "give"
        raise ValueError(f"{ckpt}: {what} scores responses, it does not write them; {hint} {instead}")
    if head == "sequence-classification" and policy:
        raise ValueError(f"{ckpt}: a policy's checkpoint (stage {stage}) writes responses, it does not score them "
                         "(its scalar head is never trained); export it with --head causal-lm (its default), or "
                         "give a reward model's (a stage such as runs/quick/rm) or PPO's critic (--model critic)")


def _export_files(out: Path) -> set[str]:
    """The names an earlier export in `out` wrote: its marker's list, or (a marker without one)
    every name an export may write."""
    from ..files import read_json_object

    files = read_json_object(out / MARKER).get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files) | {MARKER}
    return set(_FILES_OF_AN_EXPORT)


def check_out(out, protect=()) -> None:
    """Refuse (ValueError, one line) an --out that must not be replaced: a file, a checkpoint
    in `protect` or a directory holding one or inside one, a directory inside an earlier export,
    a non-empty directory that is not an earlier export (no MARKER in it), or an earlier export
    holding anything it did not write (named: the first such entry)."""
    out = Path(out)
    target = out.resolve()
    for ckpt in protect:
        c = Path(ckpt).resolve()
        if target == c or target in c.parents:
            raise ValueError(f"--out {out}: is or holds the checkpoint {ckpt}; give a new directory")
        if c in target.parents:
            raise ValueError(f"--out {out}: inside the checkpoint {ckpt} (a checkpoint is replaced whole when "
                             "saved); give a directory outside it")
    outer = next((d for d in target.parents if (d / MARKER).is_file()), None)
    if outer is not None:
        raise ValueError(f"--out {out}: inside the earlier export {outer} (an export is replaced whole); give a "
                         "directory outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise ValueError(f"--out {out}: a directory of other files (not an earlier export: no {MARKER}); give a "
                         "new or empty directory")
    ours = _export_files(out)
    for entry in sorted(out.iterdir()):
        if entry.name not in ours or entry.is_symlink() or not entry.is_file():
            raise ValueError(f"--out {out}: an earlier export that also holds {entry.name}, which export did not "
                             "write (replacing the export would delete it); move it out or give another directory")


def _replace_dir(out: Path, write, check) -> None:
    """write(tmp) fills a fresh temporary directory next to `out`, which then takes out's place
    once check() (run again just before the swap) passes; the previous one is removed after the
    swap (a crash between the two renames leaves it as .{name}.*.old). The directory and its
    files get the usual permissions."""
    from ..files import fsync, give_usual_mode

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create it ({e.strerror})") from None
    try:
        write(tmp)
        for f in tmp.iterdir():
            give_usual_mode(f)
            fsync(f)
        give_usual_mode(tmp)
        fsync(tmp)
        check()  # nothing of the user's appeared in an earlier export while this one was written
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(model: Transformer, tokenizer: ChatTokenizer, out_dir, head: str = "causal-lm",
                 check_texts=None, *, protect=(), info: dict | None = None) -> Path:
    """Write `model` + `tokenizer` as an HF directory (see the module docstring); returns it.
    The directory is written under a temporary name and renamed when complete; `info` goes
    into minirlhf_export.json. Raises ValueError when the tokenizer cannot be exported
    exactly, `head` is unknown, or out_dir may not be replaced (check_out; `protect`: the
    source checkpoint's directory)."""
    if head not in HEADS:
        raise ValueError(f"export: head={head!r}: expected one of {', '.join(HEADS)}")
    out = Path(out_dir)
    check_out(out, protect)
    hf_tok = to_hf_tokenizer(tokenizer, check_texts)
    marker = {"exported_by": "minirlhf", "head": head, **(info or {})}
    if head != "causal-lm":
        pad = score_pad_id(hf_tok)
        if pad != hf_tok.pad_id:  # the tokenizer pads with what config.json's pad_token_id says
            hf_tok = hf_tok.with_pad_token(pad)
        marker["score_bias"] = float(model.scalar_head.bias.detach().float().reshape(-1)[0])

    def write(d: Path) -> None:
        (d / "config.json").write_text(json.dumps(hf_config(model, hf_tok, head), indent=2))
        save_file(hf_state_dict(model, head), str(d / "model.safetensors"), metadata={"format": "pt"})
        if head == "causal-lm":
            gen = {"bos_token_id": hf_tok.bos_id, "eos_token_id": hf_tok.eos_id, "pad_token_id": hf_tok.pad_id}
            (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
        hf_tok.save(d)
        marker["files"] = sorted([p.name for p in d.iterdir()] + [MARKER])
        (d / MARKER).write_text(json.dumps(marker, indent=2))

    _replace_dir(out, write, lambda: check_out(out, protect))
    return out


# ---- the command ----
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory of one stage (e.g. runs/quick/ppo)")
    p.add_argument("--out", required=True,
                   help=f"output directory: new, empty, or an earlier export (replaced; it holds {MARKER} and "
                        "only the files export wrote)")
    p.add_argument("--model", default="model",
                   help="which model of the checkpoint: model (policy / reward model) or critic (PPO's value model)")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="causal-lm (policy) or sequence-classification (reward/value); default: "
                        "sequence-classification for the rm stage and the critic, causal-lm otherwise")


def main(args) -> int:
    from .. import checkpoint

    meta = checkpoint.read_meta(args.ckpt)  # a run directory: the message lists its stages
    if args.model != "model" and args.model not in meta.get("extra_models", []):
        raise ValueError(f"{args.ckpt}: --model {args.model}: not in this checkpoint "
                         f"(has: model{''.join(', ' + m for m in meta.get('extra_models', []))})")
    head = args.head or ("sequence-classification" if meta.get("stage") == "rm" or args.model != "model"
                         else "causal-lm")
    check_role(args.ckpt, meta.get("stage"), args.model, head, export=True)
    check_out(args.out, protect=[args.ckpt])  # before the (slow) loading
    model = checkpoint.load_model_from(args.ckpt, args.model)
    tokenizer = checkpoint.load_tokenizer(args.ckpt)
    out = export_model(model, tokenizer, args.out, head, protect=[args.ckpt],
                       info={"ckpt": str(args.ckpt), "model": args.model, "stage": meta.get("stage")})
    kind = "AutoModelForCausalLM" if head == "causal-lm" else "AutoModelForSequenceClassification (num_labels=1)"
    print(f"[export] {args.ckpt} ({args.model}, stage {meta.get('stage')}) -> {out}: load with transformers' {kind}")
    return 0
