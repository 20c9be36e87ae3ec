"""User input that cannot work is refused before any compute, in one line naming the file,
the line and the field; finished work is never lost to a later mistake."""
import json
import subprocess
import sys

import pytest
import torch

from minirlhf import checkpoint
from minirlhf.cli import apply_overrides, main
from minirlhf.config import PRESETS
from minirlhf.data import write_jsonl


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "minirlhf", *args], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_a_prompt_that_leaves_no_room_for_an_answer_is_refused_before_pretraining(tmp_path):
    prompts = tmp_path / "ppo.jsonl"
    write_jsonl(prompts, [{"prompt": "What does the fox eat?"},
                          {"prompt": "Tell me everything about the fox and the owl. " * 12 + "What does it eat?"}])
    code, err = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--data.ppo_prompts", str(prompts),
                     "--ppo.max_new_tokens", "32")
    line = _one_line(err)
    assert code == 2 and f"{prompts}:2: prompt: " in line and "model.max_seq_len=96" in line
    assert "ppo.max_new_tokens=32" in line
    assert not (tmp_path / "run" / "pretrain").exists()


def test_rm_prompts_the_annotator_cannot_rank_are_refused(tmp_path):
    prompts = tmp_path / "rm.jsonl"
    write_jsonl(prompts, [{"prompt": "What does the fox eat?"}, {"prompt": "Write a haiku about autumn."}])
    code, err = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--data.rm_prompts", str(prompts))
    line = _one_line(err)
    assert code == 2 and f"{prompts}:2: prompt: not one of the embedded task's prompts" in line
    assert "--data.preferences" in line and not (tmp_path / "run" / "pretrain").exists()


@pytest.mark.parametrize("args, message", [
    (["--sft.samples", "100000"], "config: sft.samples=100000: only 64 demonstrations are available"),
    (["--pretrain.seq_len", "96", "--data.corpus_heldout", "{small}"], "{small}:0: held-out corpus:"),
])
def test_data_too_small_for_the_config(tmp_path, args, message):
    small = tmp_path / "small.jsonl"
    write_jsonl(small, [{"text": "The fox eats berries."}])
    args = [a.format(small=small) for a in args]
    code, err = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args)
    assert code == 2 and message.format(small=small) in _one_line(err)
    assert not (tmp_path / "run" / "pretrain").exists()


def test_small_data_is_used_as_it_is_and_said(tmp_path, capsys):
    from minirlhf.pipeline import check_inputs, load_inputs

    cfg = apply_overrides(PRESETS["tiny"](), {"ppo.batch_size": "64", "ppo.minibatch_size": "8",
                                              "sft.batch_size": "200"})
    inputs = load_inputs(cfg)
    from minirlhf.tokenizer import Tokenizer
    tok = Tokenizer.train(inputs.corpus[:200], vocab_size=384)
    check_inputs(cfg, inputs, tok, ("sft", "ppo"))
    err = capsys.readouterr().err
    assert "32 PPO prompts < ppo.batch_size=64: each iteration draws its batch with replacement" in err
    assert "sft.batch_size=200 > 64 demonstrations: one batch of all of them" in err


def test_own_preferences_with_unknown_prompts_train_and_keep_the_rm(tiny_run, tmp_path, monkeypatch):
    """--data.preferences on prompts the task does not know: the RM trains, is saved, and its
    accuracy against gold is computed only where gold knows the prompt (here nowhere)."""
    from minirlhf.data import read_preferences
    from minirlhf.metrics import Metrics
    from minirlhf.stages.rm import run_rm

    run_dir = tiny_run[0]
    rows = [json.loads(line) for line in (run_dir / "preferences.jsonl").read_text().splitlines()]
    for r in rows:
        r["prompt"] = "Tell me, please: " + r["prompt"]
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, rows)
    from minirlhf.pipeline import load_inputs
    cfg = apply_overrides(PRESETS["tiny"](), {"data.preferences": str(prefs)})
    inputs = load_inputs(cfg)
    out = run_rm(cfg, tmp_path / "rm", sft_dir=run_dir / "sft", comparisons=read_preferences(prefs),
                 metrics=Metrics(tmp_path), gold_score=inputs.gold_score)
    info = checkpoint.read_meta(out)["info"]
    assert checkpoint.is_finished(out) and info["acc_vs_gold"] is None and info["gold_pairs"] == 0
    assert 0 <= info["acc_vs_labels"] <= 1

    # an evaluation that fails after training is reported, and the trained RM is kept
    import minirlhf.stages.rm as rm_stage

    def broken(*a, **k):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(rm_stage, "pairwise_accuracy", broken)
    out = run_rm(cfg, tmp_path / "rm2", sft_dir=run_dir / "sft", comparisons=read_preferences(prefs),
                 metrics=Metrics(tmp_path), gold_score=inputs.gold_score)
    info = checkpoint.read_meta(out)["info"]
    assert checkpoint.is_finished(out) and "the evaluation broke" in info["eval_error"]


