"""Arms: one configuration and seed each, run as an ordinary run directory, in sequence.

    OUT/NAME/arms/<arm>-s<seed>/        what `python -m minirlhf train --out ...` writes, plus
        config.json                     the arm's resolved configuration
        prefix.json                     the key of each stage's output (what it depends on)
        arm.json                        the arm's measured numbers; present = the arm is finished

Arms of all the experiments under OUT share finished stages: before an arm runs, every
stage whose output would be the same as a finished one elsewhere under OUT (same key: the
same configuration of everything it depends on, seed included) is hard-linked into the
arm's directory, with its metrics, and `run_train` keeps it as finished. A finished arm
(arm.json) is reused as it is; an interrupted one continues where it stopped (its
unfinished stage resumes from its last checkpoint).

Under torchrun every rank runs every arm's stages (each spread over the ranks, as `train`
spreads them) and its measurements; the bookkeeping — the arm's config.json and prefix.json,
the links of shared stages, arm.json — is read and written by rank 0 alone
(`distributed.on_main`), the other ranks waiting for its answer.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import checkpoint, distributed
from ..config import RunConfig, to_dict
from ..metrics import METRICS_FILE
from ..pipeline import STAGE_FIELDS, stage_output, stages_of
from ..pipeline import stage_keys as pipeline_stage_keys

ARM_FILE, PREFIX_FILE, CONFIG_FILE = "arm.json", "prefix.json", "config.json"

@dataclass(frozen=True)
class Arm:
    """One run of an experiment: a variant (its name and the parameters it sets) and a seed."""
    variant: str
    seed: int
    cfg: RunConfig
    params: dict = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        slug = "".join(c if c.isalnum() or c in ".-_" else "-" for c in self.variant)
        return f"{slug}-s{self.seed}"


# an arm's stage is shared only with arms whose evaluation settings match too (its PPO run's gold curve)
ARM_STAGE_FIELDS = {**STAGE_FIELDS, "ppo": STAGE_FIELDS["ppo"] + ("eval",)}


def stage_keys(cfg: RunConfig) -> dict[str, str]:
    """stage -> the key of its output in an arm (pipeline.stage_keys with ARM_STAGE_FIELDS)."""
    return pipeline_stage_keys(cfg, ARM_STAGE_FIELDS)


def _finished(stage: str, out: Path) -> bool:
    return out.exists() if stage == "rankings" else checkpoint.is_finished(out)


def _link_tree(src: Path, dst: Path) -> None:
    """dst as a copy of src (a file or a directory) made of hard links (a plain copy across
    file systems), built under a temporary name and renamed: never a half-linked checkpoint.
    Checkpoints are replaced by rename, never written in place, so the links stay independent."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    tmp = dst.with_name(dst.name + ".linking")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=link)
    else:
        link(src, tmp)
    tmp.rename(dst)


def link_shared_stages(cfg: RunConfig, arm_dir: Path, pool: Path) -> list[str]:
    """Hard-link into arm_dir the finished stages that another arm under `pool` already
    produced with the same keys (the donor sharing the longest run of stages), with their
    metrics rows and wall times. Returns the stages linked."""
    keys = stage_keys(cfg)
    stages = stages_of(cfg)
    best: tuple[list[str], Path | None] = ([], None)
    for prefix in sorted(pool.glob(f"*/arms/*/{PREFIX_FILE}")):
        donor = prefix.parent
        if donor.resolve() == arm_dir.resolve():
            continue
        theirs = json.loads(prefix.read_text())
        shared = []
        for s in stages:
            if theirs.get(s) != keys[s] or not _finished(s, stage_output(s, donor)):
                break
            shared.append(s)
        if len(shared) > len(best[0]):
            best = (shared, donor)
    shared, donor = best
    linked = []
    for s in shared:
        out = stage_output(s, arm_dir)
        if out.exists() or out.with_name(out.name + ".partial").exists():
            if _finished(s, out):
                continue
            break  # an unfinished stage of its own: it resumes, and what follows it is its own
        _link_tree(stage_output(s, donor), out)
        linked.append(s)
    if linked:
        rows = [line for line in (donor / METRICS_FILE).read_text().splitlines()
                if line.strip() and json.loads(line)["stage"] in linked] if (donor / METRICS_FILE).exists() else []
        with open(arm_dir / METRICS_FILE, "a") as f:
            f.write("".join(r + "\n" for r in rows))
        donor_wall = donor / "wall_times.json"
        if donor_wall.exists():
            own = arm_dir / "wall_times.json"
            wall = json.loads(own.read_text()) if own.exists() else {}
            wall.update({s: v for s, v in json.loads(donor_wall.read_text()).items() if s in linked})
            write_json(own, wall, indent=None)
        print(f"[experiment] {arm_dir.name}: reusing {', '.join(linked)} of {donor}")
    return linked


