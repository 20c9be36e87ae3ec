"""What a new user's mistakes did before (each case failed then): reruns with other options,
checkpoints that do not belong together, paths that are not what they should be, sizes that
cannot work, and a resume that must take the new learning rate."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf import checkpoint
from minirlhf.cli import apply_overrides, main
from minirlhf.config import PRESETS


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_rerun_with_other_options_is_refused_not_mixed(tiny_run, capsys):
    run_dir = str(tiny_run[0])
    for args, message in ((["--ppo.kl_coef", "0.05"], "/ppo: made with ppo.kl_coef=0.3, this run asks for 0.05"),
                          (["--skip-sft"], "made with skip_sft=False, this run asks for True"),
                          (["--sft.lr", "0.01"], "/sft: made with sft.lr=0.001, this run asks for 0.01")):
        assert main(["train", "--preset", "tiny", "--out", run_dir, *args]) == 2
        line = _one_line(capsys)
        assert message in line and "use another --out" in line, line


def test_checkpoints_that_do_not_belong_together(tiny_run, tmp_path, capsys):
    run = tiny_run[0]
    assert main(["ppo", "--preset", "tiny", "--out", str(tmp_path / "a"), "--from", str(run / "sft"),
                 "--rm", str(run / "sft")]) == 2
    assert "a sft checkpoint; ppo takes --rm from rm" in _one_line(capsys)
    other = tmp_path / "rm-other-tokenizer"
    shutil.copytree(run / "rm", other)
    from minirlhf.tokenizer import Tokenizer
    Tokenizer.train(["the owl eats mice", "Lima is in Peru"] * 50, vocab_size=300).save(other / "tokenizer.model")
    assert main(["ppo", "--preset", "tiny", "--out", str(tmp_path / "b"), "--from", str(run / "sft"),
                 "--rm", str(other)]) == 2
    assert "uses another tokenizer than --from" in _one_line(capsys)
    assert main(["eval", "--preset", "tiny", "--out", str(tmp_path / "c"), "--ckpt", str(run)]) == 2
    assert "a run directory, not a stage's checkpoint; its stages:" in _one_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(run / "ppo", broken)
    (broken / "model.safetensors").write_bytes((run / "ppo" / "model.safetensors").read_bytes()[:3000])
    assert main(["generate", "--ckpt", str(broken), "--prompt", "hi"]) == 2
    assert "model.safetensors: a damaged safetensors file" in _one_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--model.vocab_size", "8"], "model.vocab_size=8: too small for this corpus"),
    (["--task.n_rm_prompts", "1"], "config: task.n_rm_prompts: 1 comparison(s); after holding out"),
    (["--data.sft", ""], "config: data.sft='': an empty path"),
    (["--seed", str(2**32)], "config: seed=4294967296: must be >= 0 and <= 4294967295"),
    (["--dist.timeout", "inf"], "argument --dist.timeout: inf must be >= 1 and finite"),
    (["--dist.timeout", "0"], "argument --dist.timeout: 0 must be >= 1"),
    (["--ppo.ptx_coef", "1e30"], "config: ppo.ptx_coef=1e+30: must be >= 0 and <= 100"),
])
def test_mistakes_found_before_any_stage_runs(tmp_path, capsys, args, message):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), *args]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "r" / "pretrain").exists()


def test_preferences_that_are_all_ties_are_refused_before_pretraining(tmp_path, capsys):
    prefs = tmp_path / "p.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"What does the fox eat? ({i})", "chosen": "Berries.",
                                         "rejected": "Berries."}) + "\n" for i in range(12)))
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--data.preferences", str(prefs)]) == 2
    assert "every training pair's two responses are the same tokens" in _one_line(capsys)
    assert not (tmp_path / "r" / "pretrain").exists()


@pytest.mark.parametrize("fraction", ["0", "0.2"])
def test_preferences_that_are_all_skips_say_so_before_pretraining(tmp_path, capsys, fraction):
    prefs = tmp_path / "labels.jsonl"  # what `label` writes when every prompt was skipped
    prefs.write_text("".join(json.dumps({"prompt": f"q{i}?", "responses": ["a", "b"], "ratings": [4, 4],
                                         "skipped": True}) + "\n" for i in range(3)))
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--data.preferences", str(prefs),
                 "--rm.heldout_fraction", fraction]) == 2
    line = _one_line(capsys)
    assert "no row states a preference" in line and "heldout_fraction" not in line
    assert not (tmp_path / "r" / "pretrain").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "f")]) == 2
    assert "--out " in _one_line(capsys)
    assert main(["data", "export", str(tmp_path / "f" / "sub")]) == 2
    assert "data export " in _one_line(capsys)


def test_generate_checks_the_context_before_sampling(tiny_run, capsys):
    assert main(["generate", "--ckpt", str(tiny_run[0] / "ppo"), "--prompt", "hi", "--max-new-tokens", "500"]) == 2
    assert "more than model.max_seq_len=96" in _one_line(capsys)


def test_help_shows_the_given_presets_defaults():
    r = subprocess.run([sys.executable, "-m", "minirlhf", "train", "--preset", "tiny", "--help"], capture_output=True,
                       text=True)
    assert "optimizer steps (default: 20;" in r.stdout and "the tiny preset's" in r.stdout


def test_exported_files_are_readable_by_others(tmp_path):
    from minirlhf.data import write_jsonl

    write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "x.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_collapsed_model_is_reported_not_a_crash(tiny_run, tmp_path, monkeypatch):
    import math

    import minirlhf.evaluate as ev
    from minirlhf.report import _finite

    monkeypatch.setattr(ev, "stream_loss", lambda *a, **k: 800.0)
    run = tiny_run[0]
    out = ev.evaluate_checkpoints({"ppo": run / "ppo"}, rm_dir=None, ref_dir=run / "sft", prompts=["Where is Lima?"],
                                  gold_score=None, corpus_heldout=["The fox eats berries."] * 30,
                                  ec=PRESETS["tiny"]().eval, seq_len=8, seed=0, device=torch.device("cpu"))
    assert out["ppo"]["heldout_ppl"] == math.inf
    assert json.loads(json.dumps(_finite({"ppl": math.inf, "x": [math.nan, 1.0]}))) == {"ppl": None, "x": [None, 1.0]}


def test_ppo_resume_takes_the_new_learning_rate_and_fixed_beta(tiny_run, tmp_path, monkeypatch):
    from minirlhf import optim
    from minirlhf.metrics import Metrics
    from minirlhf.pipeline import load_inputs
    from minirlhf.stages.ppo import run_ppo

    run = tiny_run[0]
    cfg = apply_overrides(PRESETS["tiny"](), {"ppo.iterations": "3", "ppo.save_every": "1", "ppo.lr": "0.01",
                                              "ppo.adaptive_kl": "false"})
    prompts = load_inputs(cfg).ppo_prompts
    real_save = checkpoint.save

    def save_then_die(*a, **k):
        real_save(*a, **k)
        if not k["finished"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(cfg, tmp_path / "ppo", sft_dir=run / "sft", rm_dir=run / "rm", prompts=prompts,
                metrics=Metrics(tmp_path))
    monkeypatch.setattr(checkpoint, "save", real_save)
    seen = []
    real_step = optim.step
    monkeypatch.setattr(optim, "step", lambda opt, *a, **k: (seen.append([g["lr"] for g in opt.param_groups]),
                                                             real_step(opt, *a, **k))[1])
    lower = apply_overrides(cfg, {"ppo.lr": "1e-9", "ppo.critic_lr": "2e-9", "ppo.kl_coef": "0.0"})
    run_ppo(lower, tmp_path / "ppo", sft_dir=run / "sft", rm_dir=run / "rm", prompts=prompts,
            metrics=Metrics(tmp_path), resume=True)
    assert seen and all(lrs == [1e-9, 1e-9, 2e-9, 2e-9] for lrs in seen)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_coef"] for r in rows if "kl_coef" in r][-2:] == [0.0, 0.0]


def test_rankings_resume_with_another_k_is_refused(tiny_run, tmp_path, monkeypatch):
    import minirlhf.stages.rankings as rankings
    from minirlhf.metrics import Metrics
    from minirlhf.pipeline import load_inputs

    run = tiny_run[0]
    cfg = PRESETS["tiny"]()
    inputs = load_inputs(cfg)
    real, calls = rankings.sample_responses, []

    def dies_on_the_third_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rankings, "sample_responses", dies_on_the_third_chunk)
    out = tmp_path / "preferences.jsonl"
    with pytest.raises(KeyboardInterrupt):
        rankings.run_rankings(cfg, out, sft_dir=run / "sft", prompts=inputs.rm_prompts,
                              gold_score=inputs.task.gold_score, annotator_seed=0, metrics=Metrics(tmp_path))
    monkeypatch.undo()
    other = apply_overrides(cfg, {"rm.k": "2"})
    with pytest.raises(ValueError, match=r"started with rm\.k=3, this run asks for 2"):
        rankings.run_rankings(other, out, sft_dir=run / "sft", prompts=inputs.rm_prompts,
                              gold_score=inputs.task.gold_score, annotator_seed=0, metrics=Metrics(tmp_path),
                              resume=True)


def test_long_demonstrations_are_said_to_be_cut(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": "word " * 150, "response": "ok " * (120 if i < 2 else 3)}) + "\n"
                           for i in range(12)))
    from minirlhf.pipeline import check_inputs, load_inputs
    from minirlhf.tokenizer import Tokenizer

    cfg = apply_overrides(PRESETS["tiny"](), {"data.sft": str(sft)})
    inputs = load_inputs(cfg)
    tok = Tokenizer.train(["word ok"] * 100 + inputs.corpus[:100], vocab_size=384)
    check_inputs(cfg, inputs, tok, ("sft",))
    err = capsys.readouterr().err
    assert "12 demonstration(s) longer than model.max_seq_len=96 are cut on the left" in err
    assert "2 of them lose the start of a response" in err


def test_a_stage_from_a_checkpoint_of_another_preset(tiny_run, tmp_path, capsys):
    """`rm --from` a tiny checkpoint under the default (quick) preset: pretraining does not run,
    so quick's pretrain.seq_len=128 beyond the checkpoint's 96 is no reason to refuse; a budget of
    a stage that does run and cannot fit is refused naming the checkpoint."""
    run = tiny_run[0]
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"What does the owl {i} eat?", "chosen": "The owl eats mice.", "rejected": "Lima."}
            for i in range(20)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mine"
    assert main(["rm", "--from", str(run / "sft"), "--data.preferences", str(prefs), "--out", str(out),
                 "--rm.epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["max_seq_len"] == 96
    capsys.readouterr()
    assert main(["rm", "--from", str(run / "sft"), "--data.preferences", str(prefs), "--out", str(tmp_path / "b"),
                 "--rm.max_new_tokens", "100"]) == 2
    line = _one_line(capsys)
    assert f"{run / 'sft'}: --from has model.max_seq_len=96" in line and "rm.max_new_tokens=100" in line, line


def test_ptx_windows_longer_than_the_adopted_context_are_refused_not_cut(tiny_run, tmp_path, capsys):
    """PPO-ptx draws pretrain.seq_len windows: from a checkpoint with a shorter context (tiny's 96
    under the quick preset's 128) the window cannot be cut silently; without PPO-ptx it may be."""
    run = tiny_run[0]
    args = ["ppo", "--from", str(run / "sft"), "--rm", str(run / "rm"), "--ppo.ptx_coef", "0.1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert _one_line(capsys) == (f"error: config: pretrain.seq_len=128 (the PPO-ptx windows, ppo.ptx_coef=0.1) exceeds "
                                 f"the model.max_seq_len=96 of --from ({run / 'sft'}); rerun with --pretrain.seq_len 96 "
                                 f"or less")
    assert not (tmp_path / "a" / "ppo").exists()


def test_a_stage_command_rerun_with_another_input_or_option_is_refused(tiny_run, tmp_path, capsys):
    """Like train: a finished stage of a single-stage command is kept only for the same options and
    the same input checkpoint (its path and its save: a checkpoint saved again in place is another)."""
    run = tiny_run[0]
    out = tmp_path / "s"
    assert main(["sft", "--preset", "tiny", "--from", str(run / "pretrain"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sft", "--preset", "tiny", "--from", str(run / "pretrain"), "--out", str(out)]) == 0
    assert f"[sft] finished earlier, kept: {out / 'sft'}" in capsys.readouterr().out
    assert main(["sft", "--preset", "tiny", "--from", str(run / "pretrain"), "--out", str(out),
                 "--sft.lr", "0.01"]) == 2
    assert "sft: made with sft.lr=0.001, this run asks for 0.01; use another --out" in _one_line(capsys)
    other = tmp_path / "other_base"  # a copy is the same save: the same input
    shutil.copytree(run / "pretrain", other)
    assert main(["sft", "--preset", "tiny", "--from", str(other), "--out", str(out)]) == 0
    assert f"[sft] finished earlier, kept: {out / 'sft'}" in capsys.readouterr().out
    model, tok = checkpoint.load_model_from(other), checkpoint.load_tokenizer(other)
    checkpoint.save(other, stage="pretrain", model=model, tokenizer=tok, step=1, finished=True)  # retrained in place
    assert main(["sft", "--preset", "tiny", "--from", str(other), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert f"made with inputs.--from='save {checkpoint.save_id(run / 'pretrain')}', this run asks for " \
           f"'save {checkpoint.save_id(other)}'" in line, line
    assert main(["train", "--preset", "tiny", "--out", str(out)]) == 2  # and train on a stage command's directory
    assert "made with --from save " in _one_line(capsys)


def test_resuming_with_fewer_steps_than_the_checkpoint_took_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    monkeypatch.setenv("MINIRLHF_FAIL_AT", "pretrain:10")  # killed right after the step-10 save
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--pretrain.save_every", "10"]) == 1
    monkeypatch.delenv("MINIRLHF_FAIL_AT")
    capsys.readouterr()
    assert checkpoint.read_meta(out / "pretrain")["step"] == 10
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--pretrain.save_every", "10",
                 "--pretrain.steps", "5", "--resume"]) == 2
    assert _one_line(capsys) == (f"error: {out / 'pretrain'} (step 10): started with pretrain.steps=20, this run "
                                 f"asks for 5; resume with the options it started with (only learning rates, "
                                 f"save_every and eval_every may change), or delete it to start over")
    assert not checkpoint.read_meta(out / "pretrain")["finished"]


@pytest.mark.parametrize("where, needle", [
    ("user_dir", "holds files minirlhf did not write (notes.md, settings.json); give a new or empty directory"),
    ("checkpoint", "a stage's checkpoint, not a run directory"),
    ("inside_run", "inside the run directory"),
    ("empty_string", "--out: an empty path; leave the option out for the default runs/tiny"),
])
def test_an_out_that_is_not_a_run_directory_is_refused_and_left_alone(tiny_run, tmp_path, capsys, where, needle):
    run = tiny_run[0]
    if where == "user_dir":
        out = tmp_path / "proj"
        out.mkdir()
        (out / "settings.json").write_text('{"my": "settings"}')
        (out / "notes.md").write_text("notes")
    elif where == "checkpoint":
        out = tmp_path / "ckpt"
        shutil.copytree(run / "sft", out)
    elif where == "inside_run":
        out = run / "extra"
    else:
        out = ""
    before = {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()} if out else {}
    assert main(["pretrain", "--preset", "tiny", "--out", str(out)]) == 2
    assert needle in _one_line(capsys)
    if out:
        assert {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()} == before
    assert not (run / "extra").exists()


def test_a_directory_where_the_run_writes_a_file_is_found_before_any_compute(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    (run / "summary.json").unlink()
    (run / "summary.json").mkdir()  # the report would only find it after every stage and the evaluation
    (run / "ppo").rename(tmp_path / "ppo-moved")  # so that PPO would have to run first
    assert main(["train", "--preset", "tiny", "--out", str(run)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {run / 'summary.json'}: a directory, where this run writes a file"), line
    assert not (run / "ppo").exists()


def test_a_refused_rerun_leaves_the_run_directory_as_it_was(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    (run / "config.json").write_text('{"seed": 0}')  # stands for the run's own config.json
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".minirlhf.lock"}
    assert main(["train", "--preset", "tiny", "--out", str(run), "--ppo.lr", "0.5"]) == 2
    assert "made with ppo.lr=" in _one_line(capsys)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".minirlhf.lock"}
    assert after == before
    assert main(["sft", "--preset", "tiny", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()  # a directory the refused command made is gone again


def test_a_stage_that_has_to_run_again_refuses_the_stages_made_from_the_old_one(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    shutil.rmtree(run / "sft")
    assert main(["train", "--preset", "tiny", "--out", str(run)]) == 2
    assert _one_line(capsys) == (f"error: {run / 'preferences.jsonl'}: made from the sft output that has to run again "
                                 f"now; delete {run / 'preferences.jsonl'} (and the stages after it) too, or restore "
                                 f"the sft")
    assert not (run / "sft").exists()  # refused before anything computed


def test_resume_keeps_the_options_it_started_with_but_a_learning_rate(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    monkeypatch.setenv("MINIRLHF_FAIL_AT", "pretrain:10")
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--pretrain.save_every", "10"]) == 1
    monkeypatch.delenv("MINIRLHF_FAIL_AT")
    capsys.readouterr()
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--pretrain.save_every", "10", "--resume",
                 "--model.dim", "64"]) == 2
    assert "started with model.dim=32, this run asks for 64; resume with the options it started with" \
        in _one_line(capsys)
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--pretrain.save_every", "10", "--resume",
                 "--pretrain.lr", "0.001"]) == 0
    assert checkpoint.is_finished(out / "pretrain")
