"""kill -9 at any point of `train`, then --resume: the same weights as an uninterrupted run.

Each test starts from a copy of the reference run's earlier stages, kills the process at a
step of one stage (MINIRLHF_KILL_AT, see minirlhf/loop.py) between two of its resume
checkpoints, resumes, and compares every later artefact with the reference run's."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ARGS = ["--preset", "tiny", "--ppo.iterations", "3", "--ppo.save_every", "2"]
# stage: (the kill point, the outputs the stage and every later one write)
ORDER = ["pretrain", "sft", "rankings", "rm", "ppo", "eval"]
OUTPUTS = {"pretrain": ["tokenizer.model", "pretrain"], "sft": ["sft"], "rankings": ["preferences.jsonl"],
           "rm": ["rm"], "ppo": ["ppo"], "eval": []}
KILL_AT = {"pretrain": "pretrain:13", "sft": "sft:6", "rankings": "rankings:3", "rm": "rm:3", "ppo": "ppo:3",
           "eval": "eval:1"}


def _train(out, *extra, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MINIRLHF_KILL_AT", None)
    if kill_at:
        env["MINIRLHF_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "minirlhf", "train", *ARGS, "--out", str(out), *extra],
                           env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    r = _train(out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _same_artefacts(a, b, stages):
    for stage in stages:
        for name in OUTPUTS[stage]:
            if name.endswith(".jsonl") or name.endswith(".model"):
                assert (a / name).read_bytes() == (b / name).read_bytes(), name
                continue
            for f in sorted((a / name).glob("*.safetensors")):
                x, y = load_file(f), load_file(b / name / f.name)
                assert x.keys() == y.keys()
                for k in x:
                    assert (x[k] == y[k]).all(), f"{name}/{f.name}: {k} differs"
    ga, gb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert ga["gold"] == gb["gold"] and ga["rm_score"] == gb["rm_score"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ORDER)
def test_kill_9_then_resume_gives_the_uninterrupted_weights(reference, tmp_path, stage):
    run = tmp_path / "run"
    run.mkdir()
    for earlier in ORDER[:ORDER.index(stage)]:  # the stages before this one, finished as in the reference
        for name in OUTPUTS[earlier]:
            src = reference / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, run / name)
    killed = _train(run, kill_at=KILL_AT[stage])
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = _train(run)  # without --resume: refused in one line, nothing changed
    if stage not in ("eval",):
        errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
        assert again.returncode == 2 and len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in again.stderr
    resumed = _train(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_artefacts(reference, run, ORDER[ORDER.index(stage):])