def test_own_preferences_end_to_end_without_own_eval_prompts(tiny_run, tmp_path):
    """The issue's case: train --data.preferences FILE on the task's other data finishes."""
    rows = [json.loads(line) for line in (tiny_run[0] / "preferences.jsonl").read_text().splitlines()]
    for r in rows:
        r["prompt"] = r["prompt"] + " Please."
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, rows)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--data.preferences", str(prefs),
                 "--ppo.iterations", "1"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rm_accuracy"]["vs_gold"] is None and summary["gold"]["ppo"]["mean"] is not None


def test_eval_temperature_0_is_greedy_and_the_report_is_written(tiny_run, tmp_path):
    run_dir = tiny_run[0]
    assert main(["eval", "--preset", "tiny", "--out", str(tmp_path), "--ckpt", str(run_dir / "ppo"),
                 "--ref", str(run_dir / "sft"), "--rm-ckpt", str(run_dir / "rm"), "--eval.temperature", "0"]) == 0
    def numbers():
        out = json.loads((tmp_path / "eval.json").read_text())
        return {k: {kk: vv for kk, vv in v.items() if kk != "wall_s"} for k, v in out.items()}

    first = numbers()
    assert main(["eval", "--preset", "tiny", "--out", str(tmp_path), "--ckpt", str(run_dir / "ppo"),
                 "--ref", str(run_dir / "sft"), "--rm-ckpt", str(run_dir / "rm"), "--eval.temperature", "0",
                 "--seed", "5"]) == 0
    assert numbers() == first  # greedy: the seed does not matter


def test_a_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    code, err = _cli("pretrain", "--preset", "tiny", "--out", str(run), "--pretrain.lr", "1e30",
                     "--pretrain.save_every", "1", "--pretrain.grad_clip", "none")
    line = _one_line(err)
    assert code == 1 and line.startswith("error: pretrain stopped at step ") and "--resume" in line
    meta = checkpoint.read_meta(run / "pretrain")
    assert not meta["finished"] and meta["step"] >= 1
    for p in checkpoint.load_model_from(run / "pretrain").parameters():
        assert torch.isfinite(p).all()


def test_resume_continues_from_the_last_good_checkpoint(tmp_path, monkeypatch):
    import minirlhf.stages.pretrain as pretrain
    from minirlhf.loop import StageStopped
    from minirlhf.metrics import Metrics
    from minirlhf.pipeline import load_inputs, run_tokenizer

    cfg = apply_overrides(PRESETS["tiny"](), {"pretrain.steps": "12", "pretrain.save_every": "5"})
    inputs = load_inputs(cfg)
    tok = run_tokenizer(cfg, tmp_path, inputs.corpus)
    real_ce, calls = pretrain.F.cross_entropy, []

    def nan_at_step_7(*a, **k):  # the 7th training loss is NaN (a corrupted batch, say)
        calls.append(1)
        loss = real_ce(*a, **k)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(pretrain.F, "cross_entropy", nan_at_step_7)
    with pytest.raises(StageStopped, match=r"^pretrain stopped at step 7: loss is nan;"):
        pretrain.run_pretrain(cfg, tmp_path / "pretrain", tokenizer=tok, corpus=inputs.corpus,
                              corpus_heldout=inputs.corpus_heldout, metrics=Metrics(tmp_path))
    assert checkpoint.read_meta(tmp_path / "pretrain")["step"] == 5
    monkeypatch.undo()
    pretrain.run_pretrain(cfg, tmp_path / "pretrain", tokenizer=tok, corpus=inputs.corpus,
                          corpus_heldout=inputs.corpus_heldout, metrics=Metrics(tmp_path), resume=True)
    assert checkpoint.is_finished(tmp_path / "pretrain")
    # the same weights as a run that never saw the NaN
    pretrain.run_pretrain(cfg, tmp_path / "clean", tokenizer=tok, corpus=inputs.corpus,
                          corpus_heldout=inputs.corpus_heldout, metrics=Metrics(tmp_path))
    a = checkpoint.load_model_from(tmp_path / "pretrain").state_dict()
    b = checkpoint.load_model_from(tmp_path / "clean").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_state_cannot_run_code(tiny_run, tmp_path):
    import shutil

    ckpt = tmp_path / "ppo"
    shutil.copytree(tiny_run[0] / "ppo", ckpt)

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"step": 1, "evil": Evil()}, ckpt / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: not a loadable resume state"):
        checkpoint.load_state(ckpt)
    # and a real one round-trips every RNG under weights_only=True
    state = checkpoint.load_state(tiny_run[0] / "ppo")
    checkpoint.set_rng_state(state["rng"])
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
