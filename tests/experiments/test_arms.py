"""Arms as run directories: the key of each stage's output, sharing finished stages between arms
by hard links (with their metrics), and refusing a directory that holds another configuration."""
import json
import os

import pytest

from minirlhf.config import PRESETS, replace
from minirlhf.experiments.arms import (ARM_FILE, Arm, link_shared_stages, prepare_arm_dir, run_arms, stage_keys,
                                       stages_of)

TINY = PRESETS["tiny"]()


def changed(a, b):
    ka, kb = stage_keys(a), stage_keys(b)
    return [s for s in ka if ka[s] != kb[s]]


def test_stage_keys_follow_what_each_stage_reads():
    assert changed(TINY, replace(TINY, ppo={"kl_coef": 0.0})) == ["ppo"]
    assert changed(TINY, replace(TINY, eval={"temperature": 0.5})) == ["ppo"]
    assert changed(TINY, replace(TINY, rm={"lr": 1e-3})) == ["rm", "ppo"]  # the rankings do not read it
    assert changed(TINY, replace(TINY, rm={"k": TINY.rm.k + 1})) == ["rankings", "rm", "ppo"]
    assert changed(TINY, replace(TINY, sft={"samples": 3})) == ["sft", "rankings", "rm", "ppo"]
    assert changed(TINY, replace(TINY, skip_sft=True)) == ["sft", "rankings", "rm", "ppo"]
    assert changed(TINY, replace(TINY, data={"preferences": "x.jsonl"})) == ["rankings", "rm", "ppo"]
    for other in (replace(TINY, seed=1), replace(TINY, task={"base_alignment": 0.8}), replace(TINY, pretrain={"steps": 3})):
        assert changed(TINY, other) == ["pretrain", "sft", "rankings", "rm", "ppo"]
    assert stages_of(TINY) == ("pretrain", "sft", "rankings", "rm", "ppo")
    assert stages_of(replace(TINY, skip_sft=True, data={"preferences": "x.jsonl"})) == ("pretrain", "rm", "ppo")


