"""The prompts users ask: a question about one entity plus an instruction on form.

Every prompt string the task can produce is enumerated up front (a few thousand), each
with the `Spec` the gold function needs to judge an answer, so scoring is a dict look-up
and the eval/train split is a split of strings.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .world import ATTRIBUTE, World, fill

# The requested form of the answer. "plain" asks nothing explicit (one short
# statement is the ideal); "facts" asks for two facts, one sentence each.
FORMS = ("word", "sentence", "plain", "facts")
# How often each form is drawn for training and eval prompts: the stated-form
# prompts dominate because following the form is what the demonstrators get wrong.
FORM_WEIGHTS = {"word": 0.30, "sentence": 0.30, "plain": 0.15, "facts": 0.25}
INSTRUCTIONS = {
    "word": ("Answer in one word.", "Reply with one word.", "One word only."),
    "sentence": ("Answer in one sentence.", "Reply in one sentence.", "Use one short sentence."),
    "plain": ("",),
}
FACTS_PROMPTS = (
    "List two facts about {e}.", "Tell me two facts about {e}.", "Give two facts about {e}.",
    "Name two facts about {e}.", "State two facts about {e}.", "Share two facts about {e}.",
    "What are two facts about {e}?",
)


@dataclass(frozen=True)
class Spec:
    """What a prompt asks: about which entity, which attribute(s), in which form."""
    entity: str
    attributes: tuple[str, ...]  # one for a question; all of the entity's for "facts"
    form: str

    @property
    def n_facts(self) -> int:
        """How many facts a complete answer states."""
        return 2 if self.form == "facts" else 1


def all_prompts(world: World) -> dict[str, Spec]:
    """Every prompt string of the task with its spec, in a fixed order."""
    out: dict[str, Spec] = {}
    for ent in world.entities:
        for attr in ent.attributes:
            for q in ATTRIBUTE[attr].questions:
                question = fill(q, ent)
                for form, instructions in INSTRUCTIONS.items():
                    for ins in instructions:
                        out[f"{question} {ins}".strip()] = Spec(ent.name, (attr,), form)
        for t in FACTS_PROMPTS:
            out[fill(t, ent)] = Spec(ent.name, ent.attributes, "facts")
    return out


class PromptSampler:
    """Draws prompts with the form mix of FORM_WEIGHTS from a pool of prompt strings.

    Each form's pool is walked in a shuffled order and reshuffled when exhausted, so a
    draw of n prompts repeats a string only once the pool of its form is used up.
    """

    def __init__(self, pool: dict[str, Spec], rng: random.Random):
        self.rng = rng
        self.by_form = {f: [p for p, s in pool.items() if s.form == f] for f in FORMS}
        self.order = {f: [] for f in FORMS}

    def draw(self, form: str) -> str:
        if not self.order[form]:
            self.order[form] = self.rng.sample(self.by_form[form], len(self.by_form[form]))
        return self.order[form].pop()

    def sample(self, n: int) -> list[str]:
        forms = self.rng.choices(FORMS, weights=[FORM_WEIGHTS[f] for f in FORMS], k=n)
        return [self.draw(f) for f in forms]
