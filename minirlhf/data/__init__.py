"""Data: the embedded default task (a generated world of facts, imperfect demonstrators,
a gold preference function and a simulated annotator) and the JSONL file formats (see formats/).

    task = build_task(TaskConfig())          # deterministic from TaskConfig.seed
    task.corpus, task.sft, task.eval_prompts, task.gold_score(prompt, response)
    Annotator(task.gold_score, noise, seed).rank(prompt, responses)

The gold function labels rankings and scores evaluations; it is never a training reward.
"""
from .annotator import Annotator
from .export import export_task
from .formats import (Comparison, DataError, Message, Prompt, as_messages, pairs_from_ranking, pairs_from_ratings,
                      read_corpus, read_preferences, read_prompts, read_responses, read_sft, row_lines, write_jsonl)
from .gold import GOLD_MAX, GOLD_MIN
from .task import Task, build_task

__all__ = [
    "Annotator", "Comparison", "DataError", "GOLD_MAX", "GOLD_MIN", "Message", "Prompt", "Task", "as_messages",
    "build_task", "export_task", "pairs_from_ranking", "pairs_from_ratings", "read_corpus", "read_preferences",
    "read_prompts", "read_responses", "read_sft", "row_lines", "write_jsonl",
]
