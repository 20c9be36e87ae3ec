"""The embedded task: determinism, prompt splits, sizes, the demonstrators' faults."""
import dataclasses
import random

import pytest

from minirlhf.config import TaskConfig
from minirlhf.data import build_task
from minirlhf.data.prompts import all_prompts
from minirlhf.data.world import ATTRIBUTES, make_world, words
from minirlhf.tokenizer import dialogue_text

SMALL = TaskConfig(n_corpus_docs=3000, n_sft_demos=500, n_rm_prompts=300, n_ppo_prompts=500,
                   n_corpus_heldout=100, n_sft_heldout=100)


@pytest.fixture(scope="module")
def task():
    return build_task(SMALL)


def test_deterministic_from_seed(task):
    again = build_task(SMALL)
    for name in ("corpus", "corpus_heldout", "sft", "sft_heldout", "rm_prompts", "ppo_prompts", "eval_prompts"):
        assert getattr(task, name) == getattr(again, name), name
    other = build_task(dataclasses.replace(SMALL, seed=1))
    assert other.corpus != task.corpus and other.eval_prompts != task.eval_prompts
    assert other.world != task.world


def test_sizes(task):
    c = SMALL
    assert len(task.corpus) == c.n_corpus_docs and len(task.corpus_heldout) == c.n_corpus_heldout
    assert len(task.sft) == c.n_sft_demos and len(task.sft_heldout) == c.n_sft_heldout
    assert len(task.rm_prompts) == c.n_rm_prompts and len(task.ppo_prompts) == c.n_ppo_prompts
    assert len(task.eval_prompts) == c.n_eval_prompts == len(set(task.eval_prompts)) >= 256


def test_eval_prompts_disjoint_from_all_training_text(task):
    evals = set(task.eval_prompts)
    train = set(task.rm_prompts) | set(task.ppo_prompts) | {p for p, _ in task.sft + task.sft_heldout}
    assert not evals & train
    dialogue_prompts = {d.split("\n")[0][len("User: "):] for d in task.corpus + task.corpus_heldout
                        if d.startswith("User: ")}
    assert dialogue_prompts and not evals & dialogue_prompts
    assert not {p for p, _ in task.sft} & {p for p, _ in task.sft_heldout}


def test_eval_prompts_cover_every_form(task):
    forms = {task.spec(p).form for p in task.eval_prompts}
    assert forms == {"word", "sentence", "plain", "facts"}


def test_corpus_dialogues_use_the_chat_framing_and_base_alignment():
    for alignment, lo, hi in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.2, 0.1, 0.3)):
        t = build_task(dataclasses.replace(SMALL, base_alignment=alignment, dialogue_fraction=0.2))
        dialogues = [d for d in t.corpus if d.startswith("User: ")]
        assert 0.15 < len(dialogues) / len(t.corpus) < 0.25
        good = 0
        for d in dialogues:
            prompt, response = d[len("User: "):].split("\nAssistant: ")
            assert d == dialogue_text(prompt, response)
            good += t.gold_score(prompt, response) == 4.0
        assert lo <= good / len(dialogues) <= hi


def test_every_ideal_answer_scores_the_maximum(task):
    for prompt in task.specs:
        assert task.gold_score(prompt, task.ideal(prompt)) == 4.0, prompt


def test_demonstrators_are_good_but_imperfect(task):
    golds = [task.gold_score(p, r) for p, r in task.sft]
    perfect = sum(g == 4.0 for g in golds) / len(golds)
    assert 0.45 < perfect < 0.75
    wrong = sum(task.gold_breakdown(p, r)["correct"] < 1 for p, r in task.sft) / len(golds)
    assert 0.05 < wrong < 0.2
    faultless = build_task(dataclasses.replace(SMALL, demo_wrong=0, demo_off_form=0, demo_filler=0))
    assert all(faultless.gold_score(p, r) == 4.0 for p, r in faultless.sft)


def test_responses_are_short(task):
    rng = random.Random(0)
    assert max(len(words(r)) for _, r in task.sft) <= 30
    assert max(len(words(task.demonstrate(p, rng))) for p in task.eval_prompts) <= 30
    assert max(len(words(p)) for p in task.specs) <= 12


def test_world_value_words_are_disjoint_single_words():
    values = [v.lower() for a in ATTRIBUTES for v in a.values]
    assert len(values) == len(set(values)) and all(len(words(v)) == 1 for v in values)
    world = make_world(0)
    assert not world.entity_words & set(values)
    assert 30 <= len(world.entities) <= 60


def test_unknown_prompt_and_bad_config_raise(task):
    with pytest.raises(ValueError, match="not one of the embedded task's prompts"):
        task.gold_score("What is the meaning of life?", "42")
    with pytest.raises(ValueError, match="task.base_alignment"):
        build_task(dataclasses.replace(SMALL, base_alignment=1.5))
    with pytest.raises(ValueError, match="task.n_eval_prompts"):
        build_task(dataclasses.replace(SMALL, n_eval_prompts=len(all_prompts(make_world(0)))))


def test_export_writes_readable_files(task, tmp_path):
    from minirlhf.data import export_task, read_corpus, read_preferences, read_prompts, read_sft
    files = export_task(task, tmp_path / "out")
    assert sorted(f.name for f in files) == sorted(
        ["corpus.jsonl", "corpus_heldout.jsonl", "sft.jsonl", "sft_heldout.jsonl", "rm_prompts.jsonl",
         "ppo_prompts.jsonl", "eval_prompts.jsonl", "preferences.jsonl"])
    out = tmp_path / "out"
    assert read_corpus(out / "corpus.jsonl") == task.corpus
    assert read_sft(out / "sft.jsonl") == task.sft
    assert read_prompts(out / "eval_prompts.jsonl") == task.eval_prompts
    prefs = read_preferences(out / "preferences.jsonl")
    assert len(prefs) >= 24 and {len(c.responses) for c in prefs} == {2, 4}
