"""--init-from: a Hugging Face directory or GGUF file is the run's base; every stage and the
evaluation run on it (tiny random models built offline)."""
import json

import pytest
import torch

from minirlhf import checkpoint
from minirlhf.cli import main

from .conftest import build_hf_model

RUN = ["--preset", "tiny", "--ppo.iterations", "1", "--model.max_seq_len", "96", "--task.n_rm_prompts", "12"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-llama")
    build_hf_model("llama-tied", d)
    return d


def test_train_from_a_hugging_face_directory(hf_llama, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(run), "--init-from", str(hf_llama)]) == 0
    meta = checkpoint.read_meta(run / "pretrain")
    assert meta["stage"] == "import" and meta["info"]["init_from"] == str(hf_llama)
    assert meta["model"]["dim"] == 64 and meta["model"]["max_seq_len"] == 96
    for stage in ("sft", "rm", "ppo"):
        assert checkpoint.is_finished(run / stage)
        assert checkpoint.read_meta(run / stage)["model"] == meta["model"]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["gold"]) == {"base", "sft", "ppo"}
    # the imported weights are the base's, unchanged
    from minirlhf.interop import load_pretrained
    imported, _ = load_pretrained(hf_llama, max_seq_len=96)
    base = checkpoint.load_model_from(run / "pretrain")
    for (name, a), b in zip(imported.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name
    # rerun: kept, not imported again
    mtime = (run / "pretrain" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", *RUN, "--out", str(run), "--init-from", str(hf_llama)]) == 0
    assert (run / "pretrain" / "model.safetensors").stat().st_mtime_ns == mtime


def test_single_stages_and_eval_from_a_pretrained_model(hf_llama, tmp_path):
    run = tmp_path / "run"
    assert main(["sft", *RUN, "--out", str(run), "--init-from", str(hf_llama)]) == 0
    assert checkpoint.is_finished(run / "sft")
    FROM = [a for a in RUN if a not in ("--model.max_seq_len", "96")]  # --from: the checkpoint's own shape
    assert main(["rm", *FROM, "--out", str(run), "--from", str(run / "sft")]) == 0
    assert main(["ppo", *RUN, "--out", str(tmp_path / "run2"), "--init-from", str(hf_llama),
                 "--rm", str(run / "rm")]) == 0
    assert main(["eval", *RUN, "--out", str(tmp_path / "ev"), "--init-from", str(hf_llama),
                 "--ckpt", str(tmp_path / "run2" / "ppo"), "--rm-ckpt", str(run / "rm")]) == 0
    out = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert len(out) == 2 and all("kl_mean" in v for v in out.values())


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--init-from", "{hf}"], "pretrain: --init-from gives the base model; there is nothing to pretrain"),
    (["sft", "--init-from", "{hf}", "--from", "/x"], "sft: --init-from gives the base model; give either"),
    (["sft"], "sft: give --from DIR"),
    (["sft", "--from", "/x", "--model.dim", "64"], "--model.dim: the model comes from --from, and its shape is"),
    (["train", "--init-from", "{hf}", "--model.dim", "64"], "--model.dim: the model comes from --init-from"),
    (["train", "--init-from", ""], "config: init_from='': an empty path"),
    (["train", "--init-from", "/no/such/model"], "/no/such/model: no such file or directory"),
])
def test_mistakes_are_one_line(hf_llama, tmp_path, capsys, args, message):
    args = [a.format(hf=hf_llama) for a in args]
    assert main([*args, "--preset", "tiny", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
