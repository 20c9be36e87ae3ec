"""What a labelling run measures: the win rate of a blind A/B comparison with its
confidence interval, and how well two annotators agree on the same responses.

    win_rate(rows)     -> {"judgements", "a_wins", "b_wins", "ties", "win_rate_a", "ci95"}
    agreement(rows)    -> {"prompts", "pairs", "pairwise_agreement", "kendall_tau", "skipped_shared", ...}
    wilson_interval(p, n), kendall_tau_b(x, y)
"""
from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion p observed over n trials (Wilson 1927,
    "Probable inference, the law of succession, and statistical inference"): the p0 with
    |p - p0| <= z sqrt(p0 (1 - p0) / n). Unlike p ± z·SE it stays inside [0, 1] and is not
    empty at p = 0 or 1. Raises ValueError for n < 1 or p outside [0, 1]."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"wilson_interval: need n >= 1 and 0 <= p <= 1, got p={p}, n={n}")
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(rows: list[dict]) -> dict:
    """Win rate of model A over model B from compare rows ({"winner": "A" | "B" | "tie"};
    skipped rows have no winner). A tie counts as half a win, the usual convention for
    pairwise win rates (InstructGPT's human evaluation reports such a rate against a
    baseline, Ouyang et al. 2022). The 95% interval is Wilson's on that rate:
    ties only lower the variance of a judgement, so treating the rate as a binomial
    proportion gives an interval at least as wide as needed."""
    wins = sum(r.get("winner") == "A" for r in rows)
    losses = sum(r.get("winner") == "B" for r in rows)
    ties = sum(r.get("winner") == "tie" for r in rows)
    n = wins + losses + ties
    rate = (wins + ties / 2) / n if n else None
    return {"judgements": n, "a_wins": wins, "b_wins": losses, "ties": ties,
            "skipped": sum(bool(r.get("skipped")) for r in rows),
            "win_rate_a": rate, "ci95": list(wilson_interval(rate, n)) if n else None}


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b between two scorings of the same n items (Kendall 1945, "The treatment
    of ties in ranking problems"): (C - D) / sqrt((n0 - n1)(n0 - n2)) over the n0 = n(n-1)/2
    pairs, C concordant, D discordant, n1 / n2 pairs tied in x / y. None where a scoring is
    all ties (undefined)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: {len(x)} scores vs {len(y)}")
    s = t_x = t_y = 0
    n0 = len(x) * (len(x) - 1) // 2
    for i, j in combinations(range(len(x)), 2):
        a, b = _sign(x[i] - x[j]), _sign(y[i] - y[j])
        s += a * b
        t_x += a == 0
        t_y += b == 0
    if n0 == t_x or n0 == t_y:
        return None
    return s / math.sqrt((n0 - t_x) * (n0 - t_y))


def scores(row: dict) -> list[int] | None:
    """Higher = better, one per response, from a ranking (best first) or ratings row;
    None for a skipped row."""
    if row.get("skipped"):
        return None
    if "ranking" in row:
        k = len(row["ranking"])
        out = [0] * k
        for pos, idx in enumerate(row["ranking"]):
            out[idx] = k - pos
        return out
    return list(row["ratings"])


def _hashable(prompt):
    """A prompt as a dict key: a string as is, a conversation as its (role, content) turns."""
    return prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)


def agreement(rows: list[dict]) -> dict:
    """Inter-annotator agreement over the prompts that two or more annotators judged (rows
    with the same prompt, a string or a conversation, and the same responses, different
    "annotator"); every pair of annotators of a prompt counts once.

    pairwise_agreement: over response pairs that both annotators ordered strictly, the
    fraction ordered the same way (the rate InstructGPT reports for its labellers, Ouyang
    et al. 2022); pairs one of them tied are counted apart (tied_pairs). kendall_tau: the mean over
    (prompt, annotator pair) of Kendall's tau-b between the two orderings, where defined.
    skipped_shared: prompts two or more annotators were shown but fewer than two judged (the
    others skipped them; a skip carries no ordering)."""
    by_prompt: dict[tuple, dict[str, list[int]]] = defaultdict(dict)
    seen: dict[tuple, set[str]] = defaultdict(set)
    annotators = set()
    for r in rows:
        s = scores(r)
        key = (_hashable(r["prompt"]), tuple(r["responses"]))
        seen[key].add(r["annotator"])
        if s is not None:
            by_prompt[key][r["annotator"]] = s
            annotators.add(r["annotator"])
    agree = strict = tied = 0
    taus = []
    prompts = 0
    for judged in by_prompt.values():
        if len(judged) < 2:
            continue
        prompts += 1
        for a, b in combinations(sorted(judged), 2):
            x, y = judged[a], judged[b]
            for i, j in combinations(range(len(x)), 2):
                sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
                if sx and sy:
                    strict += 1
                    agree += sx == sy
                else:
                    tied += 1
            tau = kendall_tau_b(x, y)
            if tau is not None:
                taus.append(tau)
    skipped_shared = sum(len(who) >= 2 and len(by_prompt.get(key, ())) < 2 for key, who in seen.items())
    return {"prompts": prompts, "annotators": len(annotators), "pairs": strict, "tied_pairs": tied,
            "skipped_shared": skipped_shared,
            "pairwise_agreement": agree / strict if strict else None,
            "kendall_tau": sum(taus) / len(taus) if taus else None, "kendall_tau_n": len(taus)}
