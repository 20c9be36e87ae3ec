"""End to end on the tiny preset: artefacts, skipping finished stages, resume, user errors."""
import json
import subprocess
import sys

import pytest
import torch

from minirlhf import checkpoint
from minirlhf.cli import main
from minirlhf.config import PRESETS
from minirlhf.pipeline import load_inputs, run_train


def test_train_writes_every_artefact(tiny_run):
    run_dir, summary = tiny_run
    for stage in ("pretrain", "sft", "rm", "ppo"):
        meta = checkpoint.read_meta(run_dir / stage)
        assert meta["finished"] and meta["stage"] == stage
        for f in ("model.safetensors", "config.json", "tokenizer.model", "state.pt"):
            assert (run_dir / stage / f).exists()
    assert (run_dir / "ppo" / "critic.safetensors").exists()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk["gold"]) == {"base", "sft", "ppo"}
    for stage in ("base", "sft", "ppo"):
        assert -4 <= on_disk["gold"][stage]["mean"] <= 4 and on_disk["gold"][stage]["se"] >= 0
    assert 0 <= on_disk["rm_accuracy"]["vs_annotator"] <= 1
    report = (run_dir / "report.md").read_text()
    assert "| ppo |" in report and "gold_by_stage.png" in report
    for png in ("gold_by_stage.png", "ppo_curves.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run_dir / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == PRESETS["tiny"]().task.n_rm_prompts
    assert all(sorted(r["ranking"]) == list(range(3)) for r in rows)
    ppo_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"ppo"' in line]
    for key in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy", "explained_variance",
                "kl_to_ref", "kl_coef", "advantages_mean", "advantages_std", "ratio_mean", "ratio_max",
                "response_len", "truncated_frac", "rm_score", "gold", "time/generate", "time/update"):
        assert key in ppo_rows[-1], key


