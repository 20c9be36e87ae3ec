"""Every numeric field's valid range, boundary by boundary, from a table written here by hand
(not read from the config's own metadata), and the relations between fields."""
import dataclasses
import math

import pytest

from minirlhf import config as C
from minirlhf.cli import apply_overrides, main

# field: (values that must be accepted, values that must be refused). Boundaries on both sides.
RANGES = {
    "seed": ([0, 7, 2**32 - 1], [-1, 2**32]),
    "model.vocab_size": ([384], [7]),
    "model.dim": ([128], [1]),
    "model.n_layers": ([1], [0]),
    "model.n_heads": ([4], [0]),
    "model.n_kv_heads": ([1, 2], [0]),
    "model.ffn_dim": ([1], [0]),
    "model.max_seq_len": ([128, 400], [3]),
    "model.rope_theta": ([1e-3], [0.0, -1.0, math.inf]),
    "model.norm_eps": ([1e-9], [0.0]),
    "model.init_std": ([1e-4], [0.0]),
    "model.head_dim": ([0, 32], [-2]),
    "model.rope_scaling": (["none", "llama3"], ["yarn"]),
    "model.rope_factor": ([0.5], [0.0]),
    "model.rope_low_freq_factor": ([0.5], [0.0]),
    "model.rope_high_freq_factor": ([8.0], [0.0]),
    "model.rope_original_max_len": ([1], [0]),
    "task.seed": ([0, 2**32 - 1], [-1, 2**32]),
    "task.base_alignment": ([0.0, 1.0], [-0.01, 1.01]),
    "task.dialogue_fraction": ([0.0, 1.0], [-0.01, 1.01]),
    "task.n_corpus_docs": ([1], [0]),
    "task.n_sft_demos": ([1], [0]),
    "task.n_rm_prompts": ([1], [0]),
    "task.n_ppo_prompts": ([1], [0]),
    "task.n_eval_prompts": ([1], [0]),
    "task.annotator_noise": ([0.0], [-0.1, math.nan]),
    "task.n_sft_heldout": ([1], [0]),
    "task.n_corpus_heldout": ([1], [0]),
    "task.demo_wrong": ([0.0, 1.0], [-0.1, 1.1]),
    "task.demo_off_form": ([0.0, 1.0], [-0.1, 1.1]),
    "task.demo_filler": ([0.0, 1.0], [-0.1, 1.1]),
    "pretrain.steps": ([1], [0]),
    "pretrain.batch_size": ([1], [0]),
    "pretrain.seq_len": ([2, 128], [1, 129]),          # at most model.max_seq_len = 128
    "pretrain.lr": ([1e-9], [0.0, math.nan]),
    "pretrain.min_lr_ratio": ([0.0, 1.0], [-0.1, 1.1]),
    "pretrain.warmup_steps": ([0], [-1]),
    "pretrain.weight_decay": ([0.0], [-0.1]),
    "pretrain.grad_clip": ([1e-3, None], [0.0]),
    "pretrain.eval_every": ([1], [0]),
    "pretrain.eval_batches": ([1], [0]),
    "pretrain.save_every": ([1], [0]),
    "sft.epochs": ([1], [0]),
    "sft.samples": ([1, None], [0]),
    "sft.batch_size": ([1], [0]),
    "sft.lr": ([1e-9], [0.0]),
    "sft.warmup_steps": ([0], [-1]),
    "sft.weight_decay": ([0.0], [-1e-3]),
    "sft.grad_clip": ([1e-3, None], [0.0]),
    "sft.eval_every": ([1], [0]),
    "sft.patience": ([1, None], [0]),
    "sft.save_every": ([1], [0]),
    "rm.k": ([2, 9], [1, 10]),
    "rm.temperature": ([1e-3], [0.0]),
    "rm.max_new_tokens": ([1, 126], [0, 127]),        # + prompt + EOS within model.max_seq_len = 128
    "rm.sample_batch_size": ([1], [0]),
    "rm.epochs": ([1], [0]),
    "rm.batch_size": ([1], [0]),
    "rm.lr": ([1e-9], [0.0]),
    "rm.warmup_steps": ([0], [-1]),
    "rm.weight_decay": ([0.0], [-1e-3]),
    "rm.grad_clip": ([1e-3, None], [0.0]),
    "rm.heldout_fraction": ([0.0, 0.99], [-0.1, 1.0]),
    "rm.save_every": ([1], [0]),
    "ppo.iterations": ([1], [0]),
    "ppo.batch_size": ([32], [1, 31]),                 # >= 2, and >= ppo.minibatch_size = 32
    "ppo.minibatch_size": ([1, 128], [0, 129]),        # at most ppo.batch_size = 128
    "ppo.ppo_epochs": ([1], [0]),
    "ppo.max_new_tokens": ([1, 126], [0, 127]),
    "ppo.temperature": ([1e-3], [0.0, -1.0]),
    "ppo.lr": ([1e-9], [0.0]),
    "ppo.critic_lr": ([1e-9], [0.0]),
    "ppo.clip_eps": ([0.01, 0.99], [0.0, 1.0]),
    "ppo.value_clip": ([1e-3, None], [0.0]),
    "ppo.entropy_coef": ([0.0], [-1e-3]),
    "ppo.gamma": ([0.0, 1.0], [-0.1, 1.1]),
    "ppo.lam": ([0.0, 1.0], [-0.1, 1.1]),
    "ppo.kl_coef": ([0.0], [-1e-3, math.inf]),
    "ppo.kl_target": ([1e-3], [0.0]),
    "ppo.kl_horizon": ([1], [0]),
    "ppo.truncation_penalty": ([0.0, -5.0], [0.1]),
    "ppo.reward_clip": ([1e-3, None], [0.0]),
    "ppo.max_approx_kl": ([1e-3, None], [0.0]),
    "ppo.grad_clip": ([1e-3, None], [0.0]),
    "ppo.bookkeeping": (["cpp", "torch"], ["numpy"]),
    "ppo.eval_every": ([1, None], [0]),
    "ppo.eval_prompts": ([1], [0]),
    "ppo.save_every": ([1], [0]),
    "ppo.ptx_coef": ([0.0, 27.8], [-1e-3]),
    "ppo.ptx_batch_size": ([1], [0]),
    "ppo.monitor_window": ([2], [1]),
    "ppo.monitor_gold_drop": ([1e-3], [0.0]),
    "ppo.monitor_entropy_ratio": ([0.01, 0.99], [0.0, 1.0]),
    "ppo.monitor_kl_accel": ([1.01], [1.0]),
    "ppo.monitor_kl_growth": ([1e-3], [0.0]),
    "eval.max_new_tokens": ([1, 126], [0, 127]),
    "eval.temperature": ([0.0, 2.0], [-0.1]),        # 0 = greedy
    "eval.batch_size": ([1], [0]),
    "eval.samples_shown": ([0], [-1]),
    "device": (["cpu", "auto"], ["tpu"]),
}


