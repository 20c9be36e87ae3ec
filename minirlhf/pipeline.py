"""`train`: the InstructGPT recipe end to end, one stage after another.

    inputs ─▶ tokenizer ─▶ pretrain ─▶ sft ─▶ rankings ─▶ rm ─▶ ppo ─▶ evaluation ─▶ report

Every input is read and checked before the first stage computes anything: the files'
formats, every prompt against its token budget, every size relation between the data and
the config. Each stage's call is defined once (`stage_calls`), for `train` and for the
single-stage commands alike. Each stage writes its own output under the run directory; a
finished stage is kept and skipped on rerun, an unfinished one (the run was killed)
continues with --resume.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checkpoint, distributed
from .config import RunConfig
from .data import (Comparison, Task, build_task, read_corpus, read_preferences, read_prompts, read_sft,
                   row_lines)
from .device import resolve_device, seed_everything, use_all_cores
from .files import LOCK_FILE, check_lock_path, file_kind, read_json_object, write_json
from .metrics import METRICS_FILE, Metrics
from .tokenizer import TOKENIZER_FILE, Tokenizer, token_stream

PREFERENCES_FILE = "preferences.jsonl"
ORDER = ("pretrain", "sft", "rankings", "rm", "ppo")


@dataclass
class Inputs:
    """What the stages train and evaluate on: the embedded task, or the user's own files.

    sources maps each prompt set to the file it came from (None: the embedded task), for
    error messages."""
    corpus: list[str]
    corpus_heldout: list[str]
    sft: list[tuple]
    sft_heldout: list[tuple]
    rm_prompts: list
    ppo_prompts: list
    eval_prompts: list
    preferences: list[Comparison] | None   # the user's comparisons; None: sample + annotate
    task: Task
    sources: dict[str, str | None]

    def gold_score(self, prompt, response: str) -> float | None:
        """Gold for prompts the embedded task knows, None for others. Evaluation only."""
        return self.task.gold_or_none(prompt, response)


def load_inputs(cfg: RunConfig) -> Inputs:
    """The embedded task, with any piece replaced by a user file (read and validated here)."""
    d = cfg.data
    task = build_task(cfg.task)
    corpus = read_corpus(d.corpus) if d.corpus else task.corpus
    if d.corpus_heldout:
        corpus_heldout = read_corpus(d.corpus_heldout)
    elif d.corpus:  # hold out the last 5% of the user's corpus for perplexity
        if len(corpus) < 2:
            raise ValueError(f"{d.corpus}: 1 document; give at least 2 (the last 5% are held out for perplexity) "
                             f"or --data.corpus_heldout")
        cut = max(1, len(corpus) // 20)
        corpus, corpus_heldout = corpus[:-cut], corpus[-cut:]
    else:
        corpus_heldout = task.corpus_heldout
    if d.sft:
        sft = read_sft(d.sft)
        cut = max(1, len(sft) // 10) if len(sft) > 1 else 0  # the last 10% held out for SFT's held-out loss
        sft, sft_heldout = sft[:len(sft) - cut], sft[len(sft) - cut:]
        if not sft_heldout:
            print(f"[data] note: {d.sft} has 1 demonstration; none is held out, SFT picks its last step",
                  file=sys.stderr)
    else:
        sft, sft_heldout = task.sft, task.sft_heldout
    return Inputs(
        corpus=corpus, corpus_heldout=corpus_heldout, sft=sft, sft_heldout=sft_heldout,
        rm_prompts=read_prompts(d.rm_prompts) if d.rm_prompts else task.rm_prompts,
        ppo_prompts=read_prompts(d.ppo_prompts) if d.ppo_prompts else task.ppo_prompts,
        eval_prompts=read_prompts(d.eval_prompts) if d.eval_prompts else task.eval_prompts,
        preferences=read_preferences(d.preferences) if d.preferences else None,
        task=task,
        sources={"rm_prompts": d.rm_prompts, "ppo_prompts": d.ppo_prompts, "eval_prompts": d.eval_prompts,
                 "sft": d.sft},
    )


def check_inputs(cfg: RunConfig, inputs: Inputs, tokenizer, stages: tuple[str, ...]) -> None:
    """Every prompt against its token budget and every size relation between data and config,
    for the stages about to run; ValueError `file:line: field: what is wrong` at the first
    mistake. Sizes that are merely small are used as they are, and said (a note on stderr)."""
    L = cfg.model.max_seq_len
    budgets = []  # (name, prompts, max_new_tokens, section)
    if "rankings" in stages and inputs.preferences is None:
        budgets.append(("rm_prompts", inputs.rm_prompts, cfg.rm.max_new_tokens, "rm"))
    if "ppo" in stages:
        budgets.append(("ppo_prompts", inputs.ppo_prompts, cfg.ppo.max_new_tokens, "ppo"))
    if "eval" in stages:
        budgets.append(("eval_prompts", inputs.eval_prompts, cfg.eval.max_new_tokens, "eval"))
    def where(name: str, i: int) -> str:
        src = inputs.sources.get(name)
        return f"{src}:{row_lines(src)[i]}" if src else f"the embedded task's {name}[{i}]"

    def framed(name: str, i: int, frame: Callable, field: str):
        try:  # a model's chat template may refuse a conversation our readers accept
            return frame()
        except ValueError as e:
            raise ValueError(f"{where(name, i)}: {field}: {e}") from None

    for name, prompts, max_new, section in budgets:
        room = L - max_new - 1  # the response, and the EOS the RM reads a truncated response at
        for i, p in enumerate(prompts):
            n = len(framed(name, i, lambda: tokenizer.prompt_ids(p), "prompt"))
            if n > room:
                raise ValueError(f"{where(name, i)}: prompt: {n} tokens, but model.max_seq_len={L} leaves {room} for a "
                                 f"prompt next to {section}.max_new_tokens={max_new} and the EOS; shorten the prompt, "
                                 f"lower --{section}.max_new_tokens or raise --model.max_seq_len")
    if "rankings" in stages and inputs.preferences is None:
        unknown = [i for i, p in enumerate(inputs.rm_prompts) if not inputs.task.knows(p)]
        if unknown:
            src = inputs.sources["rm_prompts"]
            raise ValueError(f"{src}:{row_lines(src)[unknown[0]]}: prompt: not one of the embedded task's prompts; the "
                             f"simulated annotator can rank answers only to those — give your own rankings with "
                             f"--data.preferences")
    if "pretrain" in stages or "eval" in stages:  # training windows; held-out perplexity windows
        pc = cfg.pretrain
        texts = [("held-out corpus", inputs.corpus_heldout, cfg.data.corpus_heldout or cfg.data.corpus)]
        if "pretrain" in stages:
            texts.insert(0, ("corpus", inputs.corpus, cfg.data.corpus))
        for what, texts, src in texts:
            n = len(token_stream(tokenizer, texts))
            if n < pc.seq_len + 2:
                raise ValueError(f"{src or 'the embedded task'}:0: {what}: {n} tokens, fewer than one window of "
                                 f"pretrain.seq_len={pc.seq_len} + 2; give more text or lower --pretrain.seq_len")
    notes = []
    if "sft" in stages:
        cut = whole = 0
        for i, (p, r) in enumerate(inputs.sft + inputs.sft_heldout):  # in file order
            ids, mask = framed("sft", i, lambda: tokenizer.frame(p, r), "messages" if not isinstance(p, str) else "prompt")
            cut += len(ids) > L
            whole += sum(mask) > L
        if cut:
            notes.append(f"{cut} demonstration(s) longer than model.max_seq_len={L} are cut on the left (the end of the "
                         f"prompt and the response kept)" + (f"; {whole} of them lose the start of a response longer "
                                                            f"than that" if whole else ""))
        if cfg.sft.samples is not None and cfg.sft.samples > len(inputs.sft):
            raise ValueError(f"config: sft.samples={cfg.sft.samples}: only {len(inputs.sft)} demonstrations are "
                             f"available")
        n_demos = min(len(inputs.sft), cfg.sft.samples or len(inputs.sft))
        if cfg.sft.batch_size > n_demos:
            notes.append(f"sft.batch_size={cfg.sft.batch_size} > {n_demos} demonstrations: one batch of all of them")
    if "rm" in stages:
        from .stages.rm import drop_tied_pairs, heldout_split

        own = inputs.preferences is not None
        comparisons = inputs.preferences if own else inputs.rm_prompts  # rankings: one comparison per prompt
        held, train = heldout_split(comparisons, cfg.rm.heldout_fraction, cfg.seed)
        src = f"{cfg.data.preferences}:0: file" if own else "config: task.n_rm_prompts"
        if own and not comparisons:
            raise ValueError(f"{src}: no comparison: no row states a preference (a skipped row, or one whose "
                             f"responses are all tied, carries none)")
        if not train:
            raise ValueError(f"{src}: {len(comparisons)} comparison(s); after holding out rm.heldout_fraction="
                             f"{cfg.rm.heldout_fraction} none is left to train on (give more"
                             + (", or --rm.heldout_fraction 0)" if cfg.rm.heldout_fraction > 0 else ")"))
        if own:
            for c in inputs.preferences:
                for r in c.responses:
                    try:
                        tokenizer.frame(c.prompt, r)
                    except ValueError as e:
                        raise ValueError(f"{cfg.data.preferences}: the comparison for prompt "
                                         f"{str(c.prompt)[:60]!r}: {e}") from None
            if not drop_tied_pairs(tokenizer, train, L)[0]:
                raise ValueError(f"{src}: every training pair's two responses are the same tokens after framing: no "
                                 f"preference to learn")
    if "ppo" in stages and distributed.active():  # every rank generates and trains on an equal share
        for name, n in (("batch_size", cfg.ppo.batch_size), ("minibatch_size", cfg.ppo.minibatch_size)):
            if n % distributed.size():
                raise ValueError(f"config: ppo.{name}={n}: must be divisible by the {distributed.size()} processes "
                                 f"(each generates and trains on an equal share)")
    if "ppo" in stages and len(inputs.ppo_prompts) < cfg.ppo.batch_size:
        notes.append(f"{len(inputs.ppo_prompts)} PPO prompts < ppo.batch_size={cfg.ppo.batch_size}: each iteration "
                     f"draws its batch with replacement")
    if "ppo" in stages and cfg.ppo.eval_every is not None:  # ppo.eval_prompts is "up to" (gold_curve)
        known = sum(map(inputs.task.knows, inputs.eval_prompts))
        if 0 < known < cfg.ppo.eval_prompts:
            notes.append(f"ppo.eval_prompts={cfg.ppo.eval_prompts} > {known} held-out prompts the gold function "
                         f"knows: the gold curve during PPO uses all {known}")
    for n in notes:
        print(f"[data] note: {n}", file=sys.stderr)


def run_tokenizer(cfg: RunConfig, run_dir: Path, corpus: list[str]):
    """The run's tokenizer: the pretrain checkpoint's, or one trained on the corpus now and kept
    as run_dir/tokenizer.model (so a resumed pretraining uses the very same one)."""
    if checkpoint.exists(run_dir / "pretrain"):
        return checkpoint.load_tokenizer(run_dir / "pretrain")
    path = run_dir / TOKENIZER_FILE
    with distributed.main_first():  # rank 0 trains and writes it, the others read it
        if path.exists():
            return Tokenizer.load(path)
        return _train_tokenizer(cfg, path, corpus)


def _train_tokenizer(cfg: RunConfig, path: Path, corpus: list[str]):
    try:
        tokenizer = Tokenizer.train(corpus, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
    except RuntimeError as e:  # SentencePiece: "... Vocabulary size is smaller than required_chars. 8 vs 315. ..."
        import re

        need = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
        raise ValueError(f"config: model.vocab_size={cfg.model.vocab_size}: too small for this corpus, which needs "
                         f"{'more than ' + need.group(1) if need else 'more'} pieces (every character, the byte "
                         f"fallback and the special tokens)") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"config: model.vocab_size={cfg.model.vocab_size}: the tokenizer needs "
                         f"{tokenizer.vocab_size} pieces (byte fallback and special tokens)")
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(tmp)
    tmp.replace(path)
    return tokenizer


def _fingerprint(path: Path) -> str:
    """What identifies a pretrained model on disk: its config.json (HF directory), or a GGUF
    file's size and first MiB (its header and metadata)."""
    import hashlib

    h = hashlib.sha256()
    if path.is_dir():
        h.update((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    else:
        h.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def init_source(cfg: RunConfig) -> Path:
    """--init-from's path, resolved; ValueError in one line when nothing is there."""
    source = Path(cfg.init_from).expanduser().resolve()
    if not source.exists():
        raise ValueError(f"--init-from {cfg.init_from}: no such file or directory")
    return source


def import_base(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """--init-from: the pretrained model becomes the run's base checkpoint (run_dir/pretrain, stage
    "import", imported once and kept like a finished stage); returns cfg with the imported model's
    shape (model.max_seq_len: the run's option, which sizes the RoPE tables). A rerun must name
    the same model (the same file or directory, however the path is spelled, unchanged since)."""
    import dataclasses

    from .interop import load_pretrained

    source = init_source(cfg)
    out = run_dir / "pretrain"
    if not checkpoint.is_finished(out):
        if distributed.is_main():
            model, tokenizer = load_pretrained(source, max_seq_len=cfg.model.max_seq_len)
            checkpoint.save(out, stage="import", model=model, tokenizer=tokenizer, step=0, finished=True,
                            info={"init_from": str(source), "fingerprint": _fingerprint(source),
                                  "params": model.num_params()})
            print(f"[import] {source}: {model.num_params() / 1e6:.1f}M parameters -> {out}")
        distributed.barrier()
    info = checkpoint.read_meta(out).get("info", {})
    if info.get("init_from") != str(source):
        raise ValueError(f"{out}: this run's base is {info.get('init_from') or 'a model it pretrained itself'}, "
                         f"not --init-from {source}; use another --out")
    if info.get("fingerprint") != _fingerprint(source):
        raise ValueError(f"{out}: the model at {source} changed since this run imported it; use another --out "
                         f"(or delete {out} to import it again)")
    cfg = dataclasses.replace(cfg, init_from=str(source))  # one spelling of the path (stages.json keys)
    return adopt_model(cfg, run_dir, {"the imported base": out}, max_seq_len=cfg.model.max_seq_len)


def adopt_model(cfg: RunConfig, run_dir: Path, ckpts: dict, max_seq_len: int | None = None) -> RunConfig:
    """cfg with the model shape of the run's input checkpoints ({label: directory}), which must
    agree: the same shape and max_seq_len, the same tokenizer (a reward model or reference read
    with another tokenizer's ids gives silently wrong numbers). The effective config is
    rewritten to run_dir/config.json. max_seq_len: the value the run asks for, checked too."""
    import dataclasses

    from .model import ModelConfig

    (first_label, first), *others = ckpts.items()
    shape = ModelConfig(**checkpoint.read_meta(first)["model"])
    tok = checkpoint.tokenizer_fingerprint(first)
    if max_seq_len is not None and shape.max_seq_len != max_seq_len:
        raise ValueError(f"{first}: {first_label} has model.max_seq_len={shape.max_seq_len}, the run asks for "
                         f"{max_seq_len}; rerun with --model.max_seq_len {shape.max_seq_len}")
    for label, d in others:
        other = ModelConfig(**checkpoint.read_meta(d)["model"])
        if checkpoint.tokenizer_fingerprint(d) != tok:
            raise ValueError(f"{d}: {label} uses another tokenizer than {first_label} ({first}); both must come "
                             f"from the same base model")
        if other.max_seq_len != shape.max_seq_len or other.vocab_size != shape.vocab_size:
            raise ValueError(f"{d}: {label} has model.max_seq_len={other.max_seq_len}, vocab_size="
                             f"{other.vocab_size}; {first_label} ({first}) has {shape.max_seq_len}, "
                             f"{shape.vocab_size}: both must come from the same base model")
    # pretraining never runs on an adopted model: its window only has to fit the adopted context, unless
    # PPO-ptx draws its pretraining windows with it (then a shorter window than asked for is refused, not cut)
    if cfg.ppo.ptx_coef > 0 and cfg.pretrain.seq_len > shape.max_seq_len:
        raise ValueError(f"config: pretrain.seq_len={cfg.pretrain.seq_len} (the PPO-ptx windows, ppo.ptx_coef="
                         f"{cfg.ppo.ptx_coef}) exceeds the model.max_seq_len={shape.max_seq_len} of {first_label} "
                         f"({first}); rerun with --pretrain.seq_len {shape.max_seq_len} or less")
    pretrain = dataclasses.replace(cfg.pretrain, seq_len=min(cfg.pretrain.seq_len, shape.max_seq_len))
    try:
        cfg = dataclasses.replace(cfg, model=shape, pretrain=pretrain)
    except ValueError as e:  # a stage's budget that the adopted context cannot hold
        raise ValueError(f"{first}: {first_label} has model.max_seq_len={shape.max_seq_len}; {e}") from None
    if distributed.is_main():
        from .config import to_dict

        write_json(run_dir / "config.json", to_dict(cfg))
        print(f"[config] model of {first_label}: " + ", ".join(f"{k}={v}" for k, v in to_dict(cfg)["model"].items()))
    return cfg


def gold_curve(cfg: RunConfig, inputs: Inputs, tokenizer):
    """PPO's `evaluate` callback: gold score on a fixed slice of the held-out prompts that the
    task knows. Evaluation only, for the curve in the report; the PPO reward never sees it."""
    from .evaluate import evaluate_policy

    prompts = [p for p in inputs.eval_prompts if inputs.task.knows(p)][:cfg.ppo.eval_prompts]
    if not prompts:
        return None

    def evaluate(policy):
        return evaluate_policy(policy, tokenizer, prompts, gold_score=inputs.gold_score,
                               max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                               batch_size=cfg.eval.batch_size, seed=cfg.seed)
    return evaluate


# ---------------------------------------------------------------- the stages, each call written once
def stage_calls(cfg: RunConfig, run_dir: Path, inputs: Inputs, metrics: Metrics, tokenizer) -> dict[str, Callable]:
    """name -> call(dirs, resume) -> output path; dirs holds the inputs' directories
    ("base", "sft", "rm", "preferences")."""
    from .stages.ppo import run_ppo
    from .stages.pretrain import run_pretrain
    from .stages.rankings import run_rankings
    from .stages.rm import run_rm
    from .stages.sft import run_sft

    def comparisons(dirs):
        return inputs.preferences if inputs.preferences is not None else read_preferences(dirs["preferences"])

    return {
        "pretrain": lambda dirs, resume: run_pretrain(
            cfg, run_dir / "pretrain", tokenizer=tokenizer, corpus=inputs.corpus,
            corpus_heldout=inputs.corpus_heldout, metrics=metrics, resume=resume),
        "sft": lambda dirs, resume: run_sft(
            cfg, run_dir / "sft", base_dir=dirs["base"], demos=inputs.sft, demos_heldout=inputs.sft_heldout,
            metrics=metrics, resume=resume),
        "rankings": lambda dirs, resume: run_rankings(
            cfg, run_dir / PREFERENCES_FILE, sft_dir=dirs["sft"], prompts=inputs.rm_prompts,
            gold_score=inputs.task.gold_score, annotator_seed=cfg.seed, metrics=metrics, resume=resume),
        "rm": lambda dirs, resume: run_rm(
            cfg, run_dir / "rm", sft_dir=dirs["sft"], comparisons=comparisons(dirs), metrics=metrics,
            gold_score=inputs.gold_score, resume=resume),
        "ppo": lambda dirs, resume: run_ppo(
            cfg, run_dir / "ppo", sft_dir=dirs["sft"], rm_dir=dirs["rm"], prompts=inputs.ppo_prompts,
            metrics=metrics, evaluate=gold_curve(cfg, inputs, tokenizer), resume=resume,
            pretrain_corpus=inputs.corpus),
    }


# What each stage's output depends on, cumulatively along ORDER: the config fields ("section" or
# "section.field") read by the stage and by every stage before it. A finished stage is kept on a
# rerun only when its key (stage_keys) is what the run asks for.
STAGE_FIELDS = {
    "pretrain": ("seed", "device", "init_from", "model", "task", "data.corpus", "data.corpus_heldout", "pretrain"),
    "sft": ("skip_sft", "data.sft", "sft"),
    "rankings": ("rm.k", "rm.temperature", "rm.max_new_tokens", "rm.sample_batch_size", "data.rm_prompts",
                 "data.preferences"),
    "rm": ("rm",),
    "ppo": ("ppo", "data.ppo_prompts", "data.eval_prompts"),
}
STAGES_FILE = "stages.json"  # stage -> the key of the configuration its finished output was made with
# what a --resume may change in a stage's options: its learning rates, how often it saves and evaluates
RESUME_MAY_CHANGE = {"pretrain.lr", "sft.lr", "rm.lr", "ppo.lr", "ppo.critic_lr", "pretrain.save_every",
                     "sft.save_every", "rm.save_every", "ppo.save_every", "ppo.eval_every"}


def stage_keys(cfg: RunConfig, fields: dict = STAGE_FIELDS) -> dict[str, dict]:
    """stage -> {field: value} of every config value its output depends on (fields, cumulative)."""
    from .config import to_dict

    d = to_dict(cfg)
    keys, acc = {}, {}
    for stage in ORDER:
        for f in fields[stage]:
            section, _, name = f.partition(".")
            acc[f] = d[section][name] if name else d[section]
        keys[stage] = dict(acc)
    return keys


def stages_of(cfg: RunConfig) -> tuple[str, ...]:
    """The stages `run_train` runs for cfg: no pretraining with --init-from, no sft with --skip-sft,
    no rankings with --data.preferences."""
    return tuple(s for s in ORDER if not (s == "sft" and cfg.skip_sft)
                 and not (s == "rankings" and cfg.data.preferences) and not (s == "pretrain" and cfg.init_from))


def _flatten(key: dict) -> dict:
    """{"section.field": value} of a stage key whose values may be whole sections."""
    out = {}
    for f, v in key.items():
        if isinstance(v, dict):
            out.update({f"{f}.{k}": vv for k, vv in v.items()})
        else:
            out[f] = v
    return out


def _first_difference(recorded: dict, wanted: dict, ignore=frozenset()) -> str:
    """`field=old, this run asks for new` of the first config value that differs ('' when none
    does), fields in `ignore` left out; an input checkpoint (inputs.--from) given on one side only
    is told as what made the stage: `train` (no input option) or a stage command."""
    a_, b_ = _flatten(recorded), _flatten(wanted)
    for f in sorted((set(a_) | set(b_)) - set(ignore)):
        a, b = a_.get(f), b_.get(f)
        if a != b:
            if f.startswith("inputs.") and (a is None or b is None):
                opt = f.removeprefix("inputs.")
                return (f"`train` (no {opt}), this run asks for {opt} {b}" if a is None else
                        f"{opt} {a} (a stage command), this run is `train` (no {opt})")
            return f"{f}={a!r}, this run asks for {b!r}"
    return ""


def stage_output(name: str, run_dir: Path) -> Path:
    return run_dir / (PREFERENCES_FILE if name == "rankings" else name)


def _state(name: str, out: Path) -> tuple[bool, str | None]:
    """(finished, description of an unfinished output or None)."""
    if name == "rankings":
        partial = out.with_name(out.name + ".partial")
        return out.exists(), (f"{partial} (partial rankings)" if partial.exists() else None)
    if checkpoint.is_finished(out):
        return True, None
    return False, (f"{out} (step {checkpoint.read_meta(out)['step']})" if checkpoint.exists(out) else None)


def check_stage(name: str, out: Path, resume: bool, key: dict | None = None) -> tuple[bool, str | None]:
    """(finished, description of an unfinished output or None) of a stage's output, after the
    checks that refuse (ValueError, one line): a finished output made with another configuration
    than `key` (stages.json's record of it), an unfinished one without --resume, or a resume with
    other options than the ones it started with (RESUME_MAY_CHANGE aside)."""
    finished, unfinished = _state(name, out)
    keys_path = out.parent / STAGES_FILE
    recorded = read_json_object(keys_path) if key is not None and keys_path.exists() else {}
    if finished and key is not None and name in recorded and recorded[name] != key:
        raise ValueError(f"{out}: made with {_first_difference(recorded[name], key)}; use another --out, or "
                         f"delete {out} (and the stages after it) to redo it")
    if not finished and unfinished and not resume:
        raise ValueError(f"{unfinished}: unfinished {name} output; rerun with --resume to continue it, or "
                         f"delete it to start the stage over")
    if not finished and unfinished and key is not None and name in recorded:  # a resume continues what it started
        changed = _first_difference(recorded[name], key, ignore=RESUME_MAY_CHANGE)
        if changed:
            raise ValueError(f"{unfinished}: started with {changed}; resume with the options it started with (only "
                             f"learning rates, save_every and eval_every may change), or delete it to start over")
    return finished, unfinished


def check_stages(run_dir: Path, stages: tuple[str, ...], keys: dict, resume: bool) -> None:
    """check_stage for every stage of a run before any of them computes, and: a finished stage
    after one that has to run (missing or unfinished) was made from another output than the one
    that run will make, so it is refused too."""
    must_run = None
    for name in stages:
        out = stage_output(name, run_dir)
        finished, _ = check_stage(name, out, resume, keys.get(name))
        if finished and must_run is not None:
            raise ValueError(f"{out}: made from the {must_run} output that has to run again now; delete {out} "
                             f"(and the stages after it) too, or restore the {must_run}")
        if not finished and must_run is None:
            must_run = name


def run_stage(name: str, out: Path, call: Callable[[bool], Path], resume: bool, wall: dict,
              key: dict | None = None):
    """Run one stage unless it already finished (check_stage's refusals first); its key
    (stage_keys(cfg)[name]) is recorded in the run directory's stages.json before it runs and
    again when it finishes."""
    finished, unfinished = check_stage(name, out, resume, key)
    keys_path = out.parent / STAGES_FILE
    if finished:
        print(f"[{name}] finished earlier, kept: {out}")
        recorded = read_json_object(keys_path) if key is not None and keys_path.exists() else {}
        if key is not None and name not in recorded:  # a stage an experiment linked in from another arm
            _record_key(keys_path, name, key)
        return
    distributed.barrier()  # every rank has looked at the output before rank 0 writes to it
    if key is not None:  # before the stage runs, so that no finished stage is ever without its record
        _record_key(keys_path, name, key)
    t0 = time.time()
    call(bool(unfinished))
    wall[name] = round(time.time() - t0, 1)
    if key is not None:
        _record_key(keys_path, name, key)


def _record_key(path: Path, name: str, key: dict) -> None:
    if not distributed.is_main():
        return
    keys = read_json_object(path) if path.exists() else {}
    keys[name] = key
    write_json(path, keys, sort_keys=True)


def _flat(cfg: RunConfig) -> dict:
    """{"section.field": value} of the whole config."""
    from .config import to_dict

    return {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in to_dict(cfg).items()
            for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}


def _prepare(cfg: RunConfig, run_dir) -> tuple[Path, Inputs, Metrics]:
    distributed.init(cfg.model, resolve_device(cfg.device))  # under torchrun (the CLI has done it); else nothing
    distributed.same_everywhere("config", _flat(cfg))  # two launches with other options would hang, not fail
    use_all_cores()
    resolve_device(cfg.device)  # fail now, not after the first stage
    seed_everything(cfg.seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, load_inputs(cfg), Metrics(run_dir)


def run_train(cfg: RunConfig, run_dir, resume: bool = False) -> dict:
    """The whole recipe into run_dir; returns the summary (summary.json)."""
    t_start = time.time()
    run_dir, inputs, metrics = _prepare(cfg, run_dir)
    if cfg.init_from:  # a pretrained model is the base: no pretraining
        cfg = import_base(cfg, run_dir)
    tokenizer = run_tokenizer(cfg, run_dir, inputs.corpus)
    stages = stages_of(cfg)
    keys = stage_keys(cfg)
    check_inputs(cfg, inputs, tokenizer, stages + ("eval",))
    wall_path = run_dir / "wall_times.json"
    wall = _read_wall(wall_path)
    calls = stage_calls(cfg, run_dir, inputs, metrics, tokenizer)
    dirs = {"base": run_dir / "pretrain", "sft": run_dir / ("pretrain" if cfg.skip_sft else "sft"),
            "rm": run_dir / "rm", "preferences": run_dir / PREFERENCES_FILE}
    if cfg.skip_sft:
        print("[sft] skipped (--skip-sft): the base model is the policy init and the KL reference")
    check_stages(run_dir, stages, keys, resume)  # every refusal before the first stage computes
    for name in stages:
        run_stage(name, stage_output(name, run_dir), lambda r, name=name: calls[name](dirs, r), resume, wall,
                  key=keys[name])
        if distributed.is_main():
            _write_wall(wall_path, wall)

    from .evaluate import evaluate_checkpoints
    from .report import write_report

    t0 = time.time()
    ckpts = {"base": dirs["base"], **({} if cfg.skip_sft else {"sft": dirs["sft"]}), "ppo": run_dir / "ppo"}
    evals = evaluate_checkpoints(ckpts, rm_dir=dirs["rm"], ref_dir=dirs["sft"], prompts=inputs.eval_prompts,
                                 gold_score=inputs.gold_score, corpus_heldout=inputs.corpus_heldout, ec=cfg.eval,
                                 seq_len=cfg.pretrain.seq_len, seed=cfg.seed, device=resolve_device(cfg.device))
    wall["eval"] = round(time.time() - t0, 1)
    summary = {}
    if distributed.is_main():  # the report and summary are written once
        _write_wall(wall_path, wall)
        summary = write_report(cfg, run_dir, evals, prompts=inputs.eval_prompts, rm_dir=dirs["rm"], wall=wall,
                               total_wall=sum(wall.values()))  # every stage's time, over every invocation
    distributed.barrier()  # every rank returns once they are on disk
    print(f"[train] done in {time.time() - t_start:.0f}s: {run_dir / 'report.md'}")
    return summary


def _write_wall(path: Path, wall: dict) -> None:
    """wall_times.json, replaced whole (the other ranks may be reading it as rank 0 passes finished stages)."""
    write_json(path, wall, indent=None)


def _read_wall(path: Path) -> dict:
    """wall_times.json ({stage: seconds}), or {} when there is none; ValueError in one line naming
    the file when it is not a JSON object of numbers (files.read_json_object's messages)."""
    if not path.exists():
        return {}
    wall = read_json_object(path)
    for stage, seconds in wall.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ValueError(f"{path}: {stage}: expected a number of seconds, got {json.dumps(seconds)[:40]}")
    return wall


# What a run directory holds, by name: a stage's checkpoint is a directory, everything else a file
RUN_DIRS = ("pretrain", "sft", "rm", "ppo")
RUN_FILES = ("config.json", STAGES_FILE, "wall_times.json", METRICS_FILE, PREFERENCES_FILE,
             PREFERENCES_FILE + ".partial", TOKENIZER_FILE, "summary.json", "report.md", "eval.json",
             "gold_by_stage.png", "ppo_curves.png", "monitor.png")


RUN_CONFIG_KEYS = {"seed", "model", "pretrain", "sft", "rm", "ppo"}  # a run's config.json (config.to_dict)


def is_run_dir(d: Path) -> bool:
    """d holds a minirlhf run: its lock file, stages.json or metrics.jsonl (what run_train writes
    when called from Python), a stage's checkpoint in its place, or a config.json that is a run's
    configuration."""
    if any((d / name).exists() for name in (LOCK_FILE, STAGES_FILE, METRICS_FILE)):
        return True
    if any(checkpoint.is_checkpoint(d / stage) for stage in RUN_DIRS):
        return True  # a stage's checkpoint where a run keeps it (a run assembled from another's stages)
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and RUN_CONFIG_KEYS <= set(cfg) and "stage" not in cfg


def check_run_dir(run_dir: Path) -> None:
    """ValueError (one line) unless --out is new, empty, or a run directory minirlhf wrote: never a
    stage's checkpoint or a directory inside a run (its files would be overwritten or broken), nor
    a directory of the user's own files (config.json, report.md, ... would be replaced)."""
    parent = next((p for p in run_dir.resolve().parents if is_run_dir(p)), None)
    if parent is not None:
        raise ValueError(f"--out {run_dir}: inside the run directory {parent}; give that run directory, or one "
                         f"outside it")
    if not run_dir.is_dir():
        return  # new (make_dir says why when it cannot be made)
    if checkpoint.is_checkpoint(run_dir):
        raise ValueError(f"--out {run_dir}: a stage's checkpoint, not a run directory; give a new directory (a stage "
                         f"command's input checkpoint goes to --from)")
    if is_run_dir(run_dir):
        return
    theirs = sorted(p.name for p in run_dir.iterdir())
    if theirs:
        raise ValueError(f"--out {run_dir}: holds files minirlhf did not write ({', '.join(theirs[:3])}"
                         f"{', ...' if len(theirs) > 3 else ''}); give a new or empty directory")


def check_run_files(run_dir, option: str = "--out") -> None:
    """Before any compute: each name a run writes into run_dir is absent or of the kind it writes
    (RUN_DIRS: a directory, and so are their `.tmp`/`.old` save siblings; RUN_FILES: a regular
    file; the lock file: files.check_lock_path, the same line DirLock gives), so that no stage or report meets a
    directory or a file in its way after the compute. A symbolic link counts as what it points to
    (except the lock's). ValueError in one line: `PATH: a directory, where this run writes a
    file; move it away or use another --out`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return  # nothing in it yet (make_dir, before, says when the directory itself cannot be)
    wanted = {**{n: "a directory" for d in RUN_DIRS for n in (d, d + ".tmp", d + ".old")},
              **{n: "a regular file" for n in RUN_FILES}}
    for name, want in wanted.items():
        kind = file_kind(run_dir / name)
        if kind is not None and kind != want:
            what = "a directory (a stage's checkpoint)" if want == "a directory" else "a file"
            raise ValueError(f"{run_dir / name}: {kind}, where this run writes {what}; move it away or use "
                             f"another {option}")
    check_lock_path(run_dir, option)


def run_one_stage(name: str, cfg: RunConfig, run_dir, *, resume: bool, from_dir=None, rm_dir=None) -> Path:
    """`python -m minirlhf pretrain|sft|rm|ppo`: one stage, its input checkpoints given explicitly
    (`rm` samples and ranks comparisons first, unless --data.preferences gives them)."""
    run_dir, inputs, metrics = _prepare(cfg, run_dir)
    if cfg.init_from:
        if name == "pretrain" or from_dir is not None:
            raise ValueError(f"{name}: --init-from gives the base model; " + (
                "there is nothing to pretrain" if name == "pretrain" else "give either --from or --init-from"))
        cfg = import_base(cfg, run_dir)
        from_dir = run_dir / "pretrain"
    elif name != "pretrain" and from_dir is None:
        raise ValueError(f"{name}: give --from DIR (the previous stage's checkpoint) or --init-from PATH")
    if name == "ppo" and rm_dir is None:
        raise ValueError("ppo: give --rm RM_DIR (the reward model's checkpoint)")
    for label, d in (("--from", from_dir), ("--rm", rm_dir)):
        if d is not None and not checkpoint.read_meta(d).get("finished"):
            raise ValueError(f"{label} {d}: an unfinished checkpoint (resume its stage first)")
    # the stage each input must come from: the policy is a language model, the reward model a trained RM
    kinds = {"--from": {"sft": ("pretrain", "import"), "rm": ("sft", "pretrain", "import", "ppo"),
                        "ppo": ("sft", "pretrain", "import", "ppo")}.get(name, ()), "--rm": ("rm",)}
    for label, d in (("--from", from_dir), ("--rm", rm_dir)):
        stage = checkpoint.read_meta(d).get("stage") if d is not None else None
        if stage is not None and kinds[label] and stage not in kinds[label]:
            raise ValueError(f"{label} {d}: a {stage} checkpoint; {name} takes {label} from "
                             + " or ".join(kinds[label]))
    if name != "pretrain":  # the run's model is its input checkpoint's (and the reward model's must match)
        cfg = adopt_model(cfg, run_dir, {"--from": from_dir, **({"--rm": rm_dir} if rm_dir else {})},
                          max_seq_len=cfg.model.max_seq_len if cfg.init_from else None)
    tokenizer = run_tokenizer(cfg, run_dir, inputs.corpus) if name == "pretrain" else checkpoint.load_tokenizer(from_dir)
    stages = {"pretrain": ("pretrain",), "sft": ("sft",), "ppo": ("ppo",),
              "rm": ("rm",) if inputs.preferences is not None else ("rankings", "rm")}[name]
    check_inputs(cfg, inputs, tokenizer, stages)
    calls = stage_calls(cfg, run_dir, inputs, metrics, tokenizer)
    dirs = {"base": from_dir, "sft": from_dir, "rm": rm_dir, "preferences": run_dir / PREFERENCES_FILE}
    keys = command_keys(cfg, stages, {"--from": from_dir, "--rm": rm_dir})
    check_stages(run_dir, stages, keys, resume)
    wall: dict = {}
    for s in stages:
        run_stage(s, stage_output(s, run_dir), lambda r, s=s: calls[s](dirs, r), resume, wall, key=keys[s])
    return stage_output(name, run_dir)


def command_keys(cfg: RunConfig, stages: tuple[str, ...], inputs: dict) -> dict[str, dict]:
    """stage_keys for a single-stage command: what its output depends on is its own stages' config
    fields, the run-wide ones (seed, device, init_from, model) and its input checkpoints ({option:
    directory}: the resolved path and the save's id, so a checkpoint retrained in place is another
    input). A rerun into the same --out with another --from, --rm or option is refused like train's."""
    fields = {s: () for s in ORDER}
    for i, s in enumerate(stages):
        own = (STAGE_FIELDS["rankings"] if s == "rm" and i == 0 else ()) + STAGE_FIELDS[s]  # preferences given
        fields[s] = STAGE_FIELDS[s] if s == "pretrain" else (
            ("seed", "device", "init_from", "model") if i == 0 else ()) + own
    # a checkpoint is its save (a copied run directory's own checkpoints are still its inputs); by path when
    # it has no save id (written before ids existed)
    given = {label: f"save {checkpoint.save_id(d)}" if checkpoint.save_id(d) else str(Path(d).resolve())
             for label, d in inputs.items() if d is not None}
    return {s: {**k, **({"inputs": given} if given else {})} for s, k in stage_keys(cfg, fields).items()}


def run_eval_command(cfg: RunConfig, run_dir, ckpts: list[str], *, ref=None, rm=None) -> dict:
    """`python -m minirlhf eval --ckpt A --ckpt B`: gold ± SE, RM score, KL to the reference."""
    from .evaluate import evaluate_checkpoints

    run_dir, inputs, _ = _prepare(cfg, run_dir)
    if cfg.init_from:  # the pretrained model is scored too, first, and is the default reference
        cfg = import_base(cfg, run_dir)
        ckpts = [str(run_dir / "pretrain"), *ckpts]
    if not ckpts:
        raise ValueError("eval: give --ckpt DIR (repeatable) or --init-from PATH")
    from .interop.export import check_role

    for d in [*ckpts, ref, rm]:
        if d is not None:
            checkpoint.read_meta(d)  # one line for a path that is not a stage's checkpoint
    for d in [*ckpts, ref]:  # sampled from / the KL reference: a policy, not a reward model
        if d is not None:
            check_role(d, checkpoint.read_meta(d).get("stage"))
    if rm is not None and checkpoint.read_meta(rm).get("stage") != "rm":
        raise ValueError(f"--rm {rm}: a {checkpoint.read_meta(rm).get('stage')} checkpoint, not a reward model")
    ref = ref or ckpts[0]
    cfg = adopt_model(cfg, run_dir, {"the reference": ref, **{f"--ckpt {c}": c for c in ckpts},
                                     **({"--rm": rm} if rm else {})})
    check_inputs(cfg, inputs, checkpoint.load_tokenizer(ref), ("eval",))
    results = evaluate_checkpoints({str(c): c for c in ckpts}, rm_dir=rm, ref_dir=ref, prompts=inputs.eval_prompts,
                                   gold_score=inputs.gold_score, corpus_heldout=inputs.corpus_heldout, ec=cfg.eval,
                                   seq_len=cfg.pretrain.seq_len, seed=cfg.seed, device=resolve_device(cfg.device))
    out = {k: {kk: vv for kk, vv in v.items() if kk not in ("responses", "rm_scores")} for k, v in results.items()}
    if distributed.is_main():
        write_json(run_dir / "eval.json", out, indent=2)
    distributed.barrier()
    return out