def test_rerun_skips_finished_stages(tiny_run, capsys):
    run_dir, _ = tiny_run
    outputs = {s: run_dir / s / "model.safetensors" for s in ("pretrain", "sft", "rm", "ppo")}
    outputs["rankings"] = run_dir / "preferences.jsonl"
    before = {s: p.stat().st_mtime_ns for s, p in outputs.items()}
    run_train(PRESETS["tiny"](), run_dir)
    out = capsys.readouterr().out
    for s, p in outputs.items():
        assert f"[{s}] finished earlier, kept" in out
        assert p.stat().st_mtime_ns == before[s]


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tiny_run, tmp_path, monkeypatch):
    run_dir, _ = tiny_run
    model = checkpoint.load_model_from(run_dir / "sft")
    tok = checkpoint.load_tokenizer(run_dir / "sft")
    target = tmp_path / "ckpt"
    checkpoint.save(target, stage="sft", model=model, tokenizer=tok, step=1, finished=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def half_written(path, data):  # dies after writing part of a file of the new checkpoint
        open(path, "wb").write(b"garbage")
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save", lambda self, path: half_written(path, None))
    with pytest.raises(OSError):
        checkpoint.save(target, stage="sft", model=model, tokenizer=tok, step=2, finished=False)
    assert checkpoint.read_meta(target)["step"] == 1
    again = checkpoint.load_model_from(target)
    assert not torch.equal(again.embed.weight, model.embed.weight)

    # a crash between the two renames: only <dir>.old holds a checkpoint, and it still loads
    monkeypatch.undo()
    (target).rename(tmp_path / "ckpt.old")
    assert checkpoint.read_meta(target)["step"] == 1
    assert checkpoint.load_tokenizer(target).encode("fox")


def test_a_checkpoint_is_readable_by_others_and_each_save_has_its_own_id(tiny_run, tmp_path):
    import os
    import stat

    run_dir, _ = tiny_run
    model, tok = checkpoint.load_model_from(run_dir / "sft"), checkpoint.load_tokenizer(run_dir / "sft")
    old = os.umask(0o022)
    try:
        checkpoint.save(tmp_path / "a", stage="sft", model=model, tokenizer=tok, step=1, finished=True,
                        extra_models={"critic": model})
    finally:
        os.umask(old)
    for f in (tmp_path / "a").iterdir():  # safetensors alone writes 0600: another account could not load it
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
    first = checkpoint.save_id(tmp_path / "a")
    checkpoint.save(tmp_path / "a", stage="sft", model=model, tokenizer=tok, step=1, finished=True)
    assert first and len(first) == 32 and checkpoint.save_id(tmp_path / "a") not in (None, first)
    checkpoint.update_info(tmp_path / "a", note="kept")  # info added later: the same weights, the same id
    assert checkpoint.save_id(tmp_path / "a") == checkpoint.read_meta(tmp_path / "a")["save_id"]


def test_an_unreadable_weights_file_is_named_as_unreadable(tiny_run, tmp_path):
    import shutil

    run_dir, _ = tiny_run
    shutil.copytree(run_dir / "ppo", tmp_path / "ppo")
    (tmp_path / "ppo" / "critic.safetensors").unlink()
    (tmp_path / "ppo" / "critic.safetensors").mkdir()  # unreadable as a file (root reads past chmod 000)
    with pytest.raises(ValueError, match=r"critic\.safetensors: cannot read it \(Is a directory\)"):
        checkpoint.load_model_from(tmp_path / "ppo", "critic")


def test_ppo_never_calls_the_gold_function(tiny_run, tmp_path, monkeypatch):
    """PPO's reward is the learned RM: with every gold entry point raising, training still runs."""
    from minirlhf.data import gold, task as task_mod
    from minirlhf.metrics import Metrics
    from minirlhf.stages.ppo import run_ppo

    run_dir, _ = tiny_run
    prompts = load_inputs(PRESETS["tiny"]()).ppo_prompts

    def forbidden(*a, **k):
        raise AssertionError("the gold function was called during PPO training")

    monkeypatch.setattr(gold, "gold_breakdown", forbidden)
    monkeypatch.setattr(task_mod, "gold_breakdown", forbidden)
    monkeypatch.setattr(task_mod.Task, "gold_score", forbidden)
    out = run_ppo(PRESETS["tiny"](), tmp_path / "ppo", sft_dir=run_dir / "sft", rm_dir=run_dir / "rm",
                  prompts=prompts, metrics=Metrics(tmp_path))
    assert checkpoint.is_finished(out)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "minirlhf", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "--ppo.kl_coef", "lots"], "--ppo.kl_coef: expected float, got 'lots'"),
    (["train", "--ppo.nope", "1"], "unrecognized arguments: --ppo.nope"),
    (["train", "--rm.k", "12"], "config: rm.k=12: must be >= 2 and <= 9"),
    (["train", "--ppo.temperature", "0"], "config: ppo.temperature=0.0: must be > 0"),
    (["train", "--ppo.lr", "nan"], "config: ppo.lr=nan: must be > 0"),
    (["train", "--ppo.minibatch_size", "999"], "config: ppo.minibatch_size=999: must be at most ppo.batch_size=128"),
    (["generate", "--ckpt", "/nonexistent", "--prompt", "hi"], "/nonexistent: no checkpoint here"),
])
def test_user_mistakes_get_one_line_and_exit_2(args, message):
    r = _cli(*args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr and "Traceback" not in r.stderr


def test_bad_data_file_is_reported_before_any_compute(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    r = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--data.sft", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:2: response:" in r.stderr
    assert not (tmp_path / "run" / "pretrain").exists()


def test_generate_and_help(tiny_run):
    run_dir, _ = tiny_run
    assert main(["generate", "--ckpt", str(run_dir / "ppo"), "--prompt", "What does the fox eat?",
                 "--max-new-tokens", "5"]) == 0
    r = _cli("train", "--help")
    assert r.returncode == 0 and "--ppo.kl_coef" in r.stdout and "initial beta of the per-token KL penalty" in r.stdout


def test_data_export(tmp_path):
    assert main(["data", "export", str(tmp_path / "d"), "--preset", "tiny"]) == 0
    from minirlhf.data import read_preferences, read_sft
    assert read_sft(tmp_path / "d" / "sft.jsonl") and read_preferences(tmp_path / "d" / "preferences.jsonl")