def _set(name, value):
    section, _, key = name.rpartition(".")
    return C.replace(C.PRESETS["quick"](), **({section: {key: value}} if section else {key: value}))


def test_the_table_covers_every_field_with_a_range():
    ranged = {"seed", "device"}
    for section in C.SECTIONS:
        for f in dataclasses.fields(C.section_class(section)):
            if f.type in ("int", "float", "int | None", "float | None") or "choices" in C.field_range(section, f):
                ranged.add(f"{section}.{f.name}")
    assert ranged == set(RANGES)


@pytest.mark.parametrize("name", sorted(RANGES))
def test_field_boundaries(name):
    ok, bad = RANGES[name]
    for v in ok:
        _set(name, v)
    for v in bad:
        with pytest.raises(ValueError, match=rf"{name.split('.')[-1]}"):
            _set(name, v)


def test_messages_name_the_field_and_the_range():
    with pytest.raises(ValueError, match=r"^config: ppo\.clip_eps=1\.0: must be > 0 and < 1$"):
        _set("ppo.clip_eps", 1.0)
    with pytest.raises(ValueError, match=r"^config: ppo\.minibatch_size=129: must be at most ppo\.batch_size=128$"):
        _set("ppo.minibatch_size", 129)


def test_none_is_the_off_switch_from_the_command_line():
    cfg = apply_overrides(C.PRESETS["quick"](), {"ppo.value_clip": "none", "sft.patience": "None"})
    assert cfg.ppo.value_clip is None and cfg.sft.patience is None
    with pytest.raises(ValueError, match="--ppo.lr: expected float, got 'none'"):
        apply_overrides(C.PRESETS["quick"](), {"ppo.lr": "none"})


def test_every_preset_is_valid():
    for make in C.PRESETS.values():
        C.validate(make())


def test_config_json_round_trip():
    cfg = apply_overrides(C.PRESETS["tiny"](), {"ppo.reward_clip": "2.5", "seed": "3"})
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_a_bad_value_exits_2_before_any_compute(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--eval.temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: config: eval.temperature=-1.0: must be >= 0"
    assert not (tmp_path / "r").exists()
