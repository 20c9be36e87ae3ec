"""`import kernels` needs torch only; triton is imported on the first Triton launch."""

import os
import subprocess
import sys
from pathlib import Path

import kernels

REPO = Path(__file__).resolve().parents[2]


def test_public_api():
    assert set(kernels.__all__) == {"token_logprobs", "ppo_loss", "linear_token_logprobs", "linear_ppo_loss",
                                    "PPOLossStats"}
    for name in kernels.__all__:
        assert getattr(kernels, name).__doc__


def test_cpu_use_never_imports_triton():
    code = (
        "import sys, torch, kernels\n"
        "x = torch.randn(3, 5, requires_grad=True)\n"
        "y = torch.tensor([0, 4, -100])\n"
        "kernels.token_logprobs(x, y).sum().backward()\n"
        "kernels.ppo_loss(x, y, torch.zeros(3), torch.ones(3), None)[0].backward()\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
