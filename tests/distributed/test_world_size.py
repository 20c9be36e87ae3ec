"""2 processes against 1, with the same global batches and seed (issue 13): pretrain, SFT and RM
loss curves and weights equal within float tolerance (launch.ATOL/RTOL), the rankings file equal
byte for byte, one PPO iteration's advantages, whitening statistics and β equal; a whole `train`
ends with the same perplexities and RM accuracy and with gold within its sampling error."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from minirlhf.checkpoint import read_meta

from .launch import HERE, assert_same_curve, assert_same_weights, ok, torchrun

pytestmark = pytest.mark.slow


def test_pretrain_and_sft_equal_one_process(tiny_run, ddp_train):
    one, two = tiny_run[0], ddp_train[0]
    assert (one / "tokenizer.model").read_bytes() == (two / "tokenizer.model").read_bytes()
    for stage in ("pretrain", "sft"):
        assert_same_curve(one, two, stage, "loss", "eval_loss", "lr", "grad_norm")
        assert_same_weights(one / stage, two / stage)


def test_train_ends_with_the_one_process_numbers(tiny_run, ddp_train):
    """Perplexity and RM accuracy are deterministic given the weights: equal within float tolerance.
    Gold is measured on sampled responses, and each rank samples its share of the prompts with
    its own seed: equal within 4 standard errors of the difference (the PPO policies differ by
    their sampled rollouts too)."""
    one, two = (json.loads((d / "summary.json").read_text()) for d in (tiny_run[0], ddp_train[0]))
    for stage in ("base", "sft"):
        assert math.isclose(one["heldout_ppl"][stage], two["heldout_ppl"][stage], rel_tol=1e-5)
    assert one["rm_accuracy"] == two["rm_accuracy"]
    assert one["eval_prompts"] == two["eval_prompts"]
    for stage in ("base", "sft", "ppo"):
        a, b = one["gold"][stage], two["gold"][stage]
        assert abs(a["mean"] - b["mean"]) <= 4 * math.hypot(a["se"], b["se"]), (stage, a, b)


def test_output_and_files_once(ddp_train):
    run_dir, r = ddp_train
    assert r.stdout.count("[pretrain] done") == 1 and r.stdout.count("[train] done") == 1
    assert "[dist] 2 processes (gloo), strategy ddp, 1 CPU threads each" in r.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(row["stage"], row["step"], row.get("event"), "loss" in row) for row in rows]
    assert len(keys) == len(set(keys))  # no row twice (each rank logging its own)


def test_rankings_and_reward_model_equal_one_process(tiny_run, tmp_path):
    """`rm` from the one-process SFT checkpoint: the chunks of prompts are dealt to the ranks, each
    sampled with its own seeds, so the rankings are the very same file."""
    one = tiny_run[0]
    ok(torchrun("rm", "--preset", "tiny", "--from", one / "sft", "--out", tmp_path))
    assert (tmp_path / "preferences.jsonl").read_bytes() == (one / "preferences.jsonl").read_bytes()
    assert_same_curve(one, tmp_path, "rm", "loss", "acc", "grad_norm")
    assert_same_weights(one / "rm", tmp_path / "rm")
    info = json.loads((tmp_path / "rm" / "config.json").read_text())["info"]
    assert info["acc_vs_labels"] == json.loads((one / "rm" / "config.json").read_text())["info"]["acc_vs_labels"]


def test_one_ppo_iteration_has_the_one_process_advantages_statistics_and_beta(tiny_run, tmp_path):
    """The same rollouts (ppo_probe.py replays the one-process generation, each rank its rows):
    every rank's raw and whitened advantages are its rows of the one-process ones, every rank's
    whitening statistics are the whole batch's, β is the same, the DDP replicas stay equal."""
    sft, rm = tiny_run[0] / "sft", tiny_run[0] / "rm"
    probe = HERE / "ppo_probe.py"
    single = subprocess.run([sys.executable, str(probe), str(sft), str(rm), str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ok(single)
    ok(torchrun(probe, sft, rm, tmp_path / "two", "--replay", tmp_path / "one" / "generation.pt"))
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    mask = one["mask"]
    for key in ("advantages", "whitened"):  # (B, T), 0 on padding
        both = torch.cat([r[key] for r in ranks])
        torch.testing.assert_close(both[mask], one[key][mask], atol=1e-5, rtol=1e-5)
    mean, var = one["statistics"]  # the one process's own batch statistics, in float64
    for r in ranks:
        assert math.isclose(r["statistics"][0], mean, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(r["statistics"][1], var, rel_tol=1e-6)
    beta = [read_meta(d / "ppo")["info"]["kl_coef"] for d in (tmp_path / "one", tmp_path / "two")]
    assert beta[0] == beta[1] and ranks[0]["kl_coef"] == ranks[1]["kl_coef"] == beta[1]
    for name in ("model", "critic"):  # the replicas after the update: equal on both ranks
        for k in ranks[0][name]:
            assert torch.equal(ranks[0][name][k], ranks[1][name][k]), (name, k)
