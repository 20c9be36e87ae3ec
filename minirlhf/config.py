"""Configuration: one frozen dataclass per stage, presets, CLI overrides, validation.

Every field carries a help text (shown by ``--help``) and can be overridden from the
command line as ``--<section>.<field> VALUE`` (``--ppo.kl_coef 0.05``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def knob(default, help: str):
    """A dataclass field with a help text for --help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TaskConfig:
    """The embedded assistant task (minirlhf/data): a small generated world of facts."""
    seed: int = knob(0, "seed of the generated world, corpus, demonstrations and prompts")
    base_alignment: float = knob(0.2, "fraction of the corpus's assistant dialogues that are good ones")
    dialogue_fraction: float = knob(0.05, "fraction of corpus documents that are assistant dialogues")
    n_corpus_docs: int = knob(20000, "pretraining corpus documents (plain prose about the world)")
    n_sft_demos: int = knob(2000, "SFT demonstrations written by the (imperfect) demonstrators")
    n_rm_prompts: int = knob(1000, "prompts whose K sampled responses the annotator ranks")
    n_ppo_prompts: int = knob(2000, "PPO training prompts")
    n_eval_prompts: int = knob(256, "held-out evaluation prompts, disjoint from all training prompts")
    annotator_noise: float = knob(0.5, "scale of the Gumbel (Plackett-Luce) noise in the annotator's rankings")
