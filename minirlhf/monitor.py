"""The over-optimisation monitor of every PPO run: the signs that the policy is gaming the
reward model rather than getting better, read off the rows PPO logs each iteration.

Per iteration it adds two numbers to the row PPO already logs (kl_to_ref, entropy,
response_len, rm_score, and gold every ppo.eval_every iterations):

    kl_growth     least-squares slope of kl_to_ref over the last `window` iterations (nats/iteration)
    repeat_frac   share of response tokens (EOS excluded) that repeat an earlier token of the
                  same response: spamming "fox berries fox berries" drives it up

and raises a one-line warning, on the progress bar and in the report, when

    reward_hacking    the RM score rose while gold fell: the latest gold is `gold_drop` standard
                      errors below the best gold so far, and the RM score (mean over a window) is
                      higher now than it was at that best (Gao et al. 2022: the proxy keeps
                      rising after the true reward has peaked)
    entropy_collapse  the policy's entropy (mean over the last window) fell below `entropy_ratio`
                      times its first iteration's: the policy is collapsing onto a few answers
    kl_acceleration   KL to the reference grows faster and faster: its growth rate over the last
                      window is more than `kl_accel` times the window before's, and above
                      `kl_growth` nats/iteration (the first window, where KL leaves 0, is never
                      the baseline)

The conditions are pure functions of the rows (`check`), so the report replays them over the
logged history (`scan`) and the tests feed them synthetic sequences.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

KINDS = ("reward_hacking", "entropy_collapse", "kl_acceleration")
LABELS = {"reward_hacking": "RM↑ gold↓", "entropy_collapse": "entropy collapse",
          "kl_acceleration": "KL accelerating"}


@dataclass(frozen=True)
class Thresholds:
    """The monitor's thresholds (PPOConfig's monitor_* fields; the module docstring says what each does)."""
    window: int = 5
    gold_drop: float = 3.0
    entropy_ratio: float = 0.25
    kl_accel: float = 2.0
    kl_growth: float = 0.1

    @classmethod
    def of(cls, pc) -> Thresholds:
        """From a PPOConfig."""
        return cls(window=pc.monitor_window, gold_drop=pc.monitor_gold_drop, entropy_ratio=pc.monitor_entropy_ratio,
                   kl_accel=pc.monitor_kl_accel, kl_growth=pc.monitor_kl_growth)


@dataclass(frozen=True)
class Alarm:
    """A warning: its kind (one of KINDS), the iteration it refers to, and one line for a person."""
    kind: str
    iteration: int
    message: str


def repeated_token_share(tokens: torch.Tensor, mask: torch.Tensor, eos_id: int) -> float:
    """Share of response tokens that repeat an earlier token of the same response.

    tokens: (B, R) long; mask: (B, R) bool, True on response tokens (EOS included, which is not
    counted). Returns a float in [0, 1]; 0 when no response has a token besides EOS."""
    valid = mask.bool() & (tokens != eos_id)
    same = tokens[:, :, None] == tokens[:, None, :]                       # (B, R, R): token i equals token j
    earlier = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device).tril(-1)
    repeated = (same & earlier & valid[:, None, :]).any(-1) & valid       # an earlier valid j < i holds it
    n = int(valid.sum())
    return float(repeated.sum()) / n if n else 0.0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (at least two distinct xs)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]


def kl_growth(rows: list[dict], window: int) -> float | None:
    """Slope of kl_to_ref over the last `window` rows (nats/iteration); None with fewer than 2."""
    pts = _series(rows, "kl_to_ref")[-window:]
    return slope(*zip(*pts)) if len(pts) >= 2 else None


def _window_mean(pts: list[tuple[int, float]], end_step: int, window: int) -> float | None:
    vals = [v for s, v in pts if end_step - window < s <= end_step]
    return sum(vals) / len(vals) if vals else None


def _reward_hacking(rows: list[dict], th: Thresholds) -> Alarm | None:
    golds = [(r["step"], float(r["gold"]), float(r.get("gold_se") or 0.0)) for r in rows
             if isinstance(r.get("gold"), (int, float))]
    if len(golds) < 2 or rows[-1]["step"] != golds[-1][0]:
        return None  # judged when a new gold evaluation arrives
    (sb, gb, seb), (sl, gl, sel) = max(golds[:-1], key=lambda p: p[1]), golds[-1]
    drop, se = gb - gl, math.hypot(seb, sel)
    z = drop / se if se > 0 else (math.inf if drop > 0 else 0.0)
    rm = _series(rows, "rm_score")
    rm_best, rm_last = _window_mean(rm, sb, th.window), _window_mean(rm, sl, th.window)
    if z >= th.gold_drop and rm_best is not None and rm_last is not None and rm_last > rm_best:
        return Alarm("reward_hacking", sl, f"RM score rising while gold falls: gold {gb:.2f} at iteration {sb} -> "
                     f"{gl:.2f} at {sl} ({z:.1f} SE lower) while the RM score rose {rm_best:.2f} -> {rm_last:.2f}")
    return None


def _entropy_collapse(rows: list[dict], th: Thresholds) -> Alarm | None:
    ent = _series(rows, "entropy")
    if len(ent) < 2:
        return None
    first, now = ent[0][1], _window_mean(ent, ent[-1][0], th.window)
    if first > 0 and now < th.entropy_ratio * first:
        return Alarm("entropy_collapse", ent[-1][0], f"entropy collapsed: {now:.3f} nats/token over the last "
                     f"{th.window} iterations, {now / first:.0%} of the first iteration's {first:.3f}")
    return None


def _kl_acceleration(rows: list[dict], th: Thresholds) -> Alarm | None:
    kl = _series(rows, "kl_to_ref")
    w = th.window
    if len(kl) < 3 * w:  # the first window (KL leaving 0) is never a baseline
        return None
    g_prev, g_now = slope(*zip(*kl[-2 * w:-w])), slope(*zip(*kl[-w:]))
    if g_now > th.kl_growth and g_now > th.kl_accel * max(g_prev, 0.0):
        return Alarm("kl_acceleration", kl[-1][0], f"KL to the reference accelerating: +{g_now:.3f} nats/iteration "
                     f"over the last {w} iterations against {g_prev:+.3f} over the {w} before (KL now "
                     f"{kl[-1][1]:.2f})")
    return None


def check(rows: list[dict], th: Thresholds) -> list[Alarm]:
    """The warnings that hold at the last row. rows: PPO's metrics rows in step order, each
    with "step" and any of kl_to_ref, entropy, rm_score, gold, gold_se."""
    if not rows:
        return []
    found = (_reward_hacking(rows, th), _entropy_collapse(rows, th), _kl_acceleration(rows, th))
    return [a for a in found if a is not None]


def scan(rows: list[dict], th: Thresholds) -> list[Alarm]:
    """Replay `check` over a run's history: the first firing of each kind, in iteration order."""
    first: dict[str, Alarm] = {}
    rows = sorted(rows, key=lambda r: r["step"])
    for i in range(1, len(rows) + 1):
        for a in check(rows[:i], th):
            first.setdefault(a.kind, a)
    return sorted(first.values(), key=lambda a: a.iteration)


