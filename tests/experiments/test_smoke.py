"""A smoke run of each experiment (tiny preset, one seed, a few PPO iterations) through the CLI:
the outputs exist and parse, arms are ordinary run directories, finished stages are shared
between arms, a rerun reuses every arm, a killed experiment resumes, and user mistakes are
one-line errors."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.parse

import pytest

from minirlhf.cli import main
from minirlhf.config import PRESETS
from minirlhf.data import build_task, read_preferences
from minirlhf.experiments.stats import best_of_n_kl

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"
TINY = PRESETS["tiny"]()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def run(root, name, *extra):
    assert main(["experiment", name, "--smoke", "--out", str(root), *extra]) == 0
    return json.loads((root / name / "experiment.json").read_text())


# the experiments run in the order `experiment all` uses, each reusing what the ones before finished
@pytest.fixture(scope="module")
def kl_sweep(root):
    return run(root, "kl-sweep")


@pytest.fixture(scope="module")
def ptx(root, kl_sweep):
    return run(root, "ptx")


@pytest.fixture(scope="module")
def best_of_n(root, ptx):
    return run(root, "best-of-n")


@pytest.fixture(scope="module")
def iterate(root, best_of_n):
    return run(root, "iterate")


@pytest.fixture(scope="module")
def sft_ablation(root, iterate):
    return run(root, "sft-ablation")


def check_outputs(root, doc, variants):
    """experiment.json / .md / PNGs exist and parse; every arm is a finished run directory."""
    exp_dir = root / doc["experiment"]
    assert [a["variant"] for a in doc["arms"]] == variants and doc["seeds"] == [0] and doc["smoke"]
    md = (exp_dir / "experiment.md").read_text()
    assert doc["questions"][0] in md
    for img in doc["plots"]:
        assert f"![{img}]({img})" in md and (exp_dir / img).read_bytes()[:8] == PNG
    for a in doc["arms"]:
        assert f"| {a['variant']} | 0 | [{a['dir']}]" in md
        d = exp_dir / a["dir"]
        assert json.loads((d / "arm.json").read_text())["numbers"] == a["numbers"]
        summary = json.loads((d / "summary.json").read_text())
        assert a["numbers"]["gold"] == summary["gold"]["ppo"]["mean"] and -4 <= a["numbers"]["gold"] <= 4
        assert json.loads((d / "ppo" / "config.json").read_text())["finished"]
        assert (d / "report.md").exists() and (d / "config.json").exists()
        agg = doc["aggregate"][a["variant"]]["gold"]
        assert agg["mean"] == a["numbers"]["gold"] and agg["n"] == 1 and agg["se"] is None
    assert doc["wall_s"] == pytest.approx(sum(a["wall_s"] for a in doc["arms"]), abs=0.2)
    return exp_dir


def test_kl_sweep(root, kl_sweep):
    check_outputs(root, kl_sweep, ["beta=0", "beta=0.03", "beta=0.3", "beta=1.5", "adaptive"])
    cfgs = {a["variant"]: json.loads((root / "kl-sweep" / a["dir"] / "config.json").read_text())["ppo"]
            for a in kl_sweep["arms"]}
    assert cfgs["beta=0"]["kl_coef"] == 0.0 and not cfgs["beta=0"]["adaptive_kl"]
    assert cfgs["adaptive"]["adaptive_kl"] and cfgs["adaptive"]["kl_coef"] == TINY.ppo.kl_coef
    task = build_task(TINY.task)
    samples = kl_sweep["arms"][0]["numbers"]["exploit_samples"]
    assert len(samples) == 6 and [s["rm"] for s in samples] == sorted((s["rm"] for s in samples), reverse=True)
    for s in samples:  # gold of each shown response, recomputed
        assert s["gold"] == task.gold_score(s["prompt"], s["response"])
    curves = kl_sweep["arms"][0]["numbers"]["curves"]
    assert curves["step"] == list(range(1, 7)) and len(curves["kl_to_ref"]) == 6
    assert [p["step"] for p in kl_sweep["arms"][0]["numbers"]["gold_points"]] == [2, 4, 6]
    assert "What the β = 0 policy learned to exploit" in (root / "kl-sweep" / "experiment.md").read_text()


def test_ptx(root, ptx):
    check_outputs(root, ptx, ["gamma=0", "gamma=0.1", "gamma=1"])
    arms = {a["variant"]: a for a in ptx["arms"]}
    assert "ptx_loss" not in arms["gamma=0"]["numbers"]["curves"]
    assert all(x > 0 for x in arms["gamma=1"]["numbers"]["curves"]["ptx_loss"])
    # γ = 0 is the recipe: the same PPO run as kl-sweep's adaptive arm, linked, not rerun
    assert os.path.samefile(root / "ptx" / arms["gamma=0"]["dir"] / "ppo" / "model.safetensors",
                            root / "kl-sweep" / "arms" / "adaptive-s0" / "ppo" / "model.safetensors")
    assert set(ptx["differences_vs_gamma0"]) == {"gamma=0.1", "gamma=1"}


def test_best_of_n(root, best_of_n):
    check_outputs(root, best_of_n, ["recipe"])
    curve = best_of_n["arms"][0]["numbers"]["best_of_n"]
    assert [p["n"] for p in curve] == [1, 2, 4, 8]
    assert [p["kl"] for p in curve] == [best_of_n_kl(n) for n in (1, 2, 4, 8)]
    rm = [p["rm_mean"] for p in curve]
    assert all(b >= a - 1e-6 for a, b in zip(rm, rm[1:]))  # the best of more samples scores higher on the RM
    assert best_of_n["arms"][0]["numbers"]["best_of_n_prompts"] == TINY.task.n_eval_prompts
    on_disk = json.loads((root / "best-of-n" / "arms" / "recipe-s0" / "best_of_n.json").read_text())
    assert on_disk["curve"] == curve


def test_another_n_max_measures_the_finished_arm_again(root, best_of_n, tmp_path, capsys):
    """--n-max 16 on a directory measured with 8: the pool is sampled anew at 16 (the arm's training
    kept), and experiment.md, experiment.json and best_of_n.json all say 16."""
    shutil.copytree(root / "best-of-n", tmp_path / "best-of-n")
    capsys.readouterr()
    doc = run(tmp_path, "best-of-n", "--n-max", "16")
    out = capsys.readouterr().out
    assert "measuring it again with n_max 16" in out and "running" not in out and "[ppo]" not in out
    curve = doc["arms"][0]["numbers"]["best_of_n"]
    assert doc["n_max"] == 16 and [p["n"] for p in curve] == [1, 2, 4, 8, 16]
    assert [p["kl"] for p in curve] == [best_of_n_kl(n) for n in (1, 2, 4, 8, 16)]
    arm = tmp_path / "best-of-n" / "arms" / "recipe-s0"
    assert json.loads((arm / "best_of_n.json").read_text())["n_max"] == 16
    assert json.loads((arm / "arm.json").read_text())["measured_with"] == {"n_max": 16}
    assert "pool of 16 samples per prompt" in (tmp_path / "best-of-n" / "experiment.md").read_text()
    assert [p["n"] for p in doc["best_of_n"]] == [1, 2, 4, 8, 16]


def test_iterate(root, iterate):
    check_outputs(root, iterate, ["round1", "round2"])
    r1, r2 = (root / "iterate" / a["dir"] for a in iterate["arms"])
    n = TINY.task.n_rm_prompts
    assert [a["numbers"]["comparisons"] for a in iterate["arms"]] == [n, 2 * n]
    new = read_preferences(r2 / "rankings_round2.jsonl")
    merged = (r2 / "comparisons_rounds_1-2.jsonl").read_text().splitlines()
    assert merged[:n] == (r1 / "preferences.jsonl").read_text().splitlines() and len(new) == n
    cfg2 = json.loads((r2 / "config.json").read_text())
    assert cfg2["data"]["preferences"] == str((r2 / "comparisons_rounds_1-2.jsonl").resolve())
    # round 2's RM and PPO are its own; its base and SFT are round 1's
    assert os.path.samefile(r1 / "sft" / "model.safetensors", r2 / "sft" / "model.safetensors")
    assert not os.path.samefile(r1 / "rm" / "model.safetensors", r2 / "rm" / "model.safetensors")
    assert "rankings_round2" not in json.loads((r1 / "config.json").read_text())


def test_sft_ablation(root, sft_ablation):
    variants = [f"{s}_align{a}" for a in (0.2, 0.8) for s in ("no-sft", "light-sft", "full-sft")]
    exp_dir = check_outputs(root, sft_ablation, variants)
    arms = {a["variant"]: a for a in sft_ablation["arms"]}
    assert not (exp_dir / arms["no-sft_align0.2"]["dir"] / "sft").exists()
    light = json.loads((exp_dir / arms["light-sft_align0.2"]["dir"] / "sft" / "config.json").read_text())
    assert light["info"]["demos"] == round(0.05 * TINY.task.n_sft_demos)
    cfg = json.loads((exp_dir / arms["full-sft_align0.8"]["dir"] / "config.json").read_text())
    assert cfg["task"]["base_alignment"] == 0.8
    # how informative the rankings were, recounted from the rankings file with gold
    a = arms["no-sft_align0.8"]
    task = build_task(TINY.task.__class__(**{**cfg["task"]}))
    below = total = 0
    for c in read_preferences(exp_dir / a["dir"] / "preferences.jsonl"):
        for b, w in c.pairs:
            d = task.gold_score(c.prompt, c.responses[b]) - task.gold_score(c.prompt, c.responses[w])
            below += abs(d) < TINY.task.annotator_noise or d == 0
            total += 1
    assert total == a["numbers"]["ranked_pairs"] == TINY.task.n_rm_prompts * 3  # K = 3: 3 pairs a prompt
    assert a["numbers"]["uninformative_pairs"] == pytest.approx(below / total)
    assert set(sft_ablation["differences"]) == {f"{s}_align{x} - full-sft_align{x}" for x in (0.2, 0.8)
                                                for s in ("no-sft", "light-sft")}


def test_rerun_reuses_every_arm(root, sft_ablation, capsys):
    capsys.readouterr()
    before = json.loads((root / "ptx" / "experiment.json").read_text())
    doc = run(root, "ptx")
    out = capsys.readouterr().out
    assert out.count("finished earlier, reused") == 3 and "running" not in out
    assert [a["numbers"] for a in doc["arms"]] == [a["numbers"] for a in before["arms"]]
    assert all(a["reused"] for a in doc["arms"])


def test_a_killed_experiment_resumes(tmp_path):
    env = {**os.environ, "MINIRLHF_KILL_AT": "ppo:3", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "minirlhf", "experiment", "best-of-n", "--smoke", "--out", str(tmp_path)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    arm = tmp_path / "best-of-n" / "arms" / "recipe-s0"
    assert json.loads((arm / "ppo" / "config.json").read_text())["step"] == 3 and not (arm / "arm.json").exists()
    env.pop("MINIRLHF_KILL_AT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[pretrain] finished earlier, kept" in done.stdout
    doc = json.loads((tmp_path / "best-of-n" / "experiment.json").read_text())
    assert math.isfinite(doc["arms"][0]["numbers"]["gold"])
    rows = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "ppo" and "event" not in r][-3:] == [4, 5, 6]


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["experiment", "ptx", "--smoke", "--out", str(tmp_path), "--data.sft", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: data.sft: experiments measure every arm with the embedded task's gold")
    assert err.count("\n") == 1 and not (tmp_path / "ptx").exists()
    assert main(["experiment", "nope"]) == 2
    assert main(["experiment", "ptx", "--smoke", "--seeds", "0"]) == 2
    assert "--seeds: 0 must be >= 1" in capsys.readouterr().err


def test_readme_section_renders_from_the_json(root, sft_ablation, tmp_path):
    from minirlhf.experiments.readme import render

    md = render(root, tmp_path / "img", "docs/experiments")
    assert md.startswith("## What the experiments show")
    assert "Measured with `python -m minirlhf experiment all` (preset `tiny`, --smoke sizes, seeds 0)" in md
    for heading in ("### 1. Skipping SFT", "### 3. What the KL penalty buys", "### 4. PPO-ptx and forgetting",
                    "### 5. Another round", "### Best-of-n"):
        assert heading in md
    docs = {n: json.loads((root / n / "experiment.json").read_text()) for n in
            ("sft-ablation", "kl-sweep", "ptx", "iterate", "best-of-n")}
    total = sum(d['wall_s'] for d in docs.values()) / 60
    assert f"| all | | | | 17 | {total:.1f} |" in md and f"ran for {total:.1f} min in all" in md
    assert f"| kl-sweep | tiny (smoke) | 0 | 1 | 5 | {docs['kl-sweep']['wall_s'] / 60:.1f} |" in md
    assert md.count("**Answer.** _(to be written from the measured numbers") == 6
    for png in ("overoptimisation.png", "kl_sweep.png", "best_of_n.png", "ptx.png", "iterate.png", "sft_ablation.png"):
        assert (tmp_path / "img" / png).read_bytes()[:8] == PNG and f"(docs/experiments/{png})" in md
    # the kl-sweep table in the section is the one in the experiment's own report
    own = (root / "kl-sweep" / "experiment.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| beta=0 |")]
    assert table and table[0] in own
    # an images directory with spaces: the links percent-encoded, the files where they point
    spaced = tmp_path / "my images (v2)"
    md = render(root, spaced)
    links = re.findall(r"!\[[^]]*\]\(([^)]*)\)", md)
    assert len(links) == 7 and all(" " not in x for x in links)
    for x in links:
        assert open(urllib.parse.unquote(x), "rb").read(8) == PNG
