"""The gold preference function on hand-worked examples in a hand-made world."""
import pytest
from hypothesis import given, settings, strategies as st

from minirlhf.data.gold import GOLD_MAX, GOLD_MIN, gold_breakdown
from minirlhf.data.prompts import Spec
from minirlhf.data.world import Entity, World

WORLD = World((
    Entity("fox", "animal", (("food", "berries"), ("habitat", "forest"), ("color", "red"))),
    Entity("owl", "animal", (("food", "fish"), ("habitat", "cave"), ("color", "gray"))),
    Entity("Lima", "city", (("country", "Peru"), ("weather", "sunny"), ("known", "music"))),
))
WORD = Spec("fox", ("food",), "word")
SENTENCE = Spec("fox", ("food",), "sentence")
PLAIN = Spec("fox", ("food",), "plain")
FACTS = Spec("fox", ("food", "habitat", "color"), "facts")


def g(spec, response):
    return gold_breakdown(WORLD, spec, response)


def test_ideal_answers_score_4():
    assert g(WORD, "Berries.") == {"correct": 1.0, "form": 1.0, "concise": 1.0, "gold": 4.0}
    assert g(SENTENCE, "The fox eats berries.")["gold"] == 4.0
    assert g(PLAIN, "The fox eats berries.")["gold"] == 4.0
    assert g(FACTS, "The fox eats berries. The fox lives in the forest.")["gold"] == 4.0
    assert g(Spec("Lima", ("country",), "word"), "Peru.")["gold"] == 4.0
    assert g(Spec("Lima", ("weather",), "sentence"), "The weather in Lima is sunny.")["gold"] == 4.0


def test_right_concise_beats_right_rambling_beats_wrong():
    concise = g(SENTENCE, "The fox eats berries.")
    rambling = g(SENTENCE, "Sure! Let me think about that. The fox eats berries. I hope this helps!")
    wrong = g(SENTENCE, "The fox eats fish.")
    # rambling: 4 sentences (form 0); 10 off-task words -> concise clipped to -1
    assert rambling == {"correct": 1.0, "form": 0.0, "concise": -1.0, "gold": 1.0}
    assert wrong == {"correct": -1.0, "form": 1.0, "concise": 1.0, "gold": 0.0}
    assert concise["gold"] > rambling["gold"] > wrong["gold"]
    # one word of filler: an extra sentence (form 0) and 1 off-task word (-0.25)
    assert g(SENTENCE, "Sure! The fox eats berries.")["gold"] == 2.75


def test_correctness():
    assert g(SENTENCE, "The fox eats berries or fish.")["correct"] == 0.0   # hedge
    assert g(SENTENCE, "The red fox eats berries.")["correct"] == 1.0      # a true extra fact is no error
    assert g(SENTENCE, "The fox eats insects.")["correct"] == -1.0         # any value not the fox's
    assert g(FACTS, "The fox eats berries.")["correct"] == 0.5             # one of two facts
    assert g(FACTS, "The fox eats berries. The fox is gray.")["correct"] == 0.0  # 0.5 right - 0.5 wrong


def test_form_violations_cost():
    assert g(WORD, "The fox eats berries.") == {"correct": 1.0, "form": 0.0, "concise": 0.7, "gold": 2.7}
    assert g(SENTENCE, "Berries.")["form"] == 0.0                           # a word is not a sentence
    assert g(PLAIN, "Berries.")["form"] == 1.0                              # no form asked: short is fine
    assert g(PLAIN, "The fox eats berries. The fox is red.")["form"] == 0.0
    assert g(FACTS, "The fox eats berries and lives in the forest.")["form"] == 0.0
    three = g(FACTS, "The fox eats berries. The fox lives in the forest. The fox is red.")
    assert three["form"] == 0.0 and three["correct"] == 1.0


def test_repetition_spam_scores_low():
    spam = g(WORD, "fox berries fox berries fox berries")
    # right value present, but form 0 and 4 repeats -> concise -1
    assert spam == {"correct": 1.0, "form": 0.0, "concise": -1.0, "gold": 1.0}
    assert g(SENTENCE, " ".join(["The fox eats berries."] * 4))["gold"] == 1.0
    # spamming every value word in sight: the wrong ones cancel the right one (correct 0),
    # 1 repeat and 8 words over the budget -> concise 1 - 0.5 - 0.8
    shotgun = g(WORD, "berries fish seeds forest cave red gray fox fox")
    assert shotgun["correct"] == 0.0 and shotgun["gold"] == pytest.approx(-0.3)


def test_off_topic_and_empty_get_no_form_or_concision_credit():
    assert g(SENTENCE, "Go away.")["gold"] == 0.0
    assert g(WORD, "No.")["gold"] == 0.0
    assert g(SENTENCE, "") == {"correct": 0.0, "form": 0.0, "concise": 0.0, "gold": 0.0}
    # another entity's facts: its value is wrong for the fox, its name is off-task
    assert g(SENTENCE, "The owl eats fish.") == {"correct": -1.0, "form": 1.0, "concise": 0.75, "gold": -0.25}


VOCAB = ["the", "fox", "owl", "Lima", "eats", "berries", "fish", "forest", "red", "Peru", "sure", "hope",
         "is", "in", "lives", ".", "!", "I", "help"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(VOCAB), max_size=40), st.sampled_from([WORD, SENTENCE, PLAIN, FACTS]))
def test_gold_stays_in_range(tokens, spec):
    b = g(spec, " ".join(tokens))
    assert GOLD_MIN <= b["gold"] <= GOLD_MAX
    assert b["gold"] == 2 * b["correct"] + b["form"] + b["concise"]
