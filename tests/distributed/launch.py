"""Launching and comparing runs for the distributed tests: `torchrun` with the real command line,
on CPU (gloo), one thread per process (the machine is shared)."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from minirlhf.metrics import stage_history

HERE = Path(__file__).parent

# Float tolerance of a run on N processes against one process: the ranks' gradients are summed
# by an all-reduce (and the logged sums in float64) where one process sums one batch, so results
# differ by float32 rounding only (measured: <= 3e-7 on weights after the tiny preset's stages).
ATOL = RTOL = 1e-5


def torchrun(*args, nproc: int = 2, env: dict | None = None, timeout: float = 240, launcher=("--standalone",)):
    """`torchrun --standalone --nproc_per_node N -m minirlhf ARGS`, or a script when ARGS[0] is a .py
    file. Fault injection comes only from `env`."""
    environ = {k: v for k, v in os.environ.items() if k not in ("MINIRLHF_KILL_AT", "MINIRLHF_FAIL_AT")}
    environ.update(OMP_NUM_THREADS="1", **(env or {}))
    args = [str(a) for a in args]
    target = args if args and args[0].endswith(".py") else ["-m", "minirlhf", *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc), *target]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout)


def ok(r) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def assert_same_weights(a: Path, b: Path, name: str = "model", exact: bool = False) -> None:
    """The tensors of a/name.safetensors and b/name.safetensors: equal bit for bit, or within ATOL/RTOL."""
    x, y = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        if exact:
            assert torch.equal(x[k], y[k]), f"{a.name}/{name}: {k} differs"
        else:
            torch.testing.assert_close(x[k], y[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{a.name}/{name}.{k}: {m}")


def curve(run_dir: Path, stage: str, *keys: str) -> list[tuple]:
    """(step, *values) of each logged row of the stage's latest run."""
    return [(r["step"], *(r.get(k) for k in keys)) for r in stage_history(run_dir, stage)]


def assert_same_curve(a: Path, b: Path, stage: str, *keys: str) -> None:
    ca, cb = curve(a, stage, *keys), curve(b, stage, *keys)
    assert [r[0] for r in ca] == [r[0] for r in cb] and len(ca) > 1
    for ra, rb in zip(ca, cb):
        for key, x, y in zip(keys, ra[1:], rb[1:]):
            assert (x is None) == (y is None), (stage, ra[0], key)
            if x is not None:
                assert abs(x - y) <= ATOL + RTOL * abs(y), (stage, ra[0], key, x, y)
