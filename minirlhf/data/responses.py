"""Who answers a prompt: the ideal assistant, the imperfect demonstrators, and the bad
assistants whose dialogues litter the pretraining corpus.

The demonstrators are good but not the best possible, each fault drawn independently:
a wrong value (`demo_wrong`), the requested form ignored (`demo_off_form`), filler
around the answer (`demo_filler`). SFT copies these faults; a reward model learns from
rankings that they cost, and PPO can remove them: that gap is what RLHF shows here.
"""
from __future__ import annotations

import random

from .prompts import Spec
from .world import ATTRIBUTE, World, fill

FILLER_OPENINGS = (
    "Sure!", "Sure! Let me think about that.", "Great question!", "Good question. Let me see.",
    "Of course!", "Well, let me think.",
)
FILLER_CLOSINGS = (
    "I hope this helps!", "Let me know if you want more.", "Happy to help!",
    "I hope that answers your question.",
)
RUDE = (
    "Ask someone else.", "Why do you care?", "That is a silly question.", "I do not want to say.",
    "Look it up yourself.", "No.", "Go away.", "Who knows?",
)
RAMBLE = (
    "That is a hard one.", "Many people ask me this.", "I am not really sure.",
    "There is a lot to say here.", "It depends on what you mean.", "Let me think about it for a while.",
    "This reminds me of something.", "Anyway, where was I?",
)
# How the corpus's bad assistants fail, and how often (relative weights).
BAD_KINDS = {"off_topic": 0.2, "repetitive": 0.2, "rambling": 0.25, "rude": 0.15, "wrong": 0.2}


def statement(world: World, entity: str, attribute: str, value: str, rng: random.Random | None) -> str:
    """One sentence stating entity.attribute = value (the first template when rng is None)."""
    answers = ATTRIBUTE[attribute].answers
    t = answers[0] if rng is None else rng.choice(answers)
    return fill(t, world.entity(entity), value)


def wrong_value(attribute: str, right: str, rng: random.Random) -> str:
    return rng.choice([v for v in ATTRIBUTE[attribute].values if v != right])


def answer(world: World, spec: Spec, rng: random.Random | None, values: dict[str, str] | None = None,
           form: str | None = None, n_facts: int = 2, order: list[str] | None = None) -> str:
    """An answer to `spec` in `form` (default: the requested one), stating `values`
    (default: the true ones); a "facts" answer states the first `n_facts` attributes of
    `order` (default: shuffled). rng=None gives the canonical ideal answer."""
    ent = world.entity(spec.entity)
    values = values or {a: ent.value(a) for a in ent.attributes}
    form = form or spec.form
    if form == "word":
        v = values[spec.attributes[0]]
        return v[0].upper() + v[1:] + "."
    if form in ("sentence", "plain"):
        return statement(world, spec.entity, spec.attributes[0], values[spec.attributes[0]], rng)
    if order is None:
        order = list(spec.attributes) if rng is None else rng.sample(spec.attributes, len(spec.attributes))
    return " ".join(statement(world, spec.entity, a, values[a], rng) for a in order[:n_facts])


def ideal(world: World, spec: Spec) -> str:
    """The best answer: right, in the requested form, nothing else (gold = its maximum)."""
    return answer(world, spec, None)


def demonstrate(world: World, spec: Spec, rng: random.Random,
                p_wrong: float, p_off_form: float, p_filler: float) -> str:
    """A demonstrator's answer: right and well-formed unless a fault is drawn."""
    ent = world.entity(spec.entity)
    values = {a: ent.value(a) for a in ent.attributes}
    order = rng.sample(spec.attributes, len(spec.attributes))  # facts stated, for "facts"
    if rng.random() < p_wrong:
        a = rng.choice(order[:2]) if spec.form == "facts" else spec.attributes[0]
        values[a] = wrong_value(a, values[a], rng)
    if rng.random() < p_off_form:
        # The demonstrator answers in a form other than the one asked for.
        if spec.form == "word":
            text = answer(world, spec, rng, values, form="sentence")
        elif spec.form == "facts":
            text = answer(world, spec, rng, values, n_facts=rng.choice((1, 3)), order=order)
        elif spec.form == "sentence" and rng.random() < 0.5:
            text = answer(world, spec, rng, values, form="word")
        else:  # an extra, unasked-for fact as a second sentence
            extra = rng.choice([a for a in ent.attributes if a != spec.attributes[0]])
            text = (answer(world, spec, rng, values, form="sentence") + " "
                    + statement(world, spec.entity, extra, values[extra], rng))
    else:
        text = answer(world, spec, rng, values, order=order)
    if rng.random() < p_filler:
        where = rng.random()
        if where < 0.7:
            text = rng.choice(FILLER_OPENINGS) + " " + text
        if where >= 0.5:
            text = text + " " + rng.choice(FILLER_CLOSINGS)
    return text


def bad_answer(world: World, spec: Spec, rng: random.Random, kind: str | None = None) -> str:
    """How the corpus's unaligned assistants answer: off-topic, repetitive, rambling,
    rude or wrong (kind drawn from BAD_KINDS when not given)."""
    kind = kind or rng.choices(list(BAD_KINDS), weights=list(BAD_KINDS.values()))[0]
    ent = world.entity(spec.entity)
    attr = spec.attributes[0] if spec.form != "facts" else rng.choice(spec.attributes)
    right = statement(world, spec.entity, attr, ent.value(attr), rng)
    if kind == "off_topic":
        other = rng.choice([e for e in world.entities if e.name != ent.name])
        return " ".join(statement(world, other.name, a, other.value(a), rng)
                        for a in rng.sample(other.attributes, rng.randint(1, 2)))
    if kind == "repetitive":
        if rng.random() < 0.5:
            return " ".join([right] * rng.randint(3, 5))
        spam = [ent.name, ent.value(attr)] * rng.randint(3, 6)
        return " ".join(spam)
    if kind == "rambling":
        said = right if rng.random() < 0.5 else statement(
            world, spec.entity, attr, wrong_value(attr, ent.value(attr), rng), rng)
        parts = rng.sample(RAMBLE, rng.randint(2, 4))
        if said.startswith("The "):
            said = "the" + said[3:]
        parts.insert(rng.randint(0, len(parts)), "I think " + said)
        return " ".join(parts)
    if kind == "rude":
        return rng.choice(RUDE)
    if kind == "wrong":
        values = {a: wrong_value(a, ent.value(a), rng) for a in ent.attributes}
        return answer(world, spec, rng, values, form=rng.choice(("word", "sentence", spec.form)))
    raise ValueError(f"unknown bad answer kind {kind!r}")
