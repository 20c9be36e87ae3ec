"""Fused RL losses for language models: torch is the only dependency.

    from kernels import token_logprobs, ppo_loss, linear_token_logprobs, linear_ppo_loss

The (tokens x vocab) logits dominate an LM-RL loss. These ops read the logits once
forward and write their gradient once backward (Triton on CUDA tensors, a chunked torch
path elsewhere); the linear_* variants fuse the LM-head matmul so the full logits never
exist. Each op's file (logprobs.py, ppo.py, linear.py) states its formulas, and holds a
plain-torch reference (`*_reference`) that the tests compare against; _rows.py holds the
row math they share (softmax statistics and gradient of rows of logits, both paths).

This package is named `kernels`, like the Hugging Face kernel downloader that
transformers can use; both install into site-packages/kernels, so install one or the
other in an environment. transformers decides whether `kernels` is that downloader from
the version of the distribution shipping it (minirlhf's), or from `__version__` in a bare
source checkout; both stay outside the range it accepts (0.18.x at the time of writing),
which tests/kernels/test_transformers_coexist.py checks.
"""

from .linear import linear_ppo_loss, linear_token_logprobs
from .logprobs import token_logprobs
from .ppo import PPOLossStats, ppo_loss

__version__ = "0.1.0"

__all__ = ["token_logprobs", "ppo_loss", "linear_token_logprobs", "linear_ppo_loss", "PPOLossStats"]