def prepare_arm_dir(arm: Arm, arm_dir: Path) -> None:
    """Create the arm's directory with its config.json and prefix.json; ValueError when the
    directory holds a run of another configuration."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    mine = to_dict(arm.cfg)
    path = arm_dir / CONFIG_FILE
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != json.loads(json.dumps(mine)):
            diff = _first_difference(theirs, mine)
            raise ValueError(f"{path}: the arm's directory holds a run of another configuration ({diff}); use "
                             f"another --out, or delete {arm_dir} to run the arm again")
    else:
        write_json(path, mine)
    write_json(arm_dir / PREFIX_FILE, stage_keys(arm.cfg))


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """obj as JSON into path, written to a temporary name and renamed: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    tmp.replace(path)


def _first_difference(a: dict, b: dict, where: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            d = _first_difference(x, y, f"{where}{k}.")
            if d:
                return d
        elif x != y:
            return f"{where}{k}: {x!r} there, {y!r} now"
    return ""


def _options(opts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in opts.items()) or "no recorded options"


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_arms(name: str, arms: list[Arm], exp_dir: Path, pool: Path,
             run: Callable[[Arm, Path], None], measure: Callable[[Arm, Path], dict],
             measured_with: dict | None = None) -> list[dict]:
    """Run the arms in sequence; returns one record per arm: {"variant", "seed", "params",
    "dir" (relative to exp_dir), "numbers", "measured_with", "processes", "wall_s", "reused"}.

    run(arm, arm_dir) trains the arm (stages already finished are kept), measure(arm, arm_dir)
    returns its numbers; both are skipped for a finished arm (arm.json) measured with the same
    measured_with (the experiment-level options its numbers depend on, e.g. best-of-n's n_max).
    A finished arm measured with others is measured again, its training kept. wall_s is the
    time the arm took when it ran (stages linked from other arms cost it nothing; a measurement
    again adds its time); processes: torchrun's world size when it ran (None: not recorded).

    Under torchrun: run and measure on every rank (they are collective); the arm's files read
    and written by rank 0 only, and every rank returns rank 0's records."""
    measured_with = measured_with or {}
    records, spent, ran = [], 0.0, 0
    t_start = time.time()
    for i, arm in enumerate(arms):
        arm_dir = exp_dir / "arms" / arm.dirname
        head = f"[experiment {name}] arm {i + 1}/{len(arms)} {arm.variant}, seed {arm.seed}"
        done = arm_dir / ARM_FILE
        rec = distributed.on_main(_open_arm, arm, arm_dir)
        if rec is not None and rec.get("measured_with", {}) == measured_with:
            print(f"{head}: finished earlier, reused ({arm_dir})")
            records.append({"processes": None, **rec, "reused": True})
            continue
        if rec is not None:  # trained, but its numbers answer other options: measure it again
            print(f"{head}: finished earlier, measured with {_options(rec.get('measured_with', {}))}; measuring it "
                  f"again with {_options(measured_with)} (its training is kept)")
            t0 = time.time()
            numbers = measure(arm, arm_dir)
            rec = {"processes": None, **rec, "numbers": numbers, "measured_with": measured_with,
                   "wall_s": round(rec["wall_s"] + time.time() - t0, 1)}
            records.append({**distributed.on_main(_close_arm, done, rec), "reused": True})
            continue
        if distributed.is_main():  # the ETA, as only rank 0 prints it
            left = sum(1 for a in arms[i:] if not (exp_dir / "arms" / a.dirname / ARM_FILE).exists())
            eta = f", about {_clock(spent / ran * left)} left" if ran else ""
            print(f"{head}: running ({_clock(time.time() - t_start)} elapsed{eta})")
        t0 = time.time()
        distributed.on_main(link_shared_stages, arm.cfg, arm_dir, pool)
        run(arm, arm_dir)
        numbers = measure(arm, arm_dir)
        wall = round(time.time() - t0, 1)
        rec = {"variant": arm.variant, "seed": arm.seed, "params": arm.params, "dir": str(arm_dir.relative_to(exp_dir)),
               "numbers": numbers, "measured_with": measured_with, "processes": distributed.size(), "wall_s": wall}
        rec = distributed.on_main(_close_arm, done, rec)
        spent, ran = spent + rec["wall_s"], ran + 1
        print(f"{head}: done in {_clock(rec['wall_s'])}")
        records.append({**rec, "reused": False})
    return records


def _open_arm(arm: Arm, arm_dir: Path) -> dict | None:
    """prepare_arm_dir, then the finished arm's record (arm.json), or None when it has not finished."""
    prepare_arm_dir(arm, arm_dir)
    done = arm_dir / ARM_FILE
    return json.loads(done.read_text()) if done.exists() else None


def _close_arm(done: Path, rec: dict) -> dict:
    """rec into arm.json (the arm is finished); returns rec."""
    write_json(done, rec)
    return rec
