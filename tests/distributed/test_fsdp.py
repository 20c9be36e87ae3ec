"""FSDP2 (`--dist.strategy fsdp`, CPU/gloo, tiny model) against DDP on the same 2 processes: the
same results within float tolerance; and a killed FSDP2 run resumed from its checkpoint (whole
models and plain optimizer states gathered to rank 0) finishes with the very same weights."""
import pytest

from minirlhf import checkpoint

from .launch import assert_same_curve, assert_same_weights, ok, torchrun

pytestmark = pytest.mark.slow


def test_fsdp_equals_ddp(ddp_train, fsdp_train):
    ddp, fsdp = ddp_train[0], fsdp_train[0]
    assert "strategy fsdp" in fsdp_train[1].stdout
    for stage in ("pretrain", "sft", "rm"):
        assert_same_weights(ddp / stage, fsdp / stage)
    for stage, keys in (("pretrain", ("loss", "eval_loss")), ("sft", ("loss", "eval_loss")), ("rm", ("loss", "acc")),
                        ("ppo", ("pg_loss", "vf_loss", "kl_to_ref", "kl_coef", "advantages_std"))):
        assert_same_curve(ddp, fsdp, stage, *keys)
    # same world size, same sampling seeds: the same rollouts, so PPO too agrees within tolerance
    for name in ("model", "critic"):
        assert_same_weights(ddp / "ppo", fsdp / "ppo", name)


def test_fsdp_killed_then_resumed_finishes_identically(fsdp_train, tmp_path):
    run = fsdp_train[0]
    args = ["ppo", "--preset", "tiny", "--from", run / "sft", "--rm", run / "rm", "--out", tmp_path,
            "--dist.strategy", "fsdp"]
    killed = torchrun(*args, env={"MINIRLHF_KILL_AT": "ppo:2"})  # after iteration 2; the last save was at 1
    assert killed.returncode != 0
    assert checkpoint.read_meta(tmp_path / "ppo")["step"] == 1
    ok(torchrun(*args, "--resume"))
    assert checkpoint.is_finished(tmp_path / "ppo")
    for name in ("model", "critic"):
        assert_same_weights(run / "ppo", tmp_path / "ppo", name, exact=True)
    assert_same_curve(run, tmp_path, "ppo", "pg_loss", "kl_coef", "rm_score", "gold")
