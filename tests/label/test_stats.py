"""Win rate with its Wilson interval, Kendall's tau-b and pairwise agreement, against
hand-worked values and independent computations."""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from minirlhf.label.state import ratings_from
from minirlhf.label.stats import agreement, kendall_tau_b, wilson_interval, win_rate


@pytest.mark.parametrize("k,n", [(7, 10), (0, 10), (10, 10), (1, 3), (37, 80), (5, 5000)])
def test_wilson_interval_solves_its_defining_quadratic(k, n):
    """The interval's ends are the p0 with (p - p0)^2 = z^2 p0 (1 - p0) / n: the roots of
    (1 + z^2/n) p0^2 - (2p + z^2/n) p0 + p^2 = 0, found here with numpy.roots."""
    z, p = 1.959963984540054, k / n
    roots = sorted(np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]).real)
    lo, hi = wilson_interval(p, n)
    assert lo == pytest.approx(max(0.0, roots[0]), abs=1e-9) and hi == pytest.approx(min(1.0, roots[1]), abs=1e-9)


def test_wilson_interval_known_values():
    # 0 of 10: the upper end is z^2 / (n + z^2) = 0.2775 (the Wilson formula at p = 0)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 3.8414588 / 13.8414588), abs=1e-6)
    assert wilson_interval(0.7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_win_rate_counts_a_tie_as_half():
    rows = [{"winner": w} for w in "A A A B".split()] + [{"winner": "tie"}] * 2 + [{"skipped": True}]
    r = win_rate(rows)
    assert (r["judgements"], r["a_wins"], r["b_wins"], r["ties"], r["skipped"]) == (6, 3, 1, 2, 1)
    assert r["win_rate_a"] == pytest.approx(4 / 6)
    assert r["ci95"] == pytest.approx(list(wilson_interval(4 / 6, 6)))
    assert win_rate([])["win_rate_a"] is None


def _tau_b_by_definition(x, y):
    """Kendall (1945): tau-b = sum_ij sgn(dx) sgn(dy) / sqrt(sum_ij sgn(dx)^2 * sum_ij sgn(dy)^2)."""
    pairs = list(combinations(range(len(x)), 2))
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
    return s / math.sqrt(sum(np.sign(x[i] - x[j]) ** 2 for i, j in pairs) * sum(np.sign(y[i] - y[j]) ** 2 for i, j in pairs))


def test_kendall_tau_b():
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # hand-worked: y ties items 2 and 3; 5 concordant pairs, none discordant: 5 / sqrt(6 * 5)
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 2, 4]) == pytest.approx(5 / math.sqrt(30))
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 9))
        x, y = rng.integers(0, 4, n).tolist(), rng.integers(0, 4, n).tolist()
        expected = kendall_tau_b(x, y)
        if expected is not None:
            assert expected == pytest.approx(_tau_b_by_definition(x, y))


def test_ratings_from_ties():
    assert ratings_from([2, 0, 1], [False, False]) == [6, 5, 7]
    assert ratings_from([2, 0, 1], [True, False]) == [7, 6, 7]
    assert ratings_from([3, 1, 0, 2], [False, True, True]) == [6, 6, 6, 7]
    assert ratings_from(list(range(8)), [False, True] + [False] * 5) == [7, 6, 6, 5, 4, 3, 2, 1]


def test_agreement_hand_worked():
    resp3 = ["a", "b", "c"]
    rows = [
        # prompt p: ranking 0 > 1 > 2 vs 0 > 2 > 1: pairs (0,1) (0,2) agree, (1,2) disagrees
        {"prompt": "p", "responses": resp3, "ranking": [0, 1, 2], "annotator": "ann-one-1"},
        {"prompt": "p", "responses": resp3, "ranking": [0, 2, 1], "annotator": "ann-two-2"},
        # prompt q: the second annotator ties 1 and 2: (0,1) (0,2) agree, (1,2) tied -> left out
        {"prompt": "q", "responses": resp3, "ranking": [2, 1, 0], "annotator": "ann-one-1"},
        {"prompt": "q", "responses": resp3, "ratings": [1, 5, 5], "annotator": "ann-two-2"},
        # judged once, or skipped by the second: no agreement data
        {"prompt": "r", "responses": resp3, "ranking": [0, 1, 2], "annotator": "ann-one-1"},
        {"prompt": "s", "responses": resp3, "ranking": [0, 1, 2], "annotator": "ann-one-1"},
        {"prompt": "s", "responses": resp3, "ratings": [4, 4, 4], "skipped": True, "annotator": "ann-two-2"},
    ]
    a = agreement(rows)
    assert a["prompts"] == 2 and a["annotators"] == 2
    assert (a["pairs"], a["tied_pairs"]) == (5, 1)
    assert a["pairwise_agreement"] == pytest.approx(4 / 5)
    # tau-b: p = (2 - 1) / 3 = 1/3; q: scores (1, 2, 3) vs (1, 5, 5): 2 concordant, 1 tied in y -> 2 / sqrt(3 * 2)
    assert a["kendall_tau"] == pytest.approx((1 / 3 + 2 / math.sqrt(6)) / 2)
    assert a["kendall_tau_n"] == 2
    assert a["skipped_shared"] == 1  # s: shown to both, skipped by one


def test_agreement_over_conversation_prompts():
    """A prompt may be a conversation (a list of messages): same turns, same prompt; one turn
    different, another prompt. Hand-worked like the test above."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Lima?"}]
    other = [chat[0], {"role": "user", "content": "Where is Quito?"}]
    resp = ["a", "b", "c"]
    rows = [
        {"prompt": chat, "responses": resp, "ranking": [0, 1, 2], "annotator": "ann-one-1"},
        {"prompt": [dict(m) for m in chat], "responses": resp, "ranking": [1, 0, 2], "annotator": "ann-two-2"},
        {"prompt": other, "responses": resp, "ranking": [0, 1, 2], "annotator": "ann-two-2"},
        {"prompt": "Where is Lima?", "responses": resp, "ranking": [2, 1, 0], "annotator": "ann-one-1"},
    ]
    a = agreement(rows)
    # only `chat` was judged twice: (0,2) and (1,2) agree, (0,1) disagrees; tau-b = (2 - 1) / 3
    assert a["prompts"] == 1 and (a["pairs"], a["tied_pairs"]) == (3, 0)
    assert a["pairwise_agreement"] == pytest.approx(2 / 3) and a["kendall_tau"] == pytest.approx(1 / 3)
