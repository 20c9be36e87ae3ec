"""Bad inputs are ValueErrors with a message naming the argument, raised before compute."""

import pytest
import torch

import kernels
from kernels import linear_ppo_loss, linear_token_logprobs, ppo_loss, token_logprobs
from kernels._dispatch import force_backend

X = torch.randn(2, 3, 5)
Y = torch.randint(0, 5, (2, 3))
OLD = torch.zeros(2, 3)
ADV = torch.ones(2, 3)
H = torch.randn(2, 3, 4)
W = torch.randn(5, 4)


@pytest.mark.parametrize("args,kwargs,match", [
    ((X.long(), Y), {}, "logits must be float"),
    ((torch.randn(5), torch.tensor(1)), {}, "logits must have at least 2 dims"),
    ((X, Y.float()), {}, "labels must be an integer"),
    ((X, Y[:, :2]), {}, r"labels must have shape \(2, 3\)"),
    ((X, Y.to("meta")), {}, "labels is on meta"),
    ((X, torch.full((2, 3), 5)), {}, r"labels must be in \[0, 5\) or equal ignore_index=-100; found 5"),
    ((X, torch.full((2, 3), -1)), {}, "found -1"),
    ((X, Y, 0.0), {}, "temperature must be a finite number > 0"),
    ((X, Y, float("inf")), {}, "temperature"),
    (([[1.0]], Y), {}, "logits must be a torch.Tensor"),
])
def test_token_logprobs_rejects(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(*args, **kwargs)


def test_custom_ignore_index():
    labels = Y.clone()
    labels[0, 0] = 7
    with pytest.raises(ValueError, match="found 7"):
        token_logprobs(X, labels)
    labels[0, 0] = -1
    lp = token_logprobs(X, labels, ignore_index=-1)
    assert lp[0, 0] == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(old_logprobs=OLD[:, :2]), r"old_logprobs must have shape \(2, 3\)"),
    (dict(advantages=ADV.long()), "advantages must be float"),
    (dict(mask=torch.ones(3, 2)), "mask must have shape"),
    (dict(ref_logprobs=OLD.to("meta")), "ref_logprobs is on meta"),
    (dict(clip_eps=1.0), r"clip_eps must be in \[0, 1\)"),
    (dict(clip_eps=-0.1), "clip_eps"),
    (dict(clip_eps_high=-0.1), r"clip_eps_high must be >= clip_eps \(0.2\)"),
    (dict(clip_eps_high=0.1), r"clip_eps_high must be >= clip_eps \(0.2\), got 0.1"),
    (dict(clip_eps=0.3, clip_eps_high=0.28), r"clip_eps_high must be >= clip_eps \(0.3\)"),
    (dict(dual_clip=1.0), "dual_clip must be > 1"),
    (dict(kl_coef=0.1), "kl_coef=0.1 needs ref_logprobs"),
    (dict(kl_coef=float("nan")), "kl_coef must be finite"),
    (dict(kl_coef=-1, ref_logprobs=OLD), "kl_coef must be >= 0, got -1"),
    (dict(kl_coef=torch.tensor(-0.01), ref_logprobs=OLD), "kl_coef must be >= 0"),
    (dict(kl_coef="0.1"), "kl_coef must be a number"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of 'k1', 'k2', 'k3'"),
    (dict(loss_agg="mean"), "loss_agg must be one of"),
    (dict(temperature=-1.0), "temperature"),
])
def test_ppo_loss_rejects(kwargs, match):
    base = dict(logits=X, labels=Y, old_logprobs=OLD, advantages=ADV, mask=None)
    base.update(kwargs)
    pos = [base.pop(k) for k in ("logits", "labels", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        ppo_loss(*pos, **base)


SCALAR_RANGES = [
    (dict(clip_eps_high=0.1), r"clip_eps_high must be >= clip_eps \(0.2\), got 0.1"),
    (dict(kl_coef=-1, ref_logprobs=OLD), "kl_coef must be >= 0, got -1"),
]


@pytest.mark.parametrize("kwargs,match", SCALAR_RANGES)
def test_linear_ppo_loss_rejects_scalar_ranges(kwargs, match):
    with pytest.raises(ValueError, match="^linear_ppo_loss: " + match):
        linear_ppo_loss(H, W, Y, OLD, ADV, **kwargs)


def test_seq_aggregation_needs_sequences():
    with pytest.raises(ValueError, match="needs sequence structure"):
        ppo_loss(X.reshape(6, 5), Y.reshape(6), OLD.reshape(6), ADV.reshape(6), None, loss_agg="seq-mean-token-mean")


def test_kl_coef_accepts_a_one_element_tensor():
    loss, _ = ppo_loss(X, Y, OLD, ADV, None, ref_logprobs=OLD, kl_coef=torch.tensor(0.1))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("h,w,match", [
    (H, W.double(), "must share a dtype"),
    (H, torch.randn(5, 3), "hidden's last dim"),
    (H, torch.randn(5, 4, 1), r"weight must be \(V, H\)"),
    (H.long(), W, "hidden must be float"),
    (H, W.to("meta"), "weight is on meta"),
])
def test_linear_rejects(h, w, match):
    with pytest.raises(ValueError, match=match):
        linear_token_logprobs(h, w, Y)
    with pytest.raises(ValueError, match=match):
        linear_ppo_loss(h, w, Y, OLD, ADV)


def test_linear_rejects_labels_and_chunk():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        linear_token_logprobs(H, W, torch.full((2, 3), 9))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_token_logprobs(H, W, Y, chunk_size=0)
    with pytest.raises(ValueError, match=r"leading dims of hidden"):
        linear_ppo_loss(H, W, Y[:1], OLD, ADV)


def test_forced_triton_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_logprobs(X, Y)
    with pytest.raises(ValueError, match="backend must be one of"):
        with force_backend("cuda"):
            pass
    assert kernels._dispatch.backend_for(X) == "torch"
