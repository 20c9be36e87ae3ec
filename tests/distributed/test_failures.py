"""When one rank fails, every rank ends (non-zero, within the collective timeout, never hanging),
the error is printed once, in one line, and the last checkpoint is intact: --resume finishes with
the weights of an uninterrupted run."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from minirlhf import checkpoint

from .launch import assert_same_weights, ok, torchrun

pytestmark = pytest.mark.slow


def _ppo_args(run, out):
    return ["ppo", "--preset", "tiny", "--from", run / "sft", "--rm", run / "rm", "--out", out, "--dist.timeout", "30"]


def test_killed_rank_ends_all_ranks_and_resume_finishes(ddp_train, tmp_path):
    run = ddp_train[0]
    t0 = time.time()
    killed = torchrun(*_ppo_args(run, tmp_path), env={"MINIRLHF_KILL_AT": "ppo:1@1"})  # rank 1, after iteration 1 of 2
    assert killed.returncode != 0 and time.time() - t0 < 120
    assert "exitcode  : -9" in killed.stderr
    meta = checkpoint.read_meta(tmp_path / "ppo")  # the checkpoint of iteration 1, whole and loadable
    assert meta["step"] == 1 and not meta["finished"]
    checkpoint.load_model_from(tmp_path / "ppo", name="critic")
    assert checkpoint.load_state(tmp_path / "ppo")["step"] == 1
    again = torchrun(*_ppo_args(run, tmp_path))  # without --resume: refused, once, in one line
    assert again.returncode != 0 and again.stderr.count("error: ") == 1 and "--resume" in again.stderr
    shutil.copytree(tmp_path, tmp_path.with_name(tmp_path.name + "-one"))
    ok(torchrun(*_ppo_args(run, tmp_path), "--resume"))
    for name in ("model", "critic"):  # the uninterrupted run's ppo stage, from the same inputs
        assert_same_weights(run / "ppo", tmp_path / "ppo", name, exact=True)
    # another number of processes resumes it too (whole models, plain optimizer states, world-free batches)
    one = tmp_path.with_name(tmp_path.name + "-one")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIRLHF_")}
    ok(subprocess.run([sys.executable, "-m", "minirlhf", *map(str, _ppo_args(run, one)), "--resume"],
                      env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240))
    assert checkpoint.is_finished(one / "ppo") and checkpoint.read_meta(one / "ppo")["step"] == 2


def test_error_on_one_rank_ends_all_with_its_one_line(ddp_train, tmp_path):
    run = ddp_train[0]
    r = torchrun(*_ppo_args(run, tmp_path), env={"MINIRLHF_FAIL_AT": "ppo:1@1"})
    assert r.returncode != 0
    # rank 0's progress bar may share the line; the message is there once, from rank 1 only
    assert r.stderr.count("error: ") == 1, r.stderr[-3000:]
    assert "error: [rank 1] ppo stopped at step 1: fault injected (MINIRLHF_FAIL_AT)\n" in r.stderr
    assert checkpoint.read_meta(tmp_path / "ppo")["step"] == 1  # saved before the failure


def test_a_mistake_before_the_process_group_is_one_line(tmp_path):
    """Every rank makes the same mistake before the group exists: local rank 0 says it, once."""
    r = torchrun("experiment", "kl-sweep", "--smoke", "--out", tmp_path, "--ppo.kl_coef", "abc")
    assert r.returncode != 0 and r.stderr.count("error: ") == 1
    assert "error: --ppo.kl_coef: expected float, got 'abc'" in r.stderr
