"""Two "machines" on one: two torchrun launches with --nnodes 2 that meet through the c10d
rendezvous on 127.0.0.1 (the README's multi-node command), gloo; the pretraining they run
together equals one process's."""
import os
import socket
import subprocess
import sys

import pytest

from .launch import assert_same_curve, assert_same_weights

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(out_dir, env=None, extra=(), per_node=((), ())) -> list[tuple[int, str, str]]:
    """`pretrain --preset tiny` by two torchrun launches, one process each: (exit code, stdout, stderr).
    per_node: options given to one launch only."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes",
                "-m", "minirlhf", "pretrain", "--preset", "tiny", "--out", str(out_dir), "--dist.threads", "1", *extra]
    environ = {k: v for k, v in os.environ.items() if k not in ("MINIRLHF_KILL_AT", "MINIRLHF_FAIL_AT")}
    environ.update(OMP_NUM_THREADS="1", **(env or {}))
    nodes = [subprocess.Popen([*launcher, *own], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for own in per_node]
    outputs = [node.communicate(timeout=240) for node in nodes]
    return [(node.returncode, *output) for node, output in zip(nodes, outputs)]


def test_two_nodes_through_c10d_rendezvous(tiny_run, tmp_path):
    out = _two_nodes(tmp_path)
    for code, stdout, stderr in out:
        assert code == 0, stdout[-2000:] + stderr[-3000:]
    assert sum("[dist] 2 processes" in stdout for _, stdout, _ in out) == 1  # rank 0 speaks, on one node
    assert_same_curve(tiny_run[0], tmp_path, "pretrain", "loss", "eval_loss")
    assert_same_weights(tiny_run[0] / "pretrain", tmp_path / "pretrain")


def test_a_node_that_dies_ends_the_other(tmp_path):
    """No launcher stops the surviving node's process here: it finds out through its next
    collective (the peer's connection closes, or the timeout passes) and ends in one line."""
    out = _two_nodes(tmp_path, env={"MINIRLHF_KILL_AT": "pretrain:5@1"}, extra=["--dist.timeout", "30"])
    assert all(code != 0 for code, _, _ in out)
    errors = [line for _, _, err in out for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "error: [rank 0] lost contact with the other processes" in errors[0], errors


def test_launches_with_other_options_are_refused_at_once(tmp_path):
    """A node started with other options would wait at its first mismatched collective until the
    timeout and blame a lost peer; the configs are compared first."""
    out = _two_nodes(tmp_path, extra=["--dist.timeout", "120"],
                     per_node=(["--pretrain.steps", "20"], ["--pretrain.steps", "50"]))
    assert all(code != 0 for code, _, _ in out)
    errors = [line for _, _, err in out for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "pretrain.steps=" in errors[0] and "must get the same options" in errors[0], errors
    assert not (tmp_path / "pretrain").exists()
