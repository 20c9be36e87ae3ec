"""Real models in and out: Hugging Face directories and GGUF files in, HF directories out.

    load_pretrained(path, max_seq_len, device) -> (Transformer, tokenizer)   # --init-from PATH
    python -m minirlhf export --ckpt runs/NAME/ppo --out DIR                  # export.py

hf.py reads HF directories, gguf_import.py reads GGUF files, hf_tokenizer.py is the
tokenizer of imported models (tokenizer.json + the model's Jinja chat template),
export.py writes our checkpoints back as HF directories (sp_export.py converts our
SentencePiece tokenizer to tokenizer.json). `transformers` is never imported here.
"""
from __future__ import annotations

from pathlib import Path


def load_pretrained(path, max_seq_len: int | None = None, device="cpu"):
    """(Transformer in fp32 on `device`, tokenizer) of a pretrained model at `path`:

    - a `.gguf` file (llama.cpp), or
    - a Hugging Face directory (config.json with model_type, safetensors weights, tokenizer.json).

    max_seq_len: the longest sequence the run uses; the RoPE tables are sized to it (None: the
    model's own context length). The scalar head (reward / value) starts at zero. Raises
    ValueError with one line naming the file and field/tensor for anything unsupported,
    missing or corrupt (the CLI prints it and exits 2)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from .gguf_import import load_gguf

        return load_gguf(p, max_seq_len, device)
    if p.is_dir() and (p / "config.json").is_file():
        from ..files import read_json_object

        config = read_json_object(p / "config.json")
        if "model_type" in config:
            from .hf import load_hf_dir

            return load_hf_dir(p, max_seq_len, device)
    if not p.exists():
        raise ValueError(f"{p}: no such file or directory")
    raise ValueError(f"{p}: neither a .gguf file nor a Hugging Face model directory (config.json with model_type)")
