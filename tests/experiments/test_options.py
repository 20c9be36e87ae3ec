"""The `experiment` command's options, checked before any compute: an option an experiment sets
in its arms is refused (not silently dropped or overridden), --rounds / --n-max only where they
mean something, --out that cannot be a directory, the interruption message, --help's defaults;
and the README renderer's options and header (what was run, where, how long)."""
import dataclasses
import json
import re

import pytest

from minirlhf.cli import main
from minirlhf.config import PRESETS, replace, to_dict
from minirlhf.experiments import readme
from minirlhf.experiments.definitions import EXPERIMENTS, Options
from minirlhf.experiments.runner import check_options, experiment_config, link, option_flag

TINY = PRESETS["tiny"]()


def one_line_error(capsys, argv, *needles, code=2, entry=main):
    assert entry(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("argv, flag, name", [
    (["sft-ablation", "--skip-sft"], "--skip-sft", "sft-ablation"),
    (["sft-ablation", "--skip-sft", "false"], "--skip-sft", "sft-ablation"),
    (["sft-ablation", "--task.base_alignment", "0.5"], "--task.base_alignment", "sft-ablation"),
    (["sft-ablation", "--sft.samples", "10"], "--sft.samples", "sft-ablation"),
    (["ptx", "--ppo.ptx_coef", "0.5"], "--ppo.ptx_coef", "ptx"),
    (["kl-sweep", "--ppo.adaptive_kl", "false"], "--ppo.adaptive_kl", "kl-sweep"),
    (["all", "--ppo.ptx_coef", "0.5"], "--ppo.ptx_coef", "ptx"),
])
def test_an_option_the_arms_set_is_refused_before_anything_runs(tmp_path, capsys, argv, flag, name):
    out = tmp_path / "exp"
    err = one_line_error(capsys, ["experiment", *argv, "--smoke", "--out", str(out)], f"error: {flag}: ",
                         f"the {name} experiment sets")
    assert "drop the option" in err and not out.exists()


def _changed_fields(a, b) -> set[str]:
    """The configuration fields ("section.field" or top-level) whose values differ between a and b."""
    da, db = to_dict(a), to_dict(b)
    out = set()
    for k in da:
        if isinstance(da[k], dict):
            out |= {f"{k}.{f}" for f in da[k] if da[k][f] != db[k][f]}
        elif da[k] != db[k]:
            out.add(k)
    return out


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_knows_the_fields_its_arms_set(tmp_path, name):
    """Every field an arm changes (besides its seed) is one the experiment declares it sets or derives
    from the user's value, and every field it declares is changed by some arm: the refusals and the
    README's table are complete."""
    exp = EXPERIMENTS[name]
    opts = Options(seeds=(0, 1), rounds=3, n_max=8, exp_dir=tmp_path)
    changed = set().union(*(_changed_fields(TINY, replace(a.cfg, seed=TINY.seed)) for a in exp.arms(TINY, opts)))
    assert changed <= set(exp.sets) | set(exp.derives)
    assert set(exp.sets) | set(exp.derives) <= changed
    # a user's value of a derived field is honoured: it moves the arms with it
    for f in exp.derives:
        section, key = f.split(".")
        value = getattr(getattr(TINY, section), key) * 2
        moved = exp.arms(replace(TINY, **{section: {key: value}}), opts)
        assert any(getattr(getattr(a.cfg, section), key) != getattr(getattr(b.cfg, section), key)
                   for a, b in zip(moved, exp.arms(TINY, opts)))


def test_the_readme_names_the_options_each_experiment_sets():
    text = open("README.md", encoding="utf-8").read()
    section = text[text.index("## What the experiments show"):text.index("## Commands")].splitlines()
    start = section.index("| experiment | sets in its arms (refused as options) | derives from your options |")
    rows = {r.split(" | ")[0][3:-1]: r.split(" | ") for r in section[start + 2:start + 2 + len(EXPERIMENTS)]}
    assert set(rows) == set(EXPERIMENTS)
    for name, exp in EXPERIMENTS.items():
        assert set(re.findall(r"`(--[a-z_.-]+)`", rows[name][1])) == {option_flag(f) for f in exp.sets}, name
        for f in exp.derives:
            assert f"`{f}`" in rows[name][2], (name, f)


def test_options_an_experiment_derives_from_or_leaves_alone_are_accepted():
    check_options(("kl-sweep",), {"ppo.kl_coef", "ppo.kl_target", "skip_sft"})
    check_options(("sft-ablation",), {"sft.epochs", "ppo.kl_coef", "task.n_sft_demos"})
    check_options(("best-of-n", "iterate"), {"ppo.ptx_coef", "eval.temperature"})
    with pytest.raises(ValueError, match=r"^--skip-sft: the sft-ablation experiment sets skip_sft in its arms"):
        check_options(("kl-sweep", "sft-ablation"), {"skip_sft"})


def test_the_experiments_settings_yield_to_the_users():
    """The eighth-of-iterations gold curve follows the iterations given; --smoke's sizes yield to given ones."""
    quick = PRESETS["quick"]()
    assert experiment_config(quick, False).ppo.eval_every == quick.ppo.iterations // 8 == 5
    given = replace(quick, ppo={"iterations": 16})
    assert experiment_config(given, False, {"ppo.iterations"}).ppo.eval_every == 2
    mine = replace(quick, ppo={"iterations": 16, "eval_every": 3})
    assert experiment_config(mine, False, {"ppo.iterations", "ppo.eval_every"}).ppo.eval_every == 3
    smoke = experiment_config(replace(TINY, ppo={"iterations": 10}), True, {"ppo.iterations"}).ppo
    assert (smoke.iterations, smoke.eval_every, smoke.monitor_window) == (10, 2, 2)
    smoke = experiment_config(TINY, True).ppo
    assert (smoke.iterations, smoke.eval_every, smoke.monitor_window) == (6, 2, 2)


@pytest.mark.parametrize("argv, needle", [
    (["ptx", "--n-max", "16"], "--n-max: only the best-of-n experiment has it, not ptx"),
    (["best-of-n", "--rounds", "3"], "--rounds: only the iterate experiment has it, not best-of-n"),
])
def test_an_experiment_level_option_of_another_experiment_is_refused(tmp_path, capsys, argv, needle):
    one_line_error(capsys, ["experiment", *argv, "--smoke", "--out", str(tmp_path / "x")], needle)
    assert not (tmp_path / "x").exists()


def test_an_out_that_cannot_be_a_directory_is_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, ["experiment", "ptx", "--smoke", "--out", str(afile)],
                   f"--out {afile}: cannot make this directory (a file is in the way)")
    one_line_error(capsys, ["experiment", "ptx", "--smoke", "--out", str(afile / "sub")], "--out", "cannot make")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "ptx").write_text("x")  # the experiment's own directory is a file
    one_line_error(capsys, ["experiment", "ptx", "--smoke", "--out", str(tmp_path / "exp")],
                   f"--out {tmp_path / 'exp' / 'ptx'}: cannot make")
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["experiment", "ptx", "--smoke", "--out", ""], "--out: an empty path")
    assert not (tmp_path / "runs").exists()


