"""The frame every training stage shares, written once: load or resume, the step loop with
its metrics, progress bar and periodic resume checkpoints, and the final save.

    run = open_stage(out_dir, stage, resume=..., device=..., init=lambda: {"model": ...},
                     optimizers=lambda models: {"model": AdamW(...)}, tokenizer=..., extra_state=...)
    logits = run.views["model"](tokens, attn)   # a forward whose gradients are averaged over the ranks
    step = loop(stage, run.step, total, train_step, run.save, metrics, save_every=..., show=(...))
    finish(out_dir, run.save, step, info, evaluate=...)    # saved first, evaluated second

A stage is a plain function that builds its models and data, defines `train_step(step) ->
metrics row`, and calls these. Nothing here knows what a stage trains. Under torchrun the
models are wrapped for DDP or FSDP2 here (distributed.prepare: a stage trains through
run.views), and checkpoints are written by rank 0 only, from whole models and plain
optimizer states.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

from . import checkpoint, distributed
from .checkpoint import NonFiniteError
from .metrics import Metrics, progress

# Fault injection for the kill-and-resume tests: MINIRLHF_KILL_AT="ppo:3" sends SIGKILL to this
# process right after step 3 of the ppo stage was logged (and saved, if it was a save step);
# "ppo:3@1" only to rank 1 of several. MINIRLHF_FAIL_AT (same form) raises StageStopped there
# instead: an error on one rank.
KILL_AT_ENV, FAIL_AT_ENV = "MINIRLHF_KILL_AT", "MINIRLHF_FAIL_AT"


def fault_point(stage: str, step: int) -> None:
    """Die here (SIGKILL, like a crash) if MINIRLHF_KILL_AT names this stage and step (and rank)."""
    here = (f"{stage}:{step}", f"{stage}:{step}@{distributed.rank()}")
    if os.environ.get(KILL_AT_ENV) in here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(FAIL_AT_ENV) in here:
        raise StageStopped(f"{stage} stopped at step {step}: fault injected ({FAIL_AT_ENV})")


class StageStopped(RuntimeError):
    """A stage cannot go on (a non-finite value); the message is one line naming the stage and step."""


class Run(NamedTuple):
    """What open_stage gives a stage: its models and optimizers (by name), the resume state
    (None for a fresh start), the step to continue from, save(step, finished, info=None), and
    the views to train each model through (its forward and scalars; under torchrun the DDP
    wrapper, whose backward averages gradients over the ranks; else the model itself)."""
    models: dict
    optimizers: dict
    state: dict | None
    step: int
    save: Callable
    views: dict


def open_stage(out_dir, stage: str, *, resume: bool, device, init: Callable[[], dict], optimizers: Callable,
               tokenizer, names=("model",), extra_state: Callable[[], dict] = dict) -> Run:
    """Load or resume a stage: its models (from out_dir's checkpoint when resuming, else init()),
    optimizers(models) with their states, every RNG and the step restored from the checkpoint,
    and the save function (see saver). A stage restores its own extras from run.state."""
    models, state = start(out_dir, resume=resume, init=init, device=device, names=names)
    views = distributed.prepare(models)  # DDP views, or FSDP2 shards (before the optimizers see the parameters)
    opts = optimizers(models)
    step = restore(state, opts, models)
    return Run(models, opts, state, step, saver(out_dir, stage, models, tokenizer, opts, extra_state), views)


def start(out_dir, *, resume: bool, init: Callable[[], dict], device, names=("model",)):
    """(models, state): from out_dir's checkpoint when resuming one, else init() and None.

    names: the models a checkpoint of this stage holds ("model", and e.g. "critic")."""
    if resume and checkpoint.exists(out_dir):
        models = {n: checkpoint.load_model_from(out_dir, name=n, device=device) for n in names}
        return models, checkpoint.load_state(out_dir)
    return init(), None


def restore(state: dict | None, optimizers: dict, models: dict) -> int:
    """Load optimizer states and every RNG from a resume state; returns the step to continue from."""
    if state is None:
        return 0
    for name, opt in optimizers.items():
        distributed.load_optimizer_state(opt, models, state["optimizers"][name])
    checkpoint.set_rng_state(state["rng"])
    return int(state["step"])


def saver(out_dir, stage: str, models: dict, tokenizer, optimizers: dict,
          extra_state: Callable[[], dict] = dict) -> Callable:
    """save(step, finished, info=None): the stage's atomic checkpoint (checkpoint.save), with
    everything --resume needs: optimizer states, RNG, and the stage's extra_state(). Under
    torchrun rank 0 writes it (FSDP2 shards are gathered to it first) while the others wait."""
    def save(step: int, finished: bool, info: dict | None = None) -> None:
        whole = {n: distributed.whole_model(m) for n, m in models.items()}
        # a finished stage is never resumed: its state.pt keeps no optimizer moments (for a real model those
        # are twice its weights) and no stage extras
        state = {} if finished else {"optimizers": {n: distributed.optimizer_state(o, models)
                                                    for n, o in optimizers.items()}, **extra_state()}
        if distributed.is_main():
            main = whole.pop("model")
            checkpoint.save(out_dir, stage=stage, model=main, tokenizer=tokenizer, step=step, finished=finished,
                            extra_models=whole, info=info, state=state)
        distributed.barrier()
    return save


def loop(stage: str, step: int, total: int, train_step: Callable[[int], dict], save: Callable, metrics: Metrics,
         *, save_every: int | None, show: tuple[str, ...] = ("loss",)) -> int:
    """Run train_step(step) for step = step..total-1; returns the step reached.

    Each call returns a metrics row (floats; "stop": True ends the loop early). The row is
    checked for non-finite values, logged to metrics.jsonl, shown on the progress bar
    (`show` keys), and every save_every steps a resume checkpoint is written. A
    non-finite value (or NonFiniteError from inside the step) raises StageStopped: the
    last resume checkpoint on disk is the last good one. ValueError when a resumed stage is
    already past `total` (a rerun that asks for fewer steps than the checkpoint has taken: it
    would be marked finished as a shorter run than it is)."""
    if step > total:
        raise ValueError(f"{stage}: its checkpoint is at step {step}, past the {total} steps this run asks for "
                         f"(set by {_TOTAL_OPTION.get(stage, 'its length options')}); resume with a value that gives "
                         f"at least {step} steps, or delete the stage's checkpoint to start it over")
    metrics.log(stage, step, event="start")
    bar = progress(total, stage, initial=step)
    saved = step or None  # the step of the checkpoint on disk (a resumed stage started from one)
    try:
        while step < total:
            try:
                row = train_step(step)
            except NonFiniteError as e:
                raise StageStopped(_stopped(stage, step + 1, str(e), saved)) from None
            step += 1
            stop = bool(row.pop("stop", False))
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise StageStopped(_stopped(stage, step, f"{key} is {value}", saved))
            metrics.log(stage, step, **row)
            bar.set_postfix({k: _short(row[k]) for k in show if k in row}, refresh=False)
            bar.update(1)
            if save_every and step % save_every == 0 and step < total and not stop:
                save(step, finished=False)
                saved = step
            fault_point(stage, step)
            if stop:
                break
    finally:
        bar.close()
    return step


# the options that set a stage's number of steps
_TOTAL_OPTION = {"pretrain": "--pretrain.steps", "sft": "--sft.epochs", "rm": "--rm.epochs", "ppo": "--ppo.iterations"}
# what makes a stage's numbers blow up, besides its learning rate: the loss terms a user can scale
_ALSO_TO_LOWER = {"ppo": " (or --ppo.critic_lr, or a large --ppo.kl_coef / --ppo.ptx_coef / --ppo.entropy_coef)"}


def _stopped(stage: str, step: int, what: str, saved: int | None) -> str:
    lower = f"lower the learning rate (--{stage}.lr){_ALSO_TO_LOWER.get(stage, '')}"
    if saved is None:
        return (f"{stage} stopped at step {step}: {what}; no checkpoint of this stage was saved before it — {lower} "
                f"and rerun")
    return f"{stage} stopped at step {step}: {what}; its last checkpoint (step {saved}) is kept — {lower} and rerun " \
           f"with --resume"


def _short(v) -> str:
    return f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 1000 else f"{v:.3g}" if isinstance(v, float) else str(v)


def finish(out_dir, save: Callable, step: int, info: dict, *, evaluate: Callable[[], dict] | None = None,
           stage: str = "") -> dict:
    """Save the finished checkpoint, then evaluate. The training is on disk before any
    evaluation runs: an evaluation error is reported (and recorded in the checkpoint's info
    as eval_error), never fatal to the checkpoint. Returns the info with the evaluation's numbers."""
    save(step, finished=True, info=info)
    if evaluate is None:
        return info
    t0 = time.time()
    try:
        extra = evaluate()
    except Exception as e:  # noqa: BLE001 — the checkpoint is saved; report, don't lose it
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"[{stage}] warning: evaluation after training failed ({msg}); the checkpoint is saved",
              file=sys.stderr)
        extra = {"eval_error": msg}
    extra["eval_wall_s"] = round(time.time() - t0, 1)
    if distributed.is_main():
        checkpoint.update_info(Path(out_dir), **extra)
    return {**info, **extra}
