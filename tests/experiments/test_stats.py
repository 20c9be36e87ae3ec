"""The numbers an experiment reports, on hand-worked examples: mean and SE across seeds, the
difference of two arms, the analytic KL of best-of-n and the best-of-n estimate from a pool."""
import itertools
import math
import random

import pytest

from minirlhf.experiments.best_of_n import curve, powers_of_two
from minirlhf.experiments.stats import across_seeds, best_of_n_expectation, best_of_n_kl, difference


def test_across_seeds_by_hand():
    # 1 2 3 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; sd = √(5/3) = 1.2910;
    # se = sd / 2 = 0.6455
    st = across_seeds([1.0, 2.0, 3.0, 4.0])
    assert st["mean"] == 2.5 and st["n"] == 4
    assert st["sd"] == pytest.approx(math.sqrt(5 / 3)) and st["se"] == pytest.approx(math.sqrt(5 / 3) / 2)
    # a seed that measured nothing is left out; one value has no spread
    assert across_seeds([2.0, None, float("nan"), 4.0]) == {"mean": 3.0, "se": 1.0, "sd": math.sqrt(2), "n": 2,
                                                            "values": [2.0, 4.0]}
    assert across_seeds([0.7]) == {"mean": 0.7, "se": None, "sd": None, "n": 1, "values": [0.7]}
    assert across_seeds([])["mean"] is None


def test_difference_of_two_arms_by_hand():
    a = across_seeds([3.0, 3.2, 3.4])   # mean 3.2, sd 0.2, se 0.2/√3 = 0.11547
    b = across_seeds([2.0, 2.6, 3.2])   # mean 2.6, sd 0.6, se 0.6/√3 = 0.34641
    d = difference(a, b)
    assert d["diff"] == pytest.approx(0.6)
    assert d["se"] == pytest.approx(math.sqrt(0.04 / 3 + 0.36 / 3))  # 0.36515
    assert d["significant"] is False                                  # 0.6 < 2 · 0.365
    d = difference(a, across_seeds([2.0, 2.1, 2.2]))                 # 1.1 ± √(0.04/3 + 0.01/3) = 0.129
    assert d["diff"] == pytest.approx(1.1) and d["significant"] is True
    assert difference(a, across_seeds([2.0]))["significant"] is None


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)
    assert best_of_n_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)
    assert best_of_n_kl(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_expectation_by_hand():
    # pool of 3: rewards 0.3 0.1 0.2, gold 5 1 3. By reward: (0.1, 1), (0.2, 3), (0.3, 5).
    # n = 1: the mean gold, 3. n = 2: of the 3 pairs, one has best (0.2, 3), two have (0.3, 5): 13/3.
    # n = 3: always (0.3, 5).
    r, g = [0.3, 0.1, 0.2], [5.0, 1.0, 3.0]
    assert best_of_n_expectation(r, g, 1) == pytest.approx(3.0)
    assert best_of_n_expectation(r, g, 2) == pytest.approx(13 / 3)
    assert best_of_n_expectation(r, g, 3) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        best_of_n_expectation(r, g, 4)


def test_best_of_n_expectation_matches_every_subset():
    rng = random.Random(0)
    rewards = [rng.gauss(0, 1) for _ in range(9)]
    golds = [rng.uniform(-4, 4) for _ in range(9)]
    for n in range(1, 10):
        subsets = list(itertools.combinations(range(9), n))
        brute = sum(golds[max(s, key=lambda i: rewards[i])] for s in subsets) / len(subsets)
        assert best_of_n_expectation(rewards, golds, n) == pytest.approx(brute)


def test_best_of_n_curve_by_hand():
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64] and powers_of_two(6) == [1, 2, 4, 6]
    # two prompts, pools of 2: prompt A rewards (1, 0) gold (2, 4); prompt B rewards (0, 1) gold (0, 2)
    # n = 1: gold means 3 and 1 -> 2, SE over prompts √(((3−2)² + (1−2)²)/1 / 2) = 1
    # n = 2: the RM picks gold 2 (A) and 2 (B) -> 2, SE 0; RM score of the pick 1 and 1
    c = curve([[1.0, 0.0], [0.0, 1.0]], [[2.0, 4.0], [0.0, 2.0]], [1, 2])
    assert c[0]["gold_mean"] == pytest.approx(2.0) and c[0]["gold_se"] == pytest.approx(1.0)
    assert c[0]["rm_mean"] == pytest.approx(0.5) and c[0]["kl"] == 0.0
    assert c[1]["gold_mean"] == pytest.approx(2.0) and c[1]["gold_se"] == 0.0 and c[1]["rm_mean"] == 1.0
    assert c[1]["kl"] == pytest.approx(math.log(2) - 0.5) and c[1]["sqrt_kl"] == pytest.approx(math.sqrt(c[1]["kl"]))
