"""build_task: the whole embedded task, generated deterministically from TaskConfig.seed.

Prompt strings are split once: eval prompts are drawn first and removed from every
training use (SFT demos, RM prompts, PPO prompts, corpus dialogues); SFT held-out
prompts are further removed from the SFT set so its held-out loss is honest.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import TaskConfig
from .corpus import make_corpus
from .gold import gold_breakdown
from .prompts import PromptSampler, Spec, all_prompts
from .responses import demonstrate, ideal
from .world import World, make_world


@dataclass
class Task:
    """The embedded task. `gold_score` labels rankings and scores evaluations only;
    it is never a training reward (PPO optimises the learned reward model)."""
    cfg: TaskConfig
    world: World
    corpus: list[str]
    corpus_heldout: list[str]
    sft: list[tuple[str, str]]
    sft_heldout: list[tuple[str, str]]
    rm_prompts: list[str]
    ppo_prompts: list[str]
    eval_prompts: list[str]
    specs: dict[str, Spec] = field(repr=False)

    def knows(self, prompt) -> bool:
        """Whether prompt is one of the task's prompts (the gold function can judge answers to it)."""
        return isinstance(prompt, str) and prompt.strip() in self.specs

    def gold_or_none(self, prompt, response: str) -> float | None:
        """gold_score for a prompt the task knows, None for any other (a user's own prompt)."""
        return self.gold_score(prompt, response) if self.knows(prompt) else None

    def spec(self, prompt: str) -> Spec:
        try:
            return self.specs[prompt.strip()]
        except KeyError:
            raise ValueError(f"gold: prompt is not one of the embedded task's prompts (the gold function "
                             f"and the simulated annotator know only those): {prompt!r}") from None

    def gold_breakdown(self, prompt: str, response: str) -> dict[str, float]:
        """Criteria of the gold score: {"correct", "form", "concise", "gold"} (see gold.py)."""
        return gold_breakdown(self.world, self.spec(prompt), response)

    def gold_score(self, prompt: str, response: str) -> float:
        """Gold preference score in [-4, 4] (4 = ideal). Never a training reward."""
        return self.gold_breakdown(prompt, response)["gold"]

    def ideal(self, prompt: str) -> str:
        """The best answer (gold 4): the ceiling an evaluation can compare against."""
        return ideal(self.world, self.spec(prompt))

    def demonstrate(self, prompt: str, rng: random.Random) -> str:
        """An answer the way the task's (imperfect) demonstrators write one."""
        c = self.cfg
        return demonstrate(self.world, self.spec(prompt), rng, c.demo_wrong, c.demo_off_form, c.demo_filler)


def _check(cfg: TaskConfig) -> None:
    for name in ("base_alignment", "dialogue_fraction", "demo_wrong", "demo_off_form", "demo_filler"):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"task.{name}: must be in [0, 1], got {v}")
    for name in ("n_corpus_docs", "n_sft_demos", "n_rm_prompts", "n_ppo_prompts", "n_eval_prompts",
                 "n_sft_heldout", "n_corpus_heldout"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"task.{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.annotator_noise < 0:
        raise ValueError(f"task.annotator_noise: must be >= 0, got {cfg.annotator_noise}")


def _distinct(sampler: PromptSampler, n: int, what: str) -> list[str]:
    """n distinct prompt strings with the sampler's form mix."""
    out = sampler.sample(n)
    if len(set(out)) != n:
        raise ValueError(f"task.{what}: {n} distinct prompts asked for, more than the task's "
                         f"prompt space allows with its form mix; use fewer")
    return out


def build_task(cfg: TaskConfig) -> Task:
    """Generate world, corpus, demonstrations and prompt sets from cfg.seed."""
    _check(cfg)
    world = make_world(cfg.seed)
    specs = all_prompts(world)

    def rng(stream: str) -> random.Random:
        # One independent stream per product, so changing one size leaves the others be.
        return random.Random(f"minirlhf-task-{cfg.seed}-{stream}")

    eval_prompts = _distinct(PromptSampler(specs, rng("eval")), cfg.n_eval_prompts, "n_eval_prompts")
    evals = set(eval_prompts)
    train = {p: s for p, s in specs.items() if p not in evals}
    sft_heldout_prompts = _distinct(PromptSampler(train, rng("sft-heldout")), cfg.n_sft_heldout,
                                    "n_sft_heldout")
    held = set(sft_heldout_prompts)
    sft_pool = {p: s for p, s in train.items() if p not in held}

    demo_rng = rng("demos")
    sft_prompts = PromptSampler(sft_pool, rng("sft")).sample(cfg.n_sft_demos)
    sft = [(p, demonstrate(world, specs[p], demo_rng, cfg.demo_wrong, cfg.demo_off_form, cfg.demo_filler))
           for p in sft_prompts]
    heldout_rng = rng("sft-heldout-demos")
    sft_heldout = [(p, demonstrate(world, specs[p], heldout_rng, cfg.demo_wrong, cfg.demo_off_form,
                                   cfg.demo_filler)) for p in sft_heldout_prompts]

    def corpus(stream: str, n: int) -> list[str]:
        return make_corpus(world, train, n, rng(stream), cfg.dialogue_fraction, cfg.base_alignment)

    return Task(
        cfg=cfg, world=world,
        corpus=corpus("corpus", cfg.n_corpus_docs),
        corpus_heldout=corpus("corpus-heldout", cfg.n_corpus_heldout),
        sft=sft, sft_heldout=sft_heldout,
        rm_prompts=PromptSampler(train, rng("rm")).sample(cfg.n_rm_prompts),
        ppo_prompts=PromptSampler(train, rng("ppo")).sample(cfg.n_ppo_prompts),
        eval_prompts=eval_prompts,
        specs=specs,
    )
