"""Which implementation runs an op, and the lazy Triton import.

`import kernels` must work with torch alone, so the Triton kernels are written as
plain module-level functions marked with `@triton_kernel`; `load_triton()` imports
triton the first time a Triton launch is needed and rebinds each marked function
(and the module's `tl` name) to its `triton.jit` version. Kernels stay ordinary
module-level `@triton.jit` functions from Triton's point of view, which every Triton
version compiles, and which the interpreter (`TRITON_INTERPRET=1`) runs on CPU.

Backend choice: CUDA tensors -> "triton", everything else -> "torch" (the chunked
CPU path). Tests and debugging can override it:

    with kernels._dispatch.force_backend("triton"):   # CPU tensors need TRITON_INTERPRET=1
        kernels.ppo_loss(...)
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

BACKENDS = ("torch", "triton")

_forced: str | None = None
_marked: list[tuple[dict, str]] = []
_lock = threading.Lock()
_triton = None  # the triton module once loaded
_triton_failed: str | None = None


def triton_kernel(fn):
    """Mark a module-level function as Triton code, to be `triton.jit`-ed on first use."""
    with _lock:
        _marked.append((fn.__globals__, fn.__name__))
        loaded = _triton is not None
    if loaded:
        _bind_marked()
    return fn


def _bind_marked():
    import triton
    import triton.language as tl

    with _lock:
        jitted = {}
        for module_globals, name in _marked:
            fn = module_globals[name]
            if not getattr(fn, "_minirlhf_jitted", False):
                jitted[id(fn)] = triton.jit(fn)
                jitted[id(fn)]._minirlhf_jitted = True
        # A kernel module that imported a helper from another (`from .logprobs import
        # _softmax_row_stats`) holds the plain function too: rebind every reference.
        for module_globals in {id(g): g for g, _ in _marked}.values():
            module_globals["tl"] = tl
            for key, value in list(module_globals.items()):
                if id(value) in jitted and callable(value):
                    module_globals[key] = jitted[id(value)]


def load_triton():
    """Import triton and jit every marked kernel; returns the triton module."""
    global _triton
    if _triton is None:
        import triton

        _triton = triton
        _bind_marked()
    return _triton


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run ops on `name` ("torch" or "triton") whatever the device; None restores auto."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def backend_for(t: torch.Tensor) -> str:
    global _triton_failed
    if _forced == "torch":
        return "torch"
    if _forced == "triton":
        if not t.is_cuda and not interpreter_on():
            raise RuntimeError(
                "the Triton backend was forced on non-CUDA tensors; set TRITON_INTERPRET=1 "
                "before triton is imported to run it in the interpreter"
            )
        load_triton()
        return "triton"
    if not t.is_cuda:
        return "torch"
    if _triton_failed is None:
        try:
            load_triton()
            return "triton"
        except ImportError as e:  # a CUDA torch without triton: stay correct, just slower
            _triton_failed = str(e)
            warnings.warn(f"kernels: triton unavailable ({e}); using the chunked torch path on CUDA")
    return "torch"
