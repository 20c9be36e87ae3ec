"""The gold preference function: how good a response is, by three criteria.

It stands in for the humans of InstructGPT: it labels the annotator's rankings and
scores evaluations. It is never a training reward: PPO sees only the learned reward
model, which has to infer these criteria from noisy rankings, and can be gamed.

    gold = 2 * correct + form + concise          range [-4, 4]; the ideal answer scores 4

Words are lower-case [a-z]+ runs; sentences are runs of text ending in . ! or ?.

- correct in [-1, 1]: with `need` the facts asked for (1, or 2 for "list two facts"),
  right = distinct asked values present, capped at need; wrong = distinct value words
  that are not a fact of the asked entity;
      correct = right / need - min(1, wrong / need).
  So a right answer is 1, a wrong one -1, a hedge naming both (or a non-answer) 0.
- form in {0, 1}: the requested form is followed: "word": exactly one word;
  "sentence": exactly one sentence of at least 3 words; "plain" (no instruction): at
  most one sentence; "facts": exactly two sentences.
- concise in [-1, 1]: 1 - 0.25 * offtask - 0.5 * repeats - 0.1 * excess, clipped, where
  offtask = words an answer has no use for (filler, other entities' names: anything
  outside the asked entity, the value words and the answer templates' words);
  repeats = occurrences of a non-stopword beyond its first (the entity's name may
  appear once per fact asked); excess = words beyond the form's budget (word 1,
  sentence/plain 9, facts 16).

Form and concision are credit for the shape of an *answer*: a response naming neither
the asked entity nor any value word (a rude refusal, an empty string) gets form 0 and
at most concise 0. Consequences the tests pin down: right and concise (4) > right with
filler (about 1-2) > wrong and concise (0); spamming the entity name and the value
("fox berries fox berries ...") costs the whole concision range and the form.
"""
from __future__ import annotations

import re
from collections import Counter

from .prompts import Spec
from .world import World, words

STOPWORDS = frozenset({"the", "a", "an", "in", "is", "of", "for", "its", "it", "and", "are", "to"})
BUDGET = {"word": 1, "sentence": 9, "plain": 9, "facts": 16}
GOLD_MIN, GOLD_MAX = -4.0, 4.0


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"[.!?]+", text) if re.search(r"[A-Za-z]", s)]


def gold_breakdown(world: World, spec: Spec, response: str) -> dict[str, float]:
    """The three criteria and their weighted sum: {"correct", "form", "concise", "gold"}."""
    ws = words(response)
    ent = world.entity(spec.entity)
    name = ent.name.lower()
    own = {v.lower() for _, v in ent.facts}
    asked = {ent.value(a).lower() for a in spec.attributes}
    said = {w for w in ws if w in world.value_words}
    need = spec.n_facts

    right = min(len(said & asked), need)
    wrong = len(said - own)
    correct = right / need - min(1.0, wrong / need)

    on_topic = bool(said) or name in ws
    n_sent = len(sentences(response))
    if not on_topic:
        form = 0.0
    elif spec.form == "word":
        form = float(len(ws) == 1)
    elif spec.form == "sentence":
        form = float(n_sent == 1 and len(ws) >= 3)
    elif spec.form == "plain":
        form = float(n_sent <= 1)
    else:
        form = float(n_sent == 2)

    allowed = world.template_words | world.value_words | {name}
    offtask = sum(w not in allowed for w in ws)
    counts = Counter(w for w in ws if w not in STOPWORDS)
    repeats = sum(max(0, c - (need if w == name else 1)) for w, c in counts.items())
    excess = max(0, len(ws) - BUDGET[spec.form])
    concise = max(-1.0, min(1.0, 1 - 0.25 * offtask - 0.5 * repeats - 0.1 * excess))
    if not on_topic:
        concise = min(concise, 0.0)

    gold = 2 * correct + form + concise
    return {"correct": correct, "form": form, "concise": concise, "gold": gold}
