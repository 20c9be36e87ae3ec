"""Atomic stage checkpoints: a directory per stage, replaced whole or not at all.

    runs/NAME/<stage>/
        model.safetensors   the stage's model (policy / reward model)
        <extra>.safetensors other models of the stage (PPO's critic)
        config.json         {"stage", "model": ModelConfig, "step", "finished", "save_id", "info": {...}}
        tokenizer.model     the SentencePiece model every stage shares
        state.pt            what --resume needs: optimizer(s), step, RNG states, stage extras

A save writes everything into `<stage>.tmp/`, fsyncs each file and the directory, then
swaps it in with renames. A crash at any point leaves either the previous checkpoint or
the new one loadable: if it dies between the two renames, `<stage>.old/` is the previous
checkpoint and `load` finds it there. Files are created with the usual permissions (0666 less
the umask; safetensors alone would make them 0600, unreadable to another account). Every save
gets a new random `save_id`: two checkpoints with the same id hold the same weights, so what
was made from one (labels sampled from it, say) can tell when the directory was retrained.
"""
from __future__ import annotations

import json
import random
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .files import fsync, give_usual_mode, write_json
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer, load_tokenizer as _load_tokenizer_dir

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "state.pt"


def rng_state() -> dict:
    """Every RNG a stage may draw from, as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_finite(models: dict) -> None:
    for name, model in models.items():
        for pname, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteError(f"{name}.{pname} holds non-finite values; not saved")


class NonFiniteError(RuntimeError):
    """A loss, gradient norm, logit or weight is NaN or infinite: the stage stops, the last good
    checkpoint is kept."""


def save(path, *, stage: str, model: Transformer, tokenizer: Tokenizer, step: int, finished: bool,
         state: dict | None = None, extra_models: dict[str, Transformer] | None = None,
         info: dict | None = None) -> None:
    """Write a checkpoint of `stage` to `path` atomically (see the module docstring)."""
    path = Path(path)
    _check_finite({"model": model, **(extra_models or {})})  # never replace a good checkpoint with NaN weights
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier crash mid-save
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    for name, extra in (extra_models or {}).items():
        save_model(extra, str(tmp / f"{name}.safetensors"))
    tokenizer.save(tmp)  # tokenizer.model, or tokenizer.json + chat template for imported models
    meta = {"stage": stage, "model": asdict(model.cfg), "step": step, "finished": finished,
            "extra_models": sorted(extra_models or {}), "save_id": uuid.uuid4().hex, "info": info or {}}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    torch.save({"step": step, "rng": rng_state(), **(state or {})}, tmp / STATE_FILE)
    for f in tmp.iterdir():
        give_usual_mode(f)
        fsync(f)
    fsync(tmp)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)


def save_id(path) -> str | None:
    """The random id the checkpoint's save got (None for a checkpoint written before ids existed)."""
    value = read_meta(path).get("save_id")
    return value if isinstance(value, str) else None


def is_checkpoint(p: Path) -> bool:
    """A stage directory: its config.json and its model (a run directory has a config.json too)."""
    return (p / CONFIG_FILE).is_file() and (p / MODEL_FILE).is_file()


def _resolve(path) -> Path | None:
    path = Path(path)
    if is_checkpoint(path):
        return path
    old = path.with_name(path.name + ".old")
    return old if is_checkpoint(old) else None


def exists(path) -> bool:
    return _resolve(path) is not None


def read_meta(path) -> dict:
    p = _resolve(path)
    if p is None:
        stages = sorted(d.name for d in Path(path).iterdir() if is_checkpoint(d)) if Path(path).is_dir() else []
        if stages:
            raise ValueError(f"{path}: a run directory, not a stage's checkpoint; its stages: "
                             + ", ".join(f"{path}/{s}" for s in stages))
        raise ValueError(f"{path}: no checkpoint here (expected {CONFIG_FILE}, {MODEL_FILE} and a tokenizer)")
    try:
        return json.loads((p / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{p / CONFIG_FILE}: unreadable checkpoint config: {e}") from None


def is_finished(path) -> bool:
    return exists(path) and bool(read_meta(path).get("finished"))


def load_model_from(path, name: str = "model", device="cpu") -> Transformer:
    """The model (or an extra model such as 'critic') stored in a checkpoint directory."""
    meta = read_meta(path)
    p = _resolve(path)
    model = Transformer(ModelConfig(**meta["model"]))
    file = p / f"{name}.safetensors"
    try:
        open(file, "rb").close()  # safetensors reports a file it may not read as "No such file"
    except OSError as e:
        raise ValueError(f"{file}: cannot read it ({e.strerror or e})") from None
    try:
        load_model(model, str(file))
    except (OSError, RuntimeError, ValueError) as e:  # missing, truncated, other shapes (safetensors' own errors too)
        raise ValueError(f"{file}: not a loadable {name} for this checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{file}: a damaged safetensors file ({str(e).splitlines()[0][:160]})") from None
    return model.to(device)


def load_tokenizer(path) -> Tokenizer:
    read_meta(path)  # one message for a path that is not a checkpoint
    return _load_tokenizer_dir(_resolve(path))


def tokenizer_fingerprint(path) -> str:
    """A digest of the tokenizer files a checkpoint holds (SentencePiece model, or tokenizer.json,
    its config and chat template): equal digests, the same tokenizer."""
    import hashlib

    p = _resolve(path)
    if p is None:
        raise ValueError(f"{path}: no checkpoint here")
    h = hashlib.sha256()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (p / name).is_file():
            h.update(name.encode() + b"\0" + (p / name).read_bytes())
    return h.hexdigest()[:16]


def load_state(path) -> dict:
    """The resume state (optimizer, step, RNG, stage extras); RNG is not restored here.

    Loaded with weights_only=True: tensors and plain containers only, so a run directory
    from elsewhere cannot execute code."""
    p = _resolve(path) / STATE_FILE
    try:
        return torch.load(p, weights_only=True)
    except Exception as e:  # a pickle with code in it, or a corrupt file
        raise ValueError(f"{p}: not a loadable resume state ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def update_info(path, **info) -> None:
    """Add entries to a finished checkpoint's info (config.json), atomically (write, fsync, rename)."""
    p = _resolve(path)
    meta = read_meta(p)
    meta["info"] = {**meta.get("info", {}), **info}
    write_json(p / CONFIG_FILE, meta, indent=2)
