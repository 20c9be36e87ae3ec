"""A new user's mistakes, each caught in one line (exit 2) before anything is created or computed:
option bounds, arm directories of every experiment (other configurations, unreadable files, a file
in the way, two arms in one directory), β that the sweep cannot spread; a moved experiments
directory reruns with its arms kept; the user's options recorded and stated; best-of-n's pool drawn
in batches; the README renderer's bad experiment.json files named."""
import json
import math
import shutil
from fractions import Fraction
from math import comb

import pytest

from minirlhf.cli import main
from minirlhf.config import PRESETS, replace
from minirlhf.experiments import best_of_n, readme
from minirlhf.experiments.arms import (ARM_FILE, CONFIG_FILE, Arm, check_arms, prepare_arm_dir, run_arms,
                                       stage_keys)
from minirlhf.experiments.definitions import EXPERIMENTS
from minirlhf.experiments.runner import ALL_ORDER, experiment_config, plan, setting_text
from minirlhf.experiments.stats import best_of_n_expectation
from minirlhf.pipeline import STAGES_FILE

TINY = PRESETS["tiny"]()
SMOKE = experiment_config(TINY, True)


def one_line_error(capsys, argv, *needles, entry=main):
    assert entry(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def no_compute(monkeypatch):
    """Any arm that starts training or measuring fails the test."""
    from minirlhf.experiments import definitions

    def never(*a, **k):
        pytest.fail("an arm computed before every check passed")
    monkeypatch.setattr(definitions, "run_train", never)
    monkeypatch.setattr(definitions, "run_numbers", never)
    monkeypatch.setattr(definitions, "run_best_of_n", never)


def arm_dirs(name, out, cfg=SMOKE, seeds=1):
    return [out / name / "arms" / a.dirname for a in plan(name, cfg, out, seeds=seeds)[2]]


# ---------------------------------------------------------------- 1, 8: bounded options
@pytest.mark.parametrize("argv, needle", [
    (["best-of-n", "--n-max", "1000000000"], "argument --n-max: 1000000000 must be >= 2 and <= 4096"),
    (["best-of-n", "--n-max", "4097"], "argument --n-max: 4097 must be >= 2 and <= 4096"),
    (["kl-sweep", "--seeds", "100000000"], "argument --seeds: 100000000 must be >= 1 and <= 100"),
    (["iterate", "--rounds", "21"], "argument --rounds: 21 must be >= 2 and <= 20"),
    (["kl-sweep", "--seed", "4294967295", "--seeds", "2"],
     "--seed 4294967295 --seeds 2: the arms would use seeds 4294967295..4294967296; every seed must be between 0 "
     "and 4294967295"),
    (["kl-sweep", "--seed", "4294967290", "--seeds", "7"], "seeds 4294967290..4294967296"),
    (["ptx", "--init-from", "/nonexistent/model.gguf"], "--init-from /nonexistent/model.gguf: no such file or directory"),
])
def test_bounds_are_one_line_before_anything(tmp_path, capsys, no_compute, argv, needle):
    out = tmp_path / "exp"
    one_line_error(capsys, ["experiment", *argv, "--smoke", "--out", str(out)], needle)
    assert not out.exists()


def test_best_of_n_draws_the_pool_in_batches_and_keeps_only_scores(monkeypatch):
    """Each sampling call asks for at most batch_size sequences; the scores kept per prompt are
    those of its n_max samples in the order drawn (reference: the same fake sampler, drawn whole)."""
    calls, drawn = [], []

    def fake_sample(policy, tok, prompts, *, n, seed, batch_size, **kw):
        calls.append(len(prompts) * n)
        out = [[f"{p}|{seed}|{i}|{j}" for j in range(n)] for i, p in enumerate(prompts)]
        drawn.extend(r for pool in out for r in pool)
        return out

    def fake_score(rm, tok, prompts, texts, max_len):
        import torch
        return torch.tensor([float(sum(map(ord, t)) % 97) for t in texts])

    monkeypatch.setattr(best_of_n, "sample_responses", fake_sample)
    monkeypatch.setattr(best_of_n, "score_texts", fake_score)
    prompts = ["a", "bb", "ccc"]
    gold = lambda p, r: float(len(r) + len(p))  # noqa: E731
    rm, golds = best_of_n.sample_scores(None, None, None, prompts, n_max=10, gold_score=gold, max_new_tokens=4,
                                        temperature=1.0, batch_size=4, max_seq_len=32, seed=5)
    assert max(calls) <= 4 and sum(calls) == 30 and len(calls) == math.ceil(30 / 4)
    assert [len(x) for x in rm] == [10, 10, 10] and [len(x) for x in golds] == [10, 10, 10]
    by_prompt = {p: [r for r in drawn if r.startswith(p + "|")] for p in prompts}
    for i, p in enumerate(prompts):
        assert rm[i] == [float(sum(map(ord, r)) % 97) for r in by_prompt[p]]
        assert golds[i] == [float(len(r) + len(p)) for r in by_prompt[p]]
    assert len(set(drawn)) == 30  # every batch seeded apart: no sample drawn twice


def test_best_of_n_of_a_large_pool_is_the_exact_ratio():
    """C(1500, 700) has hundreds of digits: the weights must not overflow; reference: exact fractions."""
    N, n = 1500, 700
    rewards = [((i * 7919) % 1501) / 10 for i in range(N)]
    values = [((i * 104729) % 89) / 8 for i in range(N)]
    order = sorted(range(N), key=lambda i: rewards[i])
    exact = sum(Fraction(comb(i, n - 1)) * Fraction(values[order[i]]) for i in range(n - 1, N)) / comb(N, n)
    assert best_of_n_expectation(rewards, values, n) == pytest.approx(float(exact), rel=1e-12)


# ---------------------------------------------------------------- 2, 7: arm directories before compute
def test_a_wrong_arm_directory_of_the_last_arm_is_found_before_the_first_computes(tmp_path, capsys, no_compute):
    out = tmp_path / "exp"
    last = arm_dirs("kl-sweep", out)[-1]
    last.mkdir(parents=True)
    (last / CONFIG_FILE).write_text(json.dumps({**json.loads(json.dumps(_dict(SMOKE))), "seed": 7}))
    one_line_error(capsys, ["experiment", "kl-sweep", "--smoke", "--out", str(out)],
                   f"{last / CONFIG_FILE}: the arm's directory holds a run of another configuration (seed: 7 there")
    assert sorted(p.name for p in (out / "kl-sweep" / "arms").iterdir()) == [last.name]


def test_an_arm_of_another_preset_says_which(tmp_path, capsys, no_compute):
    out = tmp_path / "exp"
    last = arm_dirs("kl-sweep", out)[-1]
    last.mkdir(parents=True)
    (last / CONFIG_FILE).write_text(json.dumps(_dict(SMOKE)))  # what `--smoke` (the tiny preset) wrote there
    one_line_error(capsys, ["experiment", "kl-sweep", "--out", str(out)],  # now the quick preset
                   f"{last / CONFIG_FILE}: the arm's directory holds a run of another configuration (made with "
                   f"--preset tiny; ")


def test_all_checks_every_experiments_arms_before_anything(tmp_path, capsys, no_compute):
    out = tmp_path / "exp"
    last = arm_dirs(ALL_ORDER[-1], out)[-1]
    last.mkdir(parents=True)
    (last / ARM_FILE).write_text("{}")
    one_line_error(capsys, ["experiment", "all", "--smoke", "--out", str(out)], f"{last / ARM_FILE}: field ")
    assert sorted(p.name for p in out.iterdir()) == [ALL_ORDER[-1]]  # nothing made for the others


def _dict(cfg):
    from minirlhf.config import to_dict
    return to_dict(cfg)


@pytest.mark.parametrize("damage, where, needle", [
    ("arms-file", "arms", "cannot make this directory (a file is in the way"),
    ("truncated-arm", ARM_FILE, ": line 1: "),
    ("empty-config", CONFIG_FILE, ": line 1: "),
    ("arm-object", ARM_FILE, ": field 'variant' missing"),
    ("arm-list", ARM_FILE, ": expected a JSON object, got list"),
    ("arm-bad-utf8", ARM_FILE, ": not UTF-8 text"),
    ("config-dir", CONFIG_FILE, ": cannot read it"),
    ("stages-truncated", STAGES_FILE, ": line 1: "),
])
def test_a_damaged_out_is_one_line_naming_the_file(tmp_path, capsys, no_compute, damage, where, needle):
    out = tmp_path / "exp"
    d = arm_dirs("ptx", out)[0]
    if damage == "arms-file":
        d.parent.parent.mkdir(parents=True)
        d.parent.write_text("x")
        path = d.parent
    else:
        prepare_arm_dir(plan("ptx", SMOKE, out, seeds=1)[2][0], d)
        path = d / where
        if damage == "config-dir":
            path.unlink()
            path.mkdir()
        else:
            path.write_bytes({"truncated-arm": b'{"variant": "gam', "empty-config": b"",
                              "arm-object": b"{}", "arm-list": b"[]", "arm-bad-utf8": b'{"variant": "\xff"}',
                              "stages-truncated": b'{"pretrain": '}[damage])
    err = one_line_error(capsys, ["experiment", "ptx", "--smoke", "--out", str(out)], needle)
    assert str(path) in err


def test_all_with_a_file_in_the_way_of_a_later_experiment_creates_nothing(tmp_path, capsys, no_compute):
    out = tmp_path / "f2"
    out.mkdir()
    (out / "ptx").write_text("x")
    one_line_error(capsys, ["experiment", "all", "--smoke", "--out", str(out)],
                   f"--out {out / 'ptx'}: cannot make this directory (a file is in the way)")
    assert sorted(p.name for p in out.iterdir()) == ["ptx"]


# ---------------------------------------------------------------- 3, 9: β and arms that coincide
@pytest.mark.parametrize("beta, needle", [
    ("0", "--ppo.kl_coef 0: kl-sweep runs β = 0, β/10, β and 5β, which need β > 0"),
    ("5e-324", "need β > 0 (β/10 > 0 too)"),
    ("1e300", "--ppo.kl_coef 1e+300: the experiments take a finite β of at most 100"),
    ("inf", "config: ppo.kl_coef=inf: must be >= 0 and finite"),
    ("nan", "config: ppo.kl_coef=nan: must be >= 0 and finite"),
])
def test_a_beta_the_sweep_cannot_spread_is_refused(tmp_path, capsys, no_compute, beta, needle):
    out = tmp_path / "exp"
    one_line_error(capsys, ["experiment", "kl-sweep", "--smoke", "--ppo.kl_coef", beta, "--out", str(out)], needle)
    assert not out.exists()


def test_a_beta_of_0_is_fine_where_nothing_sweeps_it(tmp_path):
    from minirlhf.experiments.runner import check_kl_coef
    check_kl_coef(["ptx"], replace(TINY, ppo={"kl_coef": 0.0}))
    with pytest.raises(ValueError, match="kl-sweep"):
        check_kl_coef(ALL_ORDER, replace(TINY, ppo={"kl_coef": 0.0}))


def test_slugs_tell_exponents_apart_and_one_directory_is_never_two_arms(tmp_path):
    assert Arm("beta=1e+299", 0, TINY).dirname == "beta-1ep299-s0"
    assert Arm("beta=1e-299", 0, TINY).dirname == "beta-1e-299-s0"
    sweep = plan("kl-sweep", replace(SMOKE, ppo={"kl_coef": 1e-299}), tmp_path, seeds=2)[2]
    assert len({a.dirname for a in sweep}) == len(sweep) == 10
    twins = [Arm("beta=1", 0, TINY), Arm("beta-1", 0, TINY, {"x": 1})]
    with pytest.raises(ValueError, match="arms 'beta=1' and 'beta-1' .* one run counted twice"):
        check_arms(twins, tmp_path / "e")
    with pytest.raises(ValueError, match="counted twice"):
        run_arms("e", twins, tmp_path / "e", tmp_path, lambda a, d: None, lambda a, d: {})
    assert not (tmp_path / "e").exists()


def test_smoke_with_another_preset_is_refused(tmp_path, capsys, no_compute):
    one_line_error(capsys, ["experiment", "ptx", "--smoke", "--preset", "quick", "--out", str(tmp_path / "x")],
                   "--smoke runs the tiny preset (seconds per arm), not --preset quick")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- 4: a moved experiments directory
def test_a_moved_experiments_directory_keeps_its_iterate_arms(tmp_path):
    a, b = tmp_path / "a" / "exp", tmp_path / "b" / "renamed"
    arm_a = plan("iterate", SMOKE, a, seeds=1)[2][1]  # round 2: its comparisons are a file of its directory
    assert arm_a.cfg.data.preferences.startswith(str(a.resolve()))
    d_a = a / "iterate" / "arms" / arm_a.dirname
    prepare_arm_dir(arm_a, d_a)
    recorded = {s: {**k} for s, k in stage_keys(arm_a.cfg).items()}  # what run_train records, absolute path
    (d_a / STAGES_FILE).write_text(json.dumps(recorded))
    b.parent.mkdir()
    shutil.move(str(a), str(b))
    arm_b = plan("iterate", SMOKE, b, seeds=1)[2][1]
    d_b = b / "iterate" / "arms" / arm_b.dirname
    assert arm_b.cfg.data.preferences != arm_a.cfg.data.preferences  # the running path follows the move
    assert stage_keys(arm_b.cfg, d_b) == stage_keys(arm_a.cfg, d_a)  # the portable keys do not
    check_arms(plan("iterate", SMOKE, b, seeds=1)[2], b / "iterate")  # no "another configuration"
    prepare_arm_dir(arm_b, d_b)
    # run_train's stages.json now names the current path: its finished stages are kept
    assert json.loads((d_b / STAGES_FILE).read_text()) == {s: {**k} for s, k in stage_keys(arm_b.cfg).items()}
    assert json.loads((d_b / "prefix.json").read_text())["rm"]["data.preferences"] == \
        f"iterate/arms/{arm_b.dirname}/comparisons_rounds_1-2.jsonl"


# ---------------------------------------------------------------- 5: the user's options recorded
def test_the_users_options_reach_experiment_json_and_the_headers(tmp_path, monkeypatch):
    from minirlhf.experiments import cli as ecli

    seen = {}
    monkeypatch.setattr(ecli, "run_experiment", lambda n, cfg, out, **kw: seen.update(kw) or {"wall_s": 0})
    assert main(["experiment", "ptx", "--smoke", "--ppo.iterations", "40", "--out", str(tmp_path / "x")]) == 0
    assert seen["options"] == {"ppo.iterations": "40"} and seen["smoke"]
    assert setting_text("tiny", True, {"ppo.iterations": "40"}) == "Preset `tiny`, --smoke sizes except --ppo.iterations 40"
    assert setting_text("quick", False, {"ppo.kl_coef": "0.1"}) == "Preset `quick` with --ppo.kl_coef 0.1"
    doc = _doc("ptx", options={"ppo.iterations": "40"})
    text = "\n".join(readme.header({"ptx": doc}, tmp_path))
    assert "(preset `tiny`, --smoke sizes except --ppo.iterations 40, seeds 0)" in text
    assert "| ptx | tiny (smoke) with --ppo.iterations 40 | 0 |" in text


def test_write_report_records_the_options(tmp_path):
    from minirlhf.experiments.runner import Options, _write_report

    exp = EXPERIMENTS["ptx"]
    rec = {"variant": "gamma=0", "seed": 0, "params": {"gamma": 0.0}, "dir": "arms/gamma-0-s0", "wall_s": 1.0,
           "processes": 1, "numbers": {k: 1.0 for k in ("gold", "rm_score", "kl", "ppl", "ppl_init", "ppl_base")}}
    opts = Options(seeds=(0,), rounds=2, n_max=8, exp_dir=tmp_path)
    _write_report(exp, [rec], opts, tmp_path, TINY, preset="tiny", smoke=True, started=0.0,
                  options={"ppo.iterations": "40"})
    assert json.loads((tmp_path / "experiment.json").read_text())["options"] == {"ppo.iterations": "40"}
    assert "Preset `tiny`, --smoke sizes except --ppo.iterations 40, seeds 0" in (tmp_path / "experiment.md").read_text()


# ---------------------------------------------------------------- 6: the renderer's bad files
def _doc(name, options=None):
    return {"experiment": name, "questions": list(EXPERIMENTS[name].questions), "preset": "tiny", "smoke": True,
            "seeds": [0], "device": "cpu", "options": options or {},
            "machine": {"processor": "x86_64", "cpu_count": 2, "torch": "2.x", "torch_threads": 1},
            "wall_s": 12.0, "arms": [{"variant": "v", "seed": 0, "params": {}, "numbers": {}, "wall_s": 12.0}]}


@pytest.mark.parametrize("content, needle", [
    (b"{}", ": field 'experiment' missing"),
    (b"[]", ": expected a JSON object, got list"),
    (b'{"experiment": "pt', ": line 1: "),
    (b'{"experiment": "\xff"}', ": not UTF-8 text"),
    (None, ": cannot read it"),  # a directory
    (json.dumps({**_doc("ptx"), "wall_s": "long"}).encode(), ": field 'wall_s': expected int or float, got str"),
    (json.dumps({**_doc("ptx"), "arms": [1]}).encode(), ": field 'arms[0]': expected dict, got int"),
    (json.dumps({**_doc("ptx"), "machine": {}}).encode(), ": field 'machine.processor' missing"),
    (json.dumps({**_doc("ptx"), "experiment": "iterate"}).encode(), ": field 'experiment': 'iterate'"),
    (json.dumps(_doc("ptx")).encode(), ": the arms or their numbers lack 'gamma=0'"),
])
def test_a_bad_experiment_json_is_one_line_naming_the_file(tmp_path, capsys, content, needle):
    path = tmp_path / "exp" / "ptx" / "experiment.json"
    path.parent.mkdir(parents=True)
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    one_line_error(capsys, [str(tmp_path / "exp")], f"{path}{needle}", entry=readme.main)
