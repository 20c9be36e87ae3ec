"""The command line: `python -m minirlhf <command>`.

Every RunConfig field is an option `--<section>.<field> VALUE`, grouped by section in
--help with its help text and the `quick` preset's default. A user mistake (bad option,
bad value, bad data file) prints one line `error: ...` and exits 2; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

from . import config as C
from . import distributed
from .checkpoint import NonFiniteError
from .files import LOCK_FILE, DirLock, write_atomic, write_json
from .loop import StageStopped

COMMANDS = {
    "train": "the whole pipeline: pretrain -> SFT -> rankings -> RM -> PPO -> evaluation + report",
    "pretrain": "stage 1 only: tokenizer + base model on the corpus",
    "sft": "stage 2 only: supervised fine-tuning of a base checkpoint (--from DIR)",
    "rm": "stage 3 only: rankings of SFT samples + reward model (--from SFT_DIR)",
    "ppo": "stage 4 only: PPO of an SFT policy against a reward model (--from SFT_DIR --rm RM_DIR)",
    "eval": "score checkpoints on the held-out prompts: gold, RM, KL to a reference",
    "generate": "sample responses from a policy's checkpoint (any stage but rm) or a pretrained model",
    "data": "`data export DIR`: write the embedded task as JSONL files",
    "label": "rank responses or compare two checkpoints in the browser; inter-annotator agreement",
    "bench-report": "turn bench/results/<device>.json (pytest bench/ --benchmark-json ...) into markdown tables",
    "experiment": "experiments that answer the recipe's questions: sft-ablation, kl-sweep, ptx, iterate, best-of-n",
    "export": "write a checkpoint as a Hugging Face directory (transformers loads it)",
}


# commands whose options and run live in their own module: name -> (module, its run(args) -> exit code);
# each module has add_arguments(parser)
PLUGGED = {"label": (".label.cli", "main"), "bench-report": (".bench_report", "run"),
           "experiment": (".experiments.cli", "main"), "export": (".interop.export", "main")}

RUN_COMMANDS = ("train", "pretrain", "sft", "rm", "ppo", "eval")


# ---- the command line's view of the config: dotted overrides ----

def field_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" | None", "").replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "bool": bool, "str": str}[t]


def parse_value(text: str, f: dataclasses.Field, name: str):
    """The typed value of `--name text` for field f; "none" is the off-switch of a field whose default is None
    or whose range allows it."""
    kind = field_type(f)
    if text.lower() in ("none", "null", "off") and "None" in str(f.type):
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {kind.__name__}, got {text!r}") from None


def apply_overrides(cfg: C.RunConfig, overrides: dict[str, str]) -> C.RunConfig:
    """overrides: {"ppo.kl_coef": "0.05", "seed": "1"} → a new validated RunConfig."""
    top, nested = {}, {}
    top_fields = {f.name: f for f in dataclasses.fields(C.RunConfig) if f.name not in C.SECTIONS}
    for name, text in overrides.items():
        if "." in name:
            section, key = name.split(".", 1)
            if section not in C.SECTIONS:
                raise ValueError(f"--{name}: unknown section {section!r} (one of {', '.join(C.SECTIONS)})")
            fs = {f.name: f for f in dataclasses.fields(C.section_class(section))}
            if key not in fs:
                raise ValueError(f"--{name}: {section} has no field {key!r} (see --help)")
            nested.setdefault(section, {})[key] = parse_value(text, fs[key], name)
        elif name in top_fields:
            top[name] = parse_value(text, top_fields[name], name.replace("_", "-"))
        else:
            raise ValueError(f"--{name}: unknown option (see --help)")
    return C.replace(cfg, **top, **nested)


def bounded(kind: type, **rng):
    """An argparse type: kind(text) within the range (config.knob's ge/gt/le/lt), else a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        try:
            C.check_range("value", value, rng, False)
        except ValueError as e:  # config's own rule, "must be ..." (finite too, for inf and nan)
            raise argparse.ArgumentTypeError(f"{text} must be {str(e).split(': must be ', 1)[1]}") from None
        return value
    parse.__name__ = kind.__name__
    return parse


class UserError(ValueError):
    """A mistake in the command line; reported in one line, exit 2."""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to an option's help, unless the help states its default already or X is None
    (an option that is off unless given)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise UserError(f"{self.prog}: {message}")


def _add_run_options(p: argparse.ArgumentParser, preset: str = "quick", command: str = "train") -> None:
    """The options of a run command; eval scores existing checkpoints, so it has no --resume or --skip-sft."""
    p.add_argument("--preset", default="quick", choices=sorted(C.PRESETS),
                   help="starting configuration: tiny (tests, seconds), quick (2 CPU cores, ~5 min), gpu (~100M params, one GPU)")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    if command != "eval":
        p.add_argument("--resume", action="store_true", help="continue a stage killed mid-way from its last checkpoint")
    defaults = C.PRESETS[preset]()  # --help shows the defaults of the --preset given with it
    top = p.add_argument_group("run", f"defaults shown: the {preset} preset's")
    for f in dataclasses.fields(C.RunConfig):
        if f.name in C.SECTIONS or (command == "eval" and f.name == "skip_sft"):
            continue
        flag = "--" + f.name.replace("_", "-")  # --skip-sft, --init-from
        top.add_argument(flag, dest=f"cfg:{f.name}", default=argparse.SUPPRESS, metavar=field_type(f).__name__.upper(),
                         help=_help(None, f, getattr(defaults, f.name)),
                         **({"nargs": "?", "const": "true"} if f.name == "skip_sft" else {}))
    group = p.add_argument_group("dist", "several processes under torchrun (see README, Many devices); "
                                         "results do not depend on these beyond float rounding")
    group.add_argument("--dist.strategy", dest="dist_strategy", default="auto", choices=distributed.STRATEGIES,
                       help=distributed.STRATEGY_HELP + " (default: auto)")
    group.add_argument("--dist.timeout", dest="dist_timeout", type=bounded(float, ge=1), default=600.0,
                       metavar="SECONDS", help="how long a collective waits for the other processes before every "
                       "process stops with an error (no hang when one dies) (default: 600)")
    group.add_argument("--dist.threads", dest="dist_threads", type=bounded(int, ge=0), default=0, metavar="INT",
                       help="CPU threads per process; 0 = the cores this process may use divided by the processes "
                       "on its node (in one process: OMP_NUM_THREADS or every core) (default: 0)")
    for section in C.SECTIONS:
        sub = getattr(defaults, section)
        doc = (type(sub).__doc__ or "").strip()
        group = p.add_argument_group(section, "" if doc.startswith(type(sub).__name__ + "(") else doc)
        for f in dataclasses.fields(sub):
            group.add_argument(f"--{section}.{f.name}", dest=f"cfg:{section}.{f.name}", default=argparse.SUPPRESS,
                               metavar=field_type(f).__name__.upper(), help=_help(section, f, getattr(sub, f.name)))


def _help(section, f: dataclasses.Field, default) -> str:
    rng = C.field_range(section, f)
    valid = f"; {C.describe_range(rng)}" if rng else ""
    none = "; none = off" if "None" in str(f.type) else ""
    return f"{f.metadata.get('help', '')} (default: {default}{valid}{none})".replace("%", "%%")


def resolve_config(args) -> C.RunConfig:
    cfg = C.PRESETS[args.preset]()
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    cfg = apply_overrides(cfg, overrides)
    # a model that already exists has its own shape: only the context (max_seq_len) of an imported one is a run option
    shape = sorted(k for k in overrides if k.startswith("model.") and not (cfg.init_from and k == "model.max_seq_len"))
    existing = cfg.init_from or getattr(args, "from_dir", None) or args.command == "eval"
    if shape and existing and args.command != "pretrain":
        source = "--init-from" if cfg.init_from else "--from" if getattr(args, "from_dir", None) else "--ckpt"
        raise ValueError(f"--{shape[0]}: the model comes from {source}, and its shape is the checkpoint's"
                         + (" (with --init-from, --model.max_seq_len sets the run's context)" if cfg.init_from else ""))
    return cfg


def _preset_in(argv) -> str:
    """The --preset given on the command line (for --help's defaults), else quick."""
    argv = list(argv)
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--preset=") else argv[i + 1] if a == "--preset" and i + 1 < len(
            argv) else None
        if value in C.PRESETS:
            return value
    return "quick"


