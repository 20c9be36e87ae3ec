"""export_task: write the embedded task as JSONL files, so users see every format."""
from __future__ import annotations

import os
import random
from pathlib import Path

from .annotator import Annotator
from .formats import write_jsonl
from .responses import bad_answer
from .task import Task

N_EXAMPLE_PREFERENCES = 32


def example_preferences(task: Task, n: int = N_EXAMPLE_PREFERENCES) -> list[dict]:
    """Annotator labels of demo-like responses, in all three preference row shapes:
    mostly K=4 rankings, then a few ratings rows and a few chosen/rejected rows."""
    rng = random.Random(f"minirlhf-export-{task.cfg.seed}")
    annotator = Annotator(task.gold_score, task.cfg.annotator_noise, task.cfg.seed)
    rows = []
    for i, prompt in enumerate(task.rm_prompts[:n]):
        responses = [task.ideal(prompt), task.demonstrate(prompt, rng), task.demonstrate(prompt, rng),
                     bad_answer(task.world, task.spec(prompt), rng)]
        rng.shuffle(responses)
        if i < n - 8:
            rows.append({"prompt": prompt, "responses": responses,
                         "ranking": annotator.rank(prompt, responses)})
        elif i < n - 4:
            rows.append({"prompt": prompt, "responses": responses,
                         "ratings": annotator.rate(prompt, responses)})
        else:
            best, *_, worst = annotator.rank(prompt, responses)
            rows.append({"prompt": prompt, "chosen": responses[best], "rejected": responses[worst]})
    return rows


def export_task(task: Task, out_dir: str | os.PathLike) -> list[Path]:
    """Write the task's data sets under out_dir; returns the files written."""
    out = Path(out_dir)
    files = {
        "corpus.jsonl": [{"text": t} for t in task.corpus],
        "corpus_heldout.jsonl": [{"text": t} for t in task.corpus_heldout],
        "sft.jsonl": [{"prompt": p, "response": r} for p, r in task.sft],
        "sft_heldout.jsonl": [{"prompt": p, "response": r} for p, r in task.sft_heldout],
        "rm_prompts.jsonl": [{"prompt": p} for p in task.rm_prompts],
        "ppo_prompts.jsonl": [{"prompt": p} for p in task.ppo_prompts],
        "eval_prompts.jsonl": [{"prompt": p} for p in task.eval_prompts],
        "preferences.jsonl": example_preferences(task),
    }
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    return [out / name for name in files]