def test_an_interrupted_experiment_says_a_plain_rerun_continues(tmp_path, capsys, monkeypatch):
    import minirlhf.experiments.cli as ecli

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ecli, "run_experiment", interrupted)
    assert main(["experiment", "ptx", "--smoke", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "run the same command again to continue" in err and "--resume" not in err


def test_help_shows_the_defaults_and_no_resume(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "iterate: rounds of rankings + RM + PPO (default 2; at most 20)" in text
    assert "best-of-n: the largest n (default 64; 8 with --smoke; at most 4096)" in text
    assert "(default 3; 1 with --smoke; at most 100; the last, --seed + --seeds - 1, at most 4294967295)" in text
    assert "the tiny preset (no other --preset)" in text
    assert "--resume" not in text


# ---------------------------------------------------------------- the README renderer
def test_renderer_paths_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "exp"
    (out / "kl-sweep").mkdir(parents=True)
    (out / "kl-sweep" / "experiment.json").write_text(json.dumps(_doc("kl-sweep")))
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, [str(out), "--images", str(afile)], f"--images {afile}: cannot make this directory",
                   entry=readme.main)
    one_line_error(capsys, [str(out), "--images", "/proc/nope/img"], "--images /proc/nope/img: cannot make",
                   entry=readme.main)
    for argv, needle in (([""], "OUT: an empty path"), ([str(out), "--images", ""], "--images: an empty path"),
                         ([str(out), "--image-prefix", ""], "--image-prefix: an empty path"),
                         ([str(afile)], f"{afile}: no such directory"), ([], "required: out")):
        one_line_error(capsys, argv, needle, entry=readme.main)


def test_links_are_percent_encoded():
    assert link("kl_sweep.png") == "kl_sweep.png"
    assert link("my docs/a (1).png") == "my%20docs/a%20%281%29.png"


def _doc(name, *, smoke=True, seeds=(0,), wall=(12.0,), processes=(1,), cpus=2):
    arms = [{"variant": "v", "seed": s, "params": {}, "numbers": {}, "wall_s": w, "processes": p}
            for s, w, p in zip(seeds, wall, processes)]
    return {"experiment": name, "questions": list(EXPERIMENTS[name].questions), "preset": "tiny" if smoke else "quick",
            "smoke": smoke, "seeds": list(seeds),
            "device": "cpu", "machine": {"processor": "x86_64", "cpu_count": cpus, "torch": "2.x", "torch_threads": 1},
            "wall_s": sum(wall), "arms": arms}


def test_header_says_what_ran_and_rounds_as_its_table():
    lines = readme.header({"kl-sweep": _doc("kl-sweep")}, readme.Path("runs/x"))
    text = "\n".join(lines)
    assert "`python -m minirlhf experiment kl-sweep` (preset `tiny`, --smoke sizes, seeds 0)" in text
    assert "experiment all" not in text and "The arms of the 1 experiment ran for 0.2 min in all" in text
    assert "| kl-sweep | tiny (smoke) | 0 | 1 | 1 | 0.2 |" in lines and not any(r.startswith("| all |") for r in lines)
    everything = {n: _doc(n) for n in EXPERIMENTS}
    assert "Measured with `python -m minirlhf experiment all` (preset `tiny`" in "\n".join(
        readme.header(everything, readme.Path("runs/x")))


def test_header_of_mixed_settings_names_each():
    docs = {"kl-sweep": _doc("kl-sweep"),
            "best-of-n": _doc("best-of-n", smoke=False, seeds=(0, 1), wall=(60.0, 90.0), processes=(1, 2), cpus=16)}
    lines = readme.header(docs, readme.Path("runs/x"))
    text = "\n".join(lines)
    assert "settings that differ between the experiments" in text and "seeds 0)" not in text
    assert "`kl-sweep` on cpu (x86_64, 2 cores" in text and "`best-of-n` on cpu (x86_64, 16 cores" in text
    assert "| kl-sweep | tiny (smoke) | 0 | 1 | 1 | 0.2 |" in lines
    assert "| best-of-n | quick | 0, 1 | 1 / 2 | 2 | 2.5 |" in lines
    assert "| all | | | | 3 | 2.7 |" in lines and "ran for 2.7 min in all" in text


def test_an_experiment_json_records_each_arms_processes(tmp_path):
    from minirlhf.experiments.runner import arm_processes, processes_text

    doc = {"arms": [{"processes": 2}, {"processes": 1}, {"processes": None}], "machine": {}}
    assert arm_processes(doc) == [1, 2] and "arms under 1 / 2 processes" in processes_text([1, 2])
    assert arm_processes({"arms": [{}], "machine": {"processes": 2}}) == [2]  # an older experiment.json
    assert processes_text([1]) == "" and processes_text([2]) == ", 2 processes under torchrun"


def test_kl_sweep_shows_what_every_beta0_seed_exploits(tmp_path, monkeypatch):
    """An arm's numbers depend on the arm alone: the β = 0 arm of seed 1 has its samples whether or not
    seed 0 runs in the same invocation."""
    from minirlhf.experiments import definitions

    monkeypatch.setattr(definitions, "run_numbers", lambda d: {"gold": 0.0})
    monkeypatch.setattr(definitions, "top_scored_samples", lambda cfg, d, prompts, k: [{"seed": cfg.seed}])
    exp = EXPERIMENTS["kl-sweep"]
    opts = Options(seeds=(0, 1), rounds=2, n_max=8, exp_dir=tmp_path)
    arms = {(a.params["beta"], a.seed): a for a in exp.arms(TINY, opts)}
    assert exp.measure(arms[0.0, 1], tmp_path, opts)["exploit_samples"] == [{"seed": 1}]
    assert "exploit_samples" not in exp.measure(arms[TINY.ppo.kl_coef, 0], tmp_path, opts)


def test_check_embedded_task_comes_first(tmp_path, capsys):
    one_line_error(capsys, ["experiment", "iterate", "--smoke", "--out", str(tmp_path / "x"), "--data.preferences",
                            "p.jsonl"], "data.preferences: experiments measure every arm with the embedded task")
    assert not (tmp_path / "x").exists()


def test_sets_are_configuration_fields():
    from minirlhf import config as C
    for exp in EXPERIMENTS.values():
        for f in [*exp.sets, *exp.derives]:
            if "." in f:
                section, key = f.split(".")
                assert key in {x.name for x in dataclasses.fields(C.section_class(section))}
            else:
                assert f in {x.name for x in dataclasses.fields(C.RunConfig)}
    assert (option_flag("skip_sft"), option_flag("ppo.kl_coef")) == ("--skip-sft", "--ppo.kl_coef")