def fake_arm(pool, exp, name, cfg, finished=("pretrain", "sft", "rankings")):
    """An arm directory whose listed stages look finished (a checkpoint config.json / the rankings file)."""
    d = pool / exp / "arms" / name
    prepare_arm_dir(Arm(name, cfg.seed, cfg), d)
    lines = []
    for s in finished:
        if s == "rankings":
            (d / "preferences.jsonl").write_text('{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}\n')
        else:
            (d / s).mkdir()
            (d / s / "config.json").write_text(json.dumps({"stage": s, "finished": True, "step": 1}))
            (d / s / "model.safetensors").write_bytes(b"weights of " + s.encode())
        lines.append(json.dumps({"stage": s, "step": 1, "loss": 1.0}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "wall_times.json").write_text(json.dumps({s: 10.0 for s in finished}))
    return d


def test_link_shared_stages_hard_links_the_longest_shared_prefix(tmp_path):
    fake_arm(tmp_path, "kl-sweep", "a-s0", TINY, finished=("pretrain",))
    donor = fake_arm(tmp_path, "ptx", "b-s0", TINY)
    cfg = replace(TINY, ppo={"kl_coef": 0.0})          # shares everything but PPO
    mine = tmp_path / "kl-sweep" / "arms" / "c-s0"
    prepare_arm_dir(Arm("c", 0, cfg), mine)
    assert link_shared_stages(cfg, mine, tmp_path) == ["pretrain", "sft", "rankings"]
    for f in ("pretrain/model.safetensors", "sft/config.json", "preferences.jsonl"):
        assert os.path.samefile(mine / f, donor / f)
    rows = [json.loads(line) for line in (mine / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "sft", "rankings"]
    assert json.loads((mine / "wall_times.json").read_text()) == {"pretrain": 10.0, "sft": 10.0, "rankings": 10.0}
    assert not list(mine.glob("*.linking"))
    # another SFT: only the base is shared; a different seed: nothing
    light = replace(TINY, sft={"samples": 3})
    other = tmp_path / "sft-ablation" / "arms" / "light-s0"
    prepare_arm_dir(Arm("light", 0, light), other)
    assert link_shared_stages(light, other, tmp_path) == ["pretrain"]
    seed1 = replace(TINY, seed=1)
    third = tmp_path / "kl-sweep" / "arms" / "c-s1"
    prepare_arm_dir(Arm("c", 1, seed1), third)
    assert link_shared_stages(seed1, third, tmp_path) == []


def test_an_arms_own_unfinished_stage_is_resumed_not_replaced(tmp_path):
    fake_arm(tmp_path, "ptx", "b-s0", TINY)
    mine = tmp_path / "ptx" / "arms" / "c-s0"
    prepare_arm_dir(Arm("c", 0, TINY), mine)
    (mine / "pretrain").mkdir()
    (mine / "pretrain" / "config.json").write_text(json.dumps({"stage": "pretrain", "finished": True, "step": 1}))
    (mine / "sft").mkdir()
    (mine / "sft" / "config.json").write_text(json.dumps({"stage": "sft", "finished": False, "step": 3}))
    assert link_shared_stages(TINY, mine, tmp_path) == []
    assert json.loads((mine / "sft" / "config.json").read_text())["finished"] is False


def test_an_arm_directory_of_another_configuration_is_refused(tmp_path):
    d = tmp_path / "x" / "arms" / "a-s0"
    prepare_arm_dir(Arm("a", 0, TINY), d)
    prepare_arm_dir(Arm("a", 0, TINY), d)  # the same configuration again: fine
    with pytest.raises(ValueError, match=r"another configuration \(ppo.kl_coef: 0.3 there, 0.0 now\)"):
        prepare_arm_dir(Arm("a", 0, replace(TINY, ppo={"kl_coef": 0.0})), d)


def test_finished_arms_are_reused_and_the_rest_run_in_order(tmp_path, capsys):
    arms = [Arm(f"v{i}", 0, replace(TINY, ppo={"kl_coef": 0.1 * i}), {"i": i}) for i in range(3)]
    exp = tmp_path / "e"
    ran = []

    def run(arm, d):
        ran.append(arm.variant)
        if arm.variant == "v1" and len(ran) == 2:
            raise KeyboardInterrupt  # the experiment is interrupted in its second arm

    measure = lambda arm, d: {"x": arm.params["i"] * 1.5}  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run_arms("e", arms, exp, tmp_path, run, measure)
    assert (exp / "arms" / "v0-s0" / ARM_FILE).exists() and not (exp / "arms" / "v1-s0" / ARM_FILE).exists()
    recs = run_arms("e", arms, exp, tmp_path, run, measure)
    assert ran == ["v0", "v1", "v1", "v2"]
    assert [r["reused"] for r in recs] == [True, False, False]
    assert [r["numbers"]["x"] for r in recs] == [0.0, 1.5, 3.0] and recs[1]["dir"] == "arms/v1-s0"
    out = capsys.readouterr().out
    assert "arm 1/3 v0, seed 0: finished earlier, reused" in out and "arm 3/3 v2, seed 0: running" in out


def test_a_finished_arm_measured_with_other_options_is_measured_again_not_retrained(tmp_path, capsys):
    """best-of-n's --n-max changes what the arm measures, not its configuration: a finished arm
    measured with another n_max is measured again (its training kept), one with the same is reused."""
    arm = Arm("recipe", 0, TINY)
    exp, calls = tmp_path / "e", []

    def run(a, d):
        calls.append("run")

    def measure(a, d):
        calls.append("measure")
        return {"n": len(calls)}
    first = run_arms("e", [arm], exp, tmp_path, run, measure, {"n_max": 8})
    assert calls == ["run", "measure"] and first[0]["measured_with"] == {"n_max": 8}
    assert first[0]["processes"] == 1  # one process: no torchrun
    again = run_arms("e", [arm], exp, tmp_path, run, measure, {"n_max": 16})
    assert calls == ["run", "measure", "measure"]
    assert again[0]["numbers"] == {"n": 3} and again[0]["measured_with"] == {"n_max": 16} and again[0]["reused"]
    assert again[0]["wall_s"] >= first[0]["wall_s"] and again[0]["processes"] == 1
    on_disk = json.loads((exp / "arms" / "recipe-s0" / ARM_FILE).read_text())
    assert on_disk["numbers"] == {"n": 3} and on_disk["measured_with"] == {"n_max": 16}
    assert "measured with n_max 8; measuring it again with n_max 16" in capsys.readouterr().out
    assert run_arms("e", [arm], exp, tmp_path, run, measure, {"n_max": 16})[0]["numbers"] == {"n": 3}
    assert len(calls) == 3


def test_an_arm_json_of_before_measured_with_is_reused_where_nothing_is_measured_otherwise(tmp_path):
    arm = Arm("v", 0, TINY)
    d = tmp_path / "e" / "arms" / "v-s0"
    prepare_arm_dir(arm, d)
    (d / ARM_FILE).write_text(json.dumps({"variant": "v", "seed": 0, "params": {}, "dir": "arms/v-s0",
                                          "numbers": {"x": 1}, "wall_s": 3.0}))
    never = lambda a, d: pytest.fail("a finished arm was run or measured again")  # noqa: E731
    rec = run_arms("e", [arm], tmp_path / "e", tmp_path, never, never)[0]
    assert rec["numbers"] == {"x": 1} and rec["processes"] is None and rec["reused"]