class Monitor:
    """PPO's live monitor: observe(step, row, ...) after each iteration's row is built returns the
    entries to add to it (kl_growth, repeat_frac, and "warning": the active warnings' short labels,
    shown on the progress bar). A warning's first firing is also printed as one line on stderr.

    history: the rows of the run so far (a resumed run), so its windows span the resume."""

    def __init__(self, th: Thresholds, history: list[dict] = (), stage: str = "ppo"):
        self.th, self.stage = th, stage
        self.rows = sorted((dict(r) for r in history), key=lambda r: r["step"])
        self.fired = {a.kind for a in scan(self.rows, th)}

    def observe(self, step: int, row: dict, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                eos_id: int | None = None) -> dict:
        extras = {}
        if tokens is not None:
            extras["repeat_frac"] = repeated_token_share(tokens, mask, eos_id)
        self.rows.append({**row, **extras, "step": step})
        growth = kl_growth(self.rows, self.th.window)
        if growth is not None:
            extras["kl_growth"] = self.rows[-1]["kl_growth"] = growth
        active = check(self.rows, self.th)
        if active:
            extras["warning"] = ", ".join(LABELS[a.kind] for a in active)
        for a in active:
            if a.kind not in self.fired:
                self.fired.add(a.kind)
                from tqdm import tqdm
                tqdm.write(f"[{self.stage}] warning at iteration {a.iteration}: {a.message}", file=sys.stderr)
        return extras
