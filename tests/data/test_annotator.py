"""The simulated annotator: Plackett-Luce rankings and 1..7 ratings from the gold score."""
import random

import pytest

from minirlhf.data import Annotator

GOLD = {"a": 4.0, "b": 2.5, "c": 1.0, "d": 0.0, "e": -1.0, "f": -2.0, "g": 3.0, "h": -4.0, "i": 0.5}


def gold(prompt, response):
    return GOLD[response]


def test_noise_zero_ranks_exactly_by_gold():
    ann = Annotator(gold, 0.0, seed=0)
    rng = random.Random(0)
    for k in range(2, 10):
        responses = rng.sample(sorted(GOLD), k)
        ranking = ann.rank("p", responses)
        assert [responses[i] for i in ranking] == sorted(responses, key=lambda r: -GOLD[r])


def test_noise_zero_keeps_the_given_order_for_ties():
    assert Annotator(gold, 0.0, 0).rank("p", ["d", "a", "d", "a"]) == [1, 3, 0, 2]


def test_rankings_are_permutations_for_k_2_to_9():
    ann = Annotator(gold, 2.0, seed=1)
    for k in range(2, 10):
        for _ in range(20):
            assert sorted(ann.rank("p", list(GOLD)[:k])) == list(range(k))


@pytest.mark.parametrize("k", [0, 1, 10])
def test_k_outside_2_to_9_raises(k):
    with pytest.raises(ValueError, match="expected 2..9"):
        Annotator(gold, 0.5, 0).rank("p", ["a"] * k)


def test_seeded():
    calls = [["a", "b", "c", "d"], ["g", "b", "c"], list(GOLD)]
    run = lambda seed: [Annotator(gold, 3.0, seed).rank("p", r) for r in calls * 5]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_noise_swaps_close_responses_more_than_far_ones():
    ann = Annotator(gold, 0.5, seed=2)
    n = 2000
    far = sum(ann.rank("p", ["c", "a"]) == [1, 0] for _ in range(n)) / n   # gold 1 vs 4
    close = sum(ann.rank("p", ["g", "a"]) == [1, 0] for _ in range(n)) / n  # gold 3 vs 4
    # Plackett-Luce with utilities gold / noise: P(a first) = sigmoid(diff / noise)
    assert far == pytest.approx(1 / (1 + 2.718281828 ** -6), abs=0.02)
    assert close == pytest.approx(1 / (1 + 2.718281828 ** -2), abs=0.03)


def test_ratings_are_1_to_7():
    exact = Annotator(gold, 0.0, 0).rate("p", ["a", "h", "d", "b"])
    assert exact == [7, 1, 4, 6]                  # round(4 + 0.75 * gold)
    noisy = Annotator(gold, 1.0, 0)
    for _ in range(50):
        assert all(1 <= r <= 7 for r in noisy.rate("p", list(GOLD)))


def test_negative_noise_raises():
    with pytest.raises(ValueError, match="noise"):
        Annotator(gold, -0.1, 0)
