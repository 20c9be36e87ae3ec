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
from ..config import PRESETS, RunConfig, to_dict
from ..files import json_error, read_json_object, write_json
from ..metrics import METRICS_FILE
from ..pipeline import STAGE_FIELDS, STAGES_FILE, stage_output, stages_of
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
        """<variant>-s<seed>: '=' and other signs become '-', but '+' becomes 'p' (1e+299 -> 1ep299,
        never the 1e-299 of another variant); run_experiment refuses arms whose directories coincide."""
        slug = "".join(c if c.isalnum() or c in ".-_" else "p" if c == "+" else "-" for c in self.variant)
        return f"{slug}-s{self.seed}"


def require(path: Path, obj: dict, fields: dict, where: str = "") -> None:
    """ValueError `path: field F: ...` unless obj has each field of `fields` ({name: type or tuple})."""
    for name, kind in fields.items():
        if name not in obj:
            raise ValueError(f"{path}: field '{where}{name}' missing")
        v = obj[name]
        if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
            want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{path}: field '{where}{name}': expected {want}, got {type(v).__name__}")


# what a finished arm's arm.json must hold (older ones may lack measured_with / processes)
ARM_FIELDS = {"variant": str, "seed": int, "params": dict, "dir": str, "numbers": dict, "wall_s": (int, float)}


def portable(d: dict, arm_dir: Path) -> dict:
    """A config dict (to_dict) with a data.preferences that lies in an arm's directory (iterate's
    merged comparisons) written relative to the experiments' directory (NAME/arms/ARM/FILE), so
    that config.json and the stage keys do not change when that directory is moved or renamed.
    A path recorded before the move is recognised by those last four parts."""
    pref = (d.get("data") or {}).get("preferences") if isinstance(d.get("data"), dict) else None
    if not isinstance(pref, str):
        return d
    parts = Path(pref).parts
    mine = (arm_dir.parent.parent.name, "arms", arm_dir.name)
    if len(parts) >= 4 and tuple(parts[-4:-1]) == mine:
        return {**d, "data": {**d["data"], "preferences": "/".join(parts[-4:])}}
    return d


# an arm's stage is shared only with arms whose evaluation settings match too (its PPO run's gold curve)
ARM_STAGE_FIELDS = {**STAGE_FIELDS, "ppo": STAGE_FIELDS["ppo"] + ("eval",)}


def stage_keys(cfg: RunConfig, arm_dir: Path | None = None) -> dict[str, str]:
    """stage -> the key of its output in an arm (pipeline.stage_keys with ARM_STAGE_FIELDS); with
    arm_dir, a data.preferences in that directory relative to the experiments' directory (portable)."""
    keys = pipeline_stage_keys(cfg, ARM_STAGE_FIELDS)
    if arm_dir is None:
        return keys
    return {s: _portable_key(k, arm_dir) for s, k in keys.items()}


def _portable_key(key: dict, arm_dir: Path) -> dict:
    if isinstance(key.get("data.preferences"), str):
        rel = portable({"data": {"preferences": key["data.preferences"]}}, arm_dir)["data"]["preferences"]
        return {**key, "data.preferences": rel}
    return key


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
    keys = stage_keys(cfg, arm_dir)
    stages = stages_of(cfg)
    best: tuple[list[str], Path | None] = ([], None)
    for prefix in sorted(pool.glob(f"*/arms/*/{PREFIX_FILE}")):
        donor = prefix.parent
        if donor.resolve() == arm_dir.resolve():
            continue
        theirs = read_json_object(prefix)
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
                if line.strip() and _metrics_row(donor / METRICS_FILE, line).get("stage") in linked] \
            if (donor / METRICS_FILE).exists() else []
        with open(arm_dir / METRICS_FILE, "a") as f:
            f.write("".join(r + "\n" for r in rows))
        donor_wall = donor / "wall_times.json"
        if donor_wall.exists():
            own = arm_dir / "wall_times.json"
            wall = read_json_object(own) if own.exists() else {}
            wall.update({s: v for s, v in read_json_object(donor_wall).items() if s in linked})
            write_json(own, wall, indent=None)
        print(f"[experiment] {arm_dir.name}: reusing {', '.join(linked)} of {donor}")
    return linked


