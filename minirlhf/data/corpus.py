"""The pretraining corpus: the world's facts in prose, with rare assistant dialogues.

Prose documents state facts in varied templates (a profile of one entity, a pair of
entities, the entities sharing a value, a mix of facts), so the base model learns the
world. A `dialogue_fraction` of documents are `User: ...\\nAssistant: ...` exchanges;
of those only `base_alignment` are good answers, the rest come from bad assistants,
so a base model prompted with the chat template answers badly until SFT.
"""
from __future__ import annotations

import random

from ..tokenizer import dialogue_text
from .prompts import Spec
from .responses import bad_answer, ideal
from .world import ATTRIBUTE, Entity, World, fill

INTROS = {
    "animal": ("Here is what we know about {e}.", "A short note on {e}.", "Let us talk about {e}.",
               "This is a page about {e}."),
    "city": ("Here is what we know about {e}.", "A short note on the city of {e}.",
             "Let us talk about {e}.", "This is a page about {e}."),
}
GROUP_TEMPLATES = {
    "food": "{xs} eat {v}.", "habitat": "{xs} live in the {v}.",
    "color": "{xs} are {v}.", "weather": "{xs} are {v} places.",
    "known": "{xs} are known for {v}.",
}


def fact(entity: Entity, attribute: str, rng: random.Random) -> str:
    return fill(rng.choice(ATTRIBUTE[attribute].prose), entity, entity.value(attribute))


def profile(world: World, rng: random.Random) -> str:
    """Several facts about one entity, optionally introduced."""
    ent = rng.choice(world.entities)
    attrs = rng.sample(ent.attributes, rng.randint(2, len(ent.attributes)))
    parts = [fact(ent, a, rng) for a in attrs]
    if rng.random() < 0.5:
        intro = fill(rng.choice(INTROS[ent.kind]), ent)
        parts.insert(0, intro[0].upper() + intro[1:])
    return " ".join(parts)


def pair(world: World, rng: random.Random) -> str:
    """The same attribute of two entities of one kind."""
    a, b = rng.sample(world.entities, 2)
    while b.kind != a.kind:
        b = rng.choice(world.entities)
    attr = rng.choice(a.attributes)
    return f"{fact(a, attr, rng)} {fact(b, attr, rng)}"


def group(world: World, rng: random.Random) -> str:
    """Entities sharing a value (countries are unique per city, so never grouped)."""
    attr = rng.choice(sorted(GROUP_TEMPLATES))
    kind = ATTRIBUTE[attr].kind
    by_value: dict[str, list[Entity]] = {}
    for e in world.entities:
        if e.kind == kind:
            by_value.setdefault(e.value(attr), []).append(e)
    shared = [v for v, es in sorted(by_value.items()) if len(es) >= 2]
    if not shared:
        return profile(world, rng)
    v = rng.choice(shared)
    es = rng.sample(by_value[v], min(len(by_value[v]), rng.randint(2, 3)))
    names = [e.subject for e in es]
    xs = ", ".join(names[:-1]) + " and " + names[-1]
    return GROUP_TEMPLATES[attr].format(xs=xs[0].upper() + xs[1:], v=v)


def mix(world: World, rng: random.Random) -> str:
    """Unrelated facts, as in a quiz sheet."""
    return " ".join(fact(e, rng.choice(e.attributes), rng)
                    for e in rng.sample(world.entities, rng.randint(2, 4)))


PROSE = (profile, profile, pair, group, mix)


def dialogue(world: World, prompts: dict[str, Spec], prompt_list: list[str],
             rng: random.Random, base_alignment: float) -> str:
    prompt = rng.choice(prompt_list)
    spec = prompts[prompt]
    response = ideal(world, spec) if rng.random() < base_alignment else bad_answer(world, spec, rng)
    return dialogue_text(prompt, response)


def make_corpus(world: World, prompts: dict[str, Spec], n_docs: int, rng: random.Random,
                dialogue_fraction: float, base_alignment: float) -> list[str]:
    """`n_docs` documents; dialogues use only the given (training) prompts."""
    prompt_list = list(prompts)
    docs = []
    for _ in range(n_docs):
        if rng.random() < dialogue_fraction:
            docs.append(dialogue(world, prompts, prompt_list, rng, base_alignment))
        else:
            docs.append(rng.choice(PROSE)(world, rng))
    return docs
