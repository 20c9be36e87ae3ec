"""The simulated annotator: ranks or rates responses by the gold function, with noise.

It plays InstructGPT's labellers. Its labels train the reward model; the gold function
behind them is never a training reward itself.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from .gold import GOLD_MAX, GOLD_MIN

K_MIN, K_MAX = 2, 9


class Annotator:
    """Ranks K = 2..9 responses to a prompt, or rates each 1..7, from `gold_score`.

    rank: a Plackett-Luce draw with utilities gold / noise, sampled the Gumbel way:
    sort by gold + noise * Gumbel(0, 1). noise = 0 ranks exactly by gold (ties keep
    the given order); larger noise swaps responses whose gold is within about `noise`.
    rate: round(1 + 6 * (gold + noise * N(0, 1.28) - GOLD_MIN) / (GOLD_MAX - GOLD_MIN)),
    clipped to 1..7, the normal noise having the Gumbel's standard deviation (pi/sqrt 6).

    Seeded: the same seed and the same sequence of calls give the same labels.
    """

    def __init__(self, gold_score: Callable[[str, str], float], noise: float, seed: int):
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"annotator noise must be a finite number >= 0, got {noise}")
        self.gold_score = gold_score
        self.noise = float(noise)
        self.rng = random.Random(f"minirlhf-annotator-{seed}")

    def _golds(self, prompt: str, responses: Sequence[str]) -> list[float]:
        if not K_MIN <= len(responses) <= K_MAX:
            raise ValueError(f"annotator: K = {len(responses)} responses, expected {K_MIN}..{K_MAX}")
        return [self.gold_score(prompt, r) for r in responses]

    def rank(self, prompt: str, responses: Sequence[str]) -> list[int]:
        """Indices of `responses`, best first."""
        golds = self._golds(prompt, responses)
        utility = [g + self.noise * self._gumbel() for g in golds]
        return sorted(range(len(responses)), key=lambda i: -utility[i])  # stable: ties keep order

    def _gumbel(self) -> float:
        u = self.rng.random() or 5e-324  # Gumbel(0, 1) = -log(-log U), U in (0, 1)
        return -math.log(-math.log(u))

    def rate(self, prompt: str, responses: Sequence[str]) -> list[int]:
        """A 1..7 rating per response (7 best)."""
        golds = self._golds(prompt, responses)
        sd = self.noise * math.pi / math.sqrt(6)
        out = []
        for g in golds:
            g = g + (self.rng.gauss(0.0, sd) if sd else 0.0)
            out.append(min(7, max(1, round(1 + 6 * (g - GOLD_MIN) / (GOLD_MAX - GOLD_MIN)))))
        return out