def no_file_in_the_way(path: Path, what: str = "--out") -> None:
    """ValueError (one line) when path, or a folder above it, exists and is not a directory:
    checked before anything is created, so that nothing is made for a run that cannot be made."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "" if p == path else f": {p}"
            raise ValueError(f"{what} {path}: cannot make this directory (a file is in the way{where})")
        if p.exists():
            return


def check_arm_dir(arm: Arm, arm_dir: Path) -> dict | None:
    """Read-only: ValueError (one line naming the file) when arm_dir cannot be the arm's directory:
    a file in its way, a config.json of another configuration, or a config.json / arm.json /
    stages.json / prefix.json that is not a readable JSON object of the expected fields.
    Returns the finished arm's record (arm.json), None when it has not finished."""
    no_file_in_the_way(arm_dir)
    if not arm_dir.exists():
        return None
    path = arm_dir / CONFIG_FILE
    if path.exists():
        theirs = portable(read_json_object(path), arm_dir)
        mine = portable(json.loads(json.dumps(to_dict(arm.cfg))), arm_dir)
        if theirs != mine:
            diff = _first_difference(theirs, mine)
            if theirs.get("model") != mine.get("model"):  # most often: an --out made with another --preset
                preset = next((n for n, make in PRESETS.items() if to_dict(make())["model"] == theirs.get("model")),
                              None)
                diff = f"made with --preset {preset}; {diff}" if preset else diff
            raise ValueError(f"{path}: the arm's directory holds a run of another configuration ({diff}); use "
                             f"another --out, or delete {arm_dir} to run the arm again")
    for name in (PREFIX_FILE, STAGES_FILE, "wall_times.json"):
        if (arm_dir / name).exists():
            read_json_object(arm_dir / name)
    done = arm_dir / ARM_FILE
    if not done.exists():
        return None
    rec = read_json_object(done)
    require(done, rec, ARM_FIELDS)
    if "measured_with" in rec:
        require(done, rec, {"measured_with": dict})
    return rec


def check_arms(arms: list[Arm], exp_dir: Path) -> None:
    """Read-only, before any compute: ValueError (one line) when two arms would share a directory
    (one run counted twice) or an arm's directory cannot be its own (check_arm_dir)."""
    seen: dict[str, Arm] = {}
    for arm in arms:
        other = seen.setdefault(arm.dirname, arm)
        if other is not arm:
            raise ValueError(f"{exp_dir / 'arms' / arm.dirname}: arms {other.variant!r} and {arm.variant!r} (seed "
                             f"{arm.seed}) would be one run counted twice; choose options that keep them apart")
        check_arm_dir(arm, exp_dir / "arms" / arm.dirname)


def _metrics_row(path: Path, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: a line that is not JSON ({json_error(e)})") from None
    return row if isinstance(row, dict) else {}


def prepare_arm_dir(arm: Arm, arm_dir: Path) -> dict | None:
    """Create the arm's directory with its config.json and prefix.json; ValueError (check_arm_dir)
    when it cannot be the arm's. A data.preferences recorded in the arm's stages.json at the
    directory's former place (iterate's comparisons, the directory since moved) is brought to
    its current path, so that the finished stages are kept. Returns check_arm_dir's record."""
    rec = check_arm_dir(arm, arm_dir)
    arm_dir.mkdir(parents=True, exist_ok=True)
    path = arm_dir / CONFIG_FILE
    if not path.exists():
        write_json(path, to_dict(arm.cfg))
    write_json(arm_dir / PREFIX_FILE, stage_keys(arm.cfg, arm_dir))
    stages, now = arm_dir / STAGES_FILE, arm.cfg.data.preferences
    if now and stages.exists():
        keys = read_json_object(stages)
        rel = _portable_key({"data.preferences": now}, arm_dir)["data.preferences"]
        moved = {s: {**k, "data.preferences": now} for s, k in keys.items()
                 if isinstance(k, dict) and isinstance(k.get("data.preferences"), str)
                 and k["data.preferences"] != now
                 and _portable_key({"data.preferences": k["data.preferences"]}, arm_dir)["data.preferences"] == rel}
        if moved:
            write_json(stages, {**keys, **moved})
    return rec


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
    distributed.on_main(check_arms, arms, exp_dir)  # every arm's directory, before any arm computes
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
    return prepare_arm_dir(arm, arm_dir)


def _close_arm(done: Path, rec: dict) -> dict:
    """rec into arm.json (the arm is finished); returns rec."""
    write_json(done, rec)
    return rec
