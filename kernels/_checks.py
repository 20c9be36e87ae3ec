"""Input validation shared by the ops: every bad input is a ValueError raised before compute.

The label-range check reduces over the labels and reads one boolean back, which is a
host sync on CUDA; it is the price of an error message instead of a device assert.
"""

from __future__ import annotations

import functools
import math

import torch

LOSS_AGGS = ("token-mean", "sum", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(op: str, name: str, t, *, ndim_min: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < ndim_min:
        raise ValueError(f"{op}: {name} must have at least {ndim_min} dims, got shape {_shape(t)}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_logits(op: str, logits) -> None:
    check_tensor(op, "logits", logits, ndim_min=2)
    check_float(op, "logits", logits)
    if logits.shape[-1] < 1:
        raise ValueError(f"{op}: logits must have a non-empty vocabulary dim, got shape {_shape(logits)}")


def check_labels(op: str, labels, lead_shape: torch.Size, ref: torch.Tensor, vocab: int, ignore_index: int,
                 ref_name: str = "logits") -> None:
    check_tensor(op, "labels", labels, ndim_min=0)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"{op}: labels must have shape {tuple(lead_shape)} (the leading dims of {ref_name}), "
            f"got {tuple(labels.shape)}"
        )
    check_same_device(op, ref_name, ref, "labels", labels)
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"{op}: labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )


def check_token_values(op: str, name: str, t, lead_shape: torch.Size, ref: torch.Tensor, *,
                       allow_bool: bool = False, ref_name: str = "logits") -> None:
    """A per-token tensor (old log-probs, advantages, mask, ...) aligned with the labels."""
    check_tensor(op, name, t, ndim_min=0)
    if t.shape != lead_shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(lead_shape)} like labels, got {tuple(t.shape)}")
    if allow_bool:
        if t.dtype.is_complex:
            raise ValueError(f"{op}: {name} must be bool or real, got {t.dtype}")
    else:
        check_float(op, name, t)
    check_same_device(op, ref_name, ref, name, t)


def check_positive(op: str, name: str, value) -> float:
    v = _as_float(op, name, value)
    if not v > 0 or not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value!r}")
    return v


def check_finite(op: str, name: str, value) -> float:
    v = _as_float(op, name, value)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")
    return v


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _as_float(op: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a 1-element tensor, got shape {_shape(value)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{op}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def check_ppo_args(op, ref_tensor, lead, labels, old_logprobs, advantages, mask, ref_logprobs,
                   clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, temperature, loss_agg,
                   ref_name="logits"):
    """Validates the per-token inputs and scalars shared by ppo_loss and linear_ppo_loss."""
    kw = dict(ref_name=ref_name)
    check_token_values(op, "old_logprobs", old_logprobs, lead, ref_tensor, **kw)
    check_token_values(op, "advantages", advantages, lead, ref_tensor, **kw)
    if mask is not None:
        check_token_values(op, "mask", mask, lead, ref_tensor, allow_bool=True, **kw)
    if ref_logprobs is not None:
        check_token_values(op, "ref_logprobs", ref_logprobs, lead, ref_tensor, **kw)
    clip_low = check_finite(op, "clip_eps", clip_eps)
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"{op}: clip_eps must be in [0, 1), got {clip_eps!r}")
    clip_high = clip_low if clip_eps_high is None else check_finite(op, "clip_eps_high", clip_eps_high)
    if clip_high < clip_low:  # clip-higher widens the upper bound only (DAPO); a narrower one is a typo
        raise ValueError(f"{op}: clip_eps_high must be >= clip_eps ({clip_low}), got {clip_eps_high!r}")
    if dual_clip is not None:
        dual_clip = check_finite(op, "dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"{op}: dual_clip must be > 1 (e.g. 3.0), got {dual_clip!r}")
    kl_coef = check_finite(op, "kl_coef", kl_coef)
    if kl_coef < 0.0:  # a negative coefficient would reward moving away from the reference
        raise ValueError(f"{op}: kl_coef must be >= 0, got {kl_coef!r}")
    check_choice(op, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_choice(op, "loss_agg", loss_agg, LOSS_AGGS)
    if loss_agg.startswith("seq-") and len(lead) < 2:
        raise ValueError(
            f"{op}: loss_agg={loss_agg!r} needs sequence structure: {ref_name} of shape (B, T, ...) "
            f"with labels (B, T); got labels of shape {tuple(lead)}"
        )
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"{op}: kl_coef={kl_coef} needs ref_logprobs")
    inv_temp = 1.0 / check_positive(op, "temperature", temperature)
    return dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator), inv_temp


def first_order_only(op: str):
    """Decorates an autograd.Function's backward: refuses a backward that builds a graph
    (create_graph=True, i.e. for second derivatives) with a message naming the op.

    The backwards write into preallocated buffers (out=, in-place) and some gradients are
    formed in forward, so a graph through them would be wrong or fail deep inside. Raised
    eagerly: torch.autograd.function.once_differentiable defers its error to the second
    backward, and when the upstream gradient does not require grad (the usual case) that
    second backward only says "element 0 of tensors does not require grad".
    """
    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{op}: second derivatives are not supported (backward was called with "
                    f"create_graph=True); its gradient can be taken once"
                )
            return backward(ctx, *grads)
        return wrapper
    return wrap