def build_parser(preset: str = "quick") -> argparse.ArgumentParser:
    p = _Parser(prog="minirlhf", description="RLHF from scratch: pretrain -> SFT -> reward model -> PPO.",
                epilog="`python -m minirlhf COMMAND --help` lists every option of a command.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help in COMMANDS.items():
        usage = f"minirlhf {name} [options] [--SECTION.FIELD VALUE ...]" if name in RUN_COMMANDS else None
        fmt = _DefaultsFormatter if name == "generate" else argparse.HelpFormatter
        sp = sub.add_parser(name, help=help, description=help, usage=usage, formatter_class=fmt, allow_abbrev=False)
        if name in RUN_COMMANDS:
            _add_run_options(sp, preset, name)
        if name in ("sft", "rm", "ppo"):
            sp.add_argument("--from", dest="from_dir", default=None,
                            help="checkpoint directory of the previous stage (or --init-from a pretrained model)")
        if name == "ppo":
            sp.add_argument("--rm", dest="rm_dir", default=None, help="reward model checkpoint directory (required)")
        if name == "eval":
            sp.add_argument("--ckpt", action="append", default=[],
                            help="checkpoint to score (repeatable; --init-from adds the pretrained model)")
            sp.add_argument("--ref", default=None, help="reference checkpoint for KL (default: the first --ckpt)")
            sp.add_argument("--rm", "--rm-ckpt", dest="rm_ckpt", default=None, metavar="RM_DIR",
                            help="reward model checkpoint directory to score with, as ppo's --rm (optional; "
                                 "--rm-ckpt is its older spelling)")
        if name == "generate":
            sp.add_argument("--ckpt", help="checkpoint directory of a policy (any stage but rm)")
            sp.add_argument("--init-from", help="or a pretrained model: Hugging Face directory or .gguf file")
            sp.add_argument("--max-seq-len", type=bounded(int, **C.MODEL_RANGES["max_seq_len"]), default=None,
                            help="with --init-from only: longest prompt + response, which sizes the RoPE tables "
                                 f"(default: the model's context; at most {C.MAX_SEQ_LEN}; a checkpoint keeps its "
                                 "model.max_seq_len)")
            sp.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
            sp.add_argument("--n", type=bounded(int, ge=1), default=1, help="samples per prompt")
            sp.add_argument("--max-new-tokens", type=bounded(int, ge=1), default=48,
                            help="longest response in tokens (it ends earlier at the end-of-turn token)")
            sp.add_argument("--temperature", type=bounded(float, ge=0), default=0.8, help="0 = greedy")
            sp.add_argument("--top-k", type=bounded(int, ge=0), default=0, help="0 = off")
            sp.add_argument("--top-p", type=bounded(float, gt=0, le=1), default=1.0, help="1 = off")
            sp.add_argument("--seed", type=bounded(int, ge=0, le=2**32 - 1), default=0, help="seed of the sampling")
            sp.add_argument("--raw", action="store_true", help="continue the text as is, without chat framing")
        if name in PLUGGED:
            importlib.import_module(PLUGGED[name][0], __package__).add_arguments(sp)
        if name == "data":
            sp.add_argument("action", choices=["export"])
            sp.add_argument("dir", help="output directory")
            sp.add_argument("--preset", default="quick", choices=sorted(C.PRESETS))
            sp.add_argument("--seed", type=bounded(int, ge=0, le=2**32 - 1), default=None,
                            help="task seed (default: the preset's)")
    return p


def _run_dir(args, cfg: C.RunConfig) -> Path:
    if args.out is not None and not args.out.strip():
        raise ValueError(f"--out: an empty path; leave the option out for the default runs/{args.preset}")
    run_dir = Path(args.out or f"runs/{args.preset}")
    from .pipeline import check_run_dir, check_run_files

    check_run_dir(run_dir)  # new, empty, or a run's: never a checkpoint, inside a run, or the user's own files
    check_run_files(run_dir)  # what is in the way of the run's own files, found before any compute
    make_dir(run_dir, "--out")
    return run_dir


def make_dir(path: Path, option: str) -> None:
    """mkdir -p, or one line naming the option when the directory cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise ValueError(f"{option} {path}: cannot make this directory ({why})") from None


def _announce(cfg: C.RunConfig, run_dir: Path) -> None:
    """Print the resolved config and save it with the run."""
    resolved = C.to_dict(cfg)
    print(f"[config] run dir {run_dir}; resolved config (also in config.json):")
    print("  " + ", ".join(f"{k}={v}" for k, v in resolved.items() if not isinstance(v, dict)))
    for section, values in resolved.items():
        if isinstance(values, dict):
            print(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if distributed.is_main():
        write_json(run_dir / "config.json", resolved)


def cmd_generate(args) -> int:
    import torch

    from . import checkpoint
    from .generate import generate
    if (args.ckpt is None) == (args.init_from is None):
        raise ValueError("generate: give exactly one of --ckpt DIR and --init-from PATH")
    if args.ckpt is not None and args.max_seq_len is not None:
        raise ValueError("generate: --max-seq-len goes with --init-from; a checkpoint keeps its own model.max_seq_len")
    for p in args.prompt:  # argv bytes that are not UTF-8 arrive as lone surrogates U+DC80..U+DCFF (PEP 383)
        if any(0xD800 <= ord(c) <= 0xDFFF for c in p):
            shown = "".join(c if not 0xD800 <= ord(c) <= 0xDFFF else f"\\x{ord(c) - 0xDC00:02x}"
                            if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}" for c in p)
            raise ValueError(f'generate: --prompt "{shown}": not UTF-8 text; give prompts in UTF-8')
        if not p.strip():  # as data files refuse a blank prompt
            shown = p.encode("unicode_escape").decode("ascii")  # a newline shown as \n: one line
            raise ValueError(f'generate: --prompt "{shown}": empty string; give a prompt with text')
    if args.ckpt is not None:  # a reward model scores responses: refused before loading anything
        from .interop.export import check_role

        check_role(args.ckpt, checkpoint.read_meta(args.ckpt).get("stage"))
    if args.init_from:
        from .interop import load_pretrained

        model, tokenizer = load_pretrained(args.init_from, args.max_seq_len)
    else:
        tokenizer = checkpoint.load_tokenizer(args.ckpt)
        model = checkpoint.load_model_from(args.ckpt).eval()
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompts = [p for p in args.prompt for _ in range(args.n)]
    ids = [bos + tokenizer.encode(p) if args.raw else tokenizer.prompt_ids(p) for p in prompts]
    gen = generate(model, ids, max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   generator=torch.Generator().manual_seed(args.seed))
    for p, toks in zip(prompts, gen.tokens):
        print(f"### {p}\n{tokenizer.decode(toks)}\n")
    return 0


def cmd_data(args) -> int:
    from .data import build_task, export_task

    cfg = C.PRESETS[args.preset]()
    task_cfg = cfg.task if args.seed is None else dataclasses.replace(cfg.task, seed=args.seed)
    make_dir(Path(args.dir), "data export")
    export_task(build_task(task_cfg), args.dir)
    print(f"[data] wrote the embedded task ({args.preset} preset, seed {task_cfg.seed}) as JSONL to {args.dir}")
    return 0


def cmd_stages(args) -> int:
    from . import pipeline
    from .device import resolve_device

    cfg = resolve_config(args)
    distributed.init(cfg.model, resolve_device(cfg.device),  # several processes under torchrun; else nothing
                     distributed.Options(args.dist_strategy, args.dist_timeout, args.dist_threads))
    run_dir = _run_dir(args, cfg)
    lock = DirLock(run_dir)  # one run at a time writes into a run directory
    distributed.on_main(lock.acquire)
    before = _snapshot(run_dir)
    try:
        _announce(cfg, run_dir)
        if args.command == "train":
            pipeline.run_train(cfg, run_dir, resume=args.resume)
        elif args.command == "eval":
            pipeline.run_eval_command(cfg, run_dir, args.ckpt, ref=args.ref, rm=args.rm_ckpt)
        else:
            pipeline.run_one_stage(args.command, cfg, run_dir, resume=args.resume,
                                   from_dir=getattr(args, "from_dir", None), rm_dir=getattr(args, "rm_dir", None))
    except ValueError:  # refused: the run directory is left as it was found, when nothing else was written
        if distributed.is_main():
            _restore(run_dir, before)
        raise
    finally:
        lock.release()
    return 0


def _snapshot(run_dir: Path) -> tuple[set, bytes | None]:
    """(the names in run_dir, its config.json's bytes or None), before a command writes there."""
    names = {p.name for p in run_dir.iterdir()} - {LOCK_FILE}
    config = run_dir / "config.json"
    return names, config.read_bytes() if config.is_file() else None


def _restore(run_dir: Path, before: tuple[set, bytes | None]) -> None:
    """Undo what a refused command wrote before its refusal (config.json; the directory itself
    when the command made it), unless it also wrote anything else (a stage that ran is kept)."""
    names, config = before
    if {p.name for p in run_dir.iterdir()} - {LOCK_FILE, "config.json"} - names:
        return
    if config is not None:
        path = run_dir / "config.json"
        if not path.is_file() or path.read_bytes() != config:
            write_atomic(path, config)
    else:
        (run_dir / "config.json").unlink(missing_ok=True)
        if not names:  # a directory this command made: gone again
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            try:
                run_dir.rmdir()
            except OSError:
                pass


def os_error_line(e: OSError) -> str:
    """An OSError as `PATH: strerror` (`SRC -> DST: strerror` for a rename), or strerror alone
    when it names no path."""
    paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{paths}: {e.strerror}" if paths else str(e.strerror)


def main(argv=None) -> int:
    parser = build_parser(_preset_in(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command in PLUGGED:
            module, function = PLUGGED[args.command]
            code = getattr(importlib.import_module(module, __package__), function)(args)
        else:
            code = cmd_stages(args)
        distributed.shutdown()
        return code
    # an error is printed once per run: under torchrun by the process that hit it first (distributed.py)
    except ValueError as e:  # user mistakes: bad option, bad value, bad data file, missing checkpoint
        distributed.report_failure(f"error: {e}")
        return 2
    except FileNotFoundError as e:
        distributed.report_failure(f"error: {e.filename}: no such file")
        return 2
    except (StageStopped, NonFiniteError) as e:  # the run cannot go on; what finished is kept
        distributed.report_failure(f"error: {e}")
        return 1
    except MemoryError as e:
        distributed.report_failure(f"error: out of memory ({e}); lower the model, batch or sequence sizes")
        return 1
    except KeyboardInterrupt as e:  # a command may say how it continues (experiment: a plain rerun)
        hint = str(e) or "finished stages are kept; rerun with --resume to continue the current one"
        print(f"\ninterrupted: {hint}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)) and e.strerror:
            # the file system refused (a directory where a file goes, no space, no permission): one line
            # naming the path; a lost connection to another process goes on to end_on_error below
            distributed.report_failure(f"error: {os_error_line(e)}")
            return 1
        if isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower()):
            first = str(e).strip().splitlines()[0][:200]
            distributed.report_failure(f"error: out of memory ({first}); lower the model, batch or sequence sizes")
            return 1
        # several processes: a lost peer, or another rank's failure, ends this one quietly
        code = distributed.end_on_error(e)
        if code is None:
            raise
        return code
