"""The numbers an experiment reports: means and standard errors across seeds, the difference
of two arms, and best-of-n (its expected gold from a pool of samples, its analytic KL)."""
from __future__ import annotations

import functools
import math
from math import comb


def across_seeds(values: list[float | None]) -> dict:
    """{"mean", "se", "sd", "n", "values"} of one number measured once per seed (None = not measured,
    left out). sd is the sample standard deviation (n − 1); se = sd / √n, the standard error of
    the mean across seeds; both None with fewer than 2 values (one seed says nothing about
    the spread). mean is None with no value."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(xs)
    mean = sum(xs) / n if n else None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "se": sd / math.sqrt(n) if sd is not None else None, "sd": sd, "n": n, "values": xs}


def difference(a: dict, b: dict, z: float = 2.0) -> dict:
    """a − b for two across_seeds results: {"diff", "se", "significant"}, se = √(se_a² + se_b²)
    (independent seeds); significant: |diff| > z · se (None when either side has no SE)."""
    if a["mean"] is None or b["mean"] is None:
        return {"diff": None, "se": None, "significant": None}
    diff = a["mean"] - b["mean"]
    if a["se"] is None or b["se"] is None:
        return {"diff": diff, "se": None, "significant": None}
    se = math.hypot(a["se"], b["se"])
    return {"diff": diff, "se": se, "significant": abs(diff) > z * se}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ π) = log n − (n − 1)/n nats, the analytic KL of picking the best of n
    independent samples of π by a reward without ties (Stiennon et al. 2020, appendix G.3;
    Gao et al. 2022, §3; Beirami et al. 2024 show it is an upper bound of the exact KL)."""
    if n < 1:
        raise ValueError(f"best-of-n: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_expectation(rewards: list[float], values: list[float], n: int) -> float:
    """E[value of the sample with the highest reward among n drawn without replacement from the
    pool]: an unbiased estimate of best-of-n from N >= n samples of one prompt, averaging over
    every n-subset of the pool at once instead of splitting it into N/n disjoint groups. With
    the pool sorted by reward ascending, the i-th sample (0-based) is the best of a uniformly
    drawn n-subset with probability C(i, n − 1) / C(N, n): the other n − 1 members come from
    the i samples below it. Reward ties are broken by pool order.

    rewards, values: length N (RM score and gold of each sample). The weights are exact integer
    ratios (no overflow for pools of thousands, where C(N, n) has hundreds of digits)."""
    N = len(rewards)
    if not 1 <= n <= N or len(values) != N:
        raise ValueError(f"best-of-n: n={n} needs 1 <= n <= N={N} samples with a value each")
    order = sorted(range(N), key=lambda i: rewards[i])
    w = _best_weights(N, n)
    return sum(w[i] * values[order[i]] for i in range(n - 1, N))


@functools.lru_cache(maxsize=64)
def _best_weights(N: int, n: int) -> tuple[float, ...]:
    """P(the i-th lowest of N is the best of a uniform n-subset) = C(i, n − 1) / C(N, n), i = 0..N−1,
    each an exact ratio of integers rounded once to float."""
    total = comb(N, n)
    return tuple(comb(i, n - 1) / total if i >= n - 1 else 0.0 for i in range(N))
