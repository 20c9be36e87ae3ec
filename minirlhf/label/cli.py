"""`python -m minirlhf label`: rank K responses per prompt in the browser, compare two
checkpoints blind, or report inter-annotator agreement.

    label --ckpt SFT_DIR --prompts FILE [--k 4] [--out labels.jsonl]
    label --responses FILE [--out labels.jsonl]            pre-sampled {"prompt", "responses"} rows
    label --compare CKPT_A CKPT_B --prompts FILE [--out compare.jsonl]
    label --agreement labels.jsonl

Every user mistake (a missing or malformed file, an option value out of its range, an
option the mode does not use, a reward model's checkpoint, a prompt over its token budget,
a port in use, an --out of another run or not a labels file) is reported as one line
`error: ...` with exit 2 before any model is loaded and before --out is created or changed.
Then the responses still needed are sampled, the server starts and prints its URL. Ctrl-C
or SIGTERM while serving stops it (exit 0); before serving (while sampling) it writes
nothing and exits 130 / 143 (128 + the signal, as a shell reports it).
"""
from __future__ import annotations

import argparse
import errno
import os
import secrets
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from ..cli import bounded
from . import sampling
from .server import LabelServer, is_loopback
from .state import K_MAX, K_MIN, Item, LabelState, check_rows
from .stats import agreement
from .store import LabelFile, ResultFile, result_path

DEFAULT_PORT = 8765
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_K = 4
SEED_MAX = 2**32 - 1  # the range of `train --seed` and `generate --seed`
# options whose default is None in argparse, so that one given explicitly can be told from
# one left out (and refused where the mode does not use it); filled in by _check_options
DEFAULTS = {"host": "127.0.0.1", "port": DEFAULT_PORT, "overlap": 0.0, "seed": 0, "temperature": 1.0,
            "batch_size": 32, "device": "auto"}
SAMPLING = ("max_new_tokens", "temperature", "batch_size", "device")  # used only where responses are sampled
SERVING = ("out", "host", "port", "overlap", "seed")                    # used only where a server runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to label (give one)")
    what.add_argument("--ckpt", metavar="DIR", help="checkpoint to sample --k responses per prompt from (with --prompts)")
    what.add_argument("--responses", metavar="FILE",
                      help=f"pre-sampled responses instead: JSONL rows {{\"prompt\", \"responses\": [{K_MIN}..{K_MAX} "
                           f"responses]}} (plain or .gz)")
    what.add_argument("--compare", nargs=2, metavar=("CKPT_A", "CKPT_B"),
                      help="blind side-by-side evaluation of two checkpoints on --prompts: win rate of A over B")
    what.add_argument("--agreement", metavar="LABELS",
                      help="report inter-annotator agreement of a labels file (pairwise, Kendall's tau) and exit")
    p.add_argument("--prompts", metavar="FILE", help="prompts JSONL, rows {\"prompt\"} (with --ckpt or --compare)")
    p.add_argument("--k", type=bounded(int, ge=K_MIN, le=K_MAX), default=None,
                   help=f"responses per prompt to rank, {K_MIN}..{K_MAX} (default 4; with --ckpt); prompts judged "
                        f"by an earlier run keep the responses they were judged on")
    p.add_argument("--out", default=None, help="labels JSONL to write (default labels.jsonl, compare.jsonl with "
                                               "--compare); rerun with the same --out to continue; a symlink is "
                                               "followed to its file (not with --agreement)")
    d = DEFAULTS
    srv = p.add_argument_group("server (not with --agreement)")
    srv.add_argument("--host", default=None,
                     help=f"address to bind; any non-loopback address requires the printed access token "
                          f"(default {d['host']})")
    srv.add_argument("--port", type=bounded(int, ge=0, le=65535), default=None,
                     help=f"port, 0 for any free one (default {d['port']})")
    srv.add_argument("--overlap", type=bounded(float, ge=0, le=1), default=None,
                     help=f"fraction of prompts given to two annotators, for --agreement (0..1, "
                          f"default {d['overlap']})")
    srv.add_argument("--seed", type=bounded(int, ge=0, le=SEED_MAX), default=None,
                     help=f"sampling seed, 0..{SEED_MAX} as train's; also picks the overlapped prompts "
                          f"(default {d['seed']})")
    smp = p.add_argument_group("sampling (with --ckpt or --compare)")
    smp.add_argument("--max-new-tokens", type=bounded(int, ge=1), default=None,
                     help=f"longest response, in tokens (default {DEFAULT_MAX_NEW_TOKENS}, or less where the "
                          f"checkpoint's model.max_seq_len leaves less room next to the longest prompt)")
    smp.add_argument("--temperature", type=bounded(float, ge=0), default=None,
                     help=f"0 = greedy (default {d['temperature']})")
    smp.add_argument("--batch-size", type=bounded(int, ge=1), default=None,
                     help=f"sequences sampled at once (default {d['batch_size']})")
    smp.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help=f"(default {d['device']})")


def read_responses(path) -> list[Item]:
    """Items from a JSONL (plain or gzip) of {"prompt": P, "responses": [R] * K}, K = 2..8, read
    by minirlhf.data's reader (the checks every data file gets; a ranking or ratings, if any,
    are ignored). Raises DataError `file:line: field: what is wrong`."""
    return [Item(p, tuple(r)) for p, r in sampling.read_responses(path, k_max=K_MAX)]


def _check_options(args) -> None:
    """The option combinations (each value's own range is its argparse type's: cli.bounded)."""
    sources = [n for n in ("ckpt", "responses", "compare", "agreement") if getattr(args, n)]
    if len(sources) != 1:
        raise ValueError("give one of --ckpt, --responses, --compare, --agreement"
                         + (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
    src = sources[0]
    if src in ("ckpt", "compare") and not args.prompts:
        raise ValueError(f"--{src} needs --prompts FILE")
    if src in ("responses", "agreement") and args.prompts:
        raise ValueError(f"--prompts goes with --ckpt or --compare, not --{src}")
    if args.k is not None and src != "ckpt":
        raise ValueError(f"--k goes with --ckpt (with --{src} the file or the comparison fixes K)")
    given = lambda names: ", ".join("--" + n.replace("_", "-") for n in names if getattr(args, n) is not None)
    if src == "agreement" and given(SERVING + SAMPLING):
        raise ValueError(f"{given(SERVING + SAMPLING)}: not used by --agreement, which reads LABELS and prints "
                         f"its agreement (no server, no sampling, nothing written)")
    if src == "responses" and given(SAMPLING):
        raise ValueError(f"{given(SAMPLING)}: sampling options, for --ckpt or --compare; the responses of "
                         f"--responses are sampled already")
    if args.out is not None:
        _check_out(args.out, "compare.jsonl" if src == "compare" else "labels.jsonl")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if src in ("ckpt", "compare"):
        sampling.check_device(args.device)


def _check_out(out: str, default: str) -> None:
    """--out must name a file: not "" (which used to fall back to the default) and not a path
    that names a directory by its spelling (a trailing separator, ".", ".."), which pathlib
    would turn into a file of that name (`q.jsonl/` -> `q.jsonl`)."""
    if not out:
        raise ValueError(f'--out "": an empty path; give a file (or leave --out out for {default})')
    seps = tuple(filter(None, (os.sep, os.altsep)))
    if out.endswith(seps) or os.path.basename(out) in (".", ".."):
        raise ValueError(f"--out {out}: names a directory (by its trailing "
                         f"{'separator' if out.endswith(seps) else os.path.basename(out)}); give a file path "
                         f"such as {os.path.join(out, default)}")


def max_new_tokens(args, prompts: list, todo: list[int], ckpts: list[str]) -> tuple[int, str | None]:
    """(the --max-new-tokens to sample with, a note when the default had to shrink), the prompts
    still to sample (`todo`, indices into prompts) checked against the token budget the stages
    check (pipeline.check_inputs): model.max_seq_len - max_new_tokens - 1 (the response, and
    the EOS the reward model reads after it), with each checkpoint's tokenizer and chat
    framing. Without --max-new-tokens: DEFAULT_MAX_NEW_TOKENS, or what the longest prompt
    leaves. Raises ValueError `file:line: prompt: N tokens, ...` naming the option to change."""
    lines: list[int] = []

    def where(i: int) -> str:
        if not lines:
            lines.extend(sampling.row_lines(args.prompts))
        return f"{args.prompts}:{lines[i]}"
    if not todo:
        return args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, None
    measured = {c: sampling.prompt_lengths(c, [prompts[i] for i in todo]) for c in dict.fromkeys(ckpts)}
    chosen, note = args.max_new_tokens, None
    if chosen is None:
        chosen = DEFAULT_MAX_NEW_TOKENS
        for c, (lengths, L) in measured.items():
            j = max(range(len(todo)), key=lengths.__getitem__, default=None)
            if j is None or L - 1 - lengths[j] >= chosen:
                continue
            if L - 1 - lengths[j] < 1:
                raise ValueError(f"{where(todo[j])}: prompt: {lengths[j]} tokens, but model.max_seq_len={L} of {c} "
                                 f"leaves no room for a response and the EOS; shorten the prompt")
            chosen = L - 1 - lengths[j]
            note = (f"--max-new-tokens {chosen}: the default {DEFAULT_MAX_NEW_TOKENS} less what the longest prompt "
                    f"({where(todo[j])}, {lengths[j]} tokens) takes of model.max_seq_len={L} of {c}")
    for c, (lengths, L) in measured.items():
        if chosen > L - 2:  # an option mistake, not a prompt's: say so instead of a negative room
            raise ValueError(f"--max-new-tokens {chosen}: exceeds model.max_seq_len={L} of {c}, which holds at most "
                             f"{L - 2} new tokens (next to the EOS and a prompt of one token)")
        room = L - chosen - 1
        for j, n in enumerate(lengths):
            if n > room:
                raise ValueError(f"{where(todo[j])}: prompt: {n} tokens, but model.max_seq_len={L} of {c} leaves "
                                 f"{room} for a prompt next to --max-new-tokens={chosen} and the EOS; shorten the "
                                 f"prompt or lower --max-new-tokens")
    return chosen, note


def _bind(host: str, port: int, token: str | None) -> LabelServer:
    try:
        return LabelServer(host, port, token=token)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: address already in use on {host} "
                             f"(another server? pick another --port, or 0 for any free one)") from None
        raise ValueError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None


def _agreement(path: str) -> int:
    sampling.read_preferences(path)  # the row shapes, with file:line errors
    rows = []
    for row in sampling.rows(path):  # the same reader: plain or gzip
        who = row.obj.get("annotator")
        if who is None:
            raise row.error("annotator", "missing; agreement needs a file `label` wrote")
        if not isinstance(who, str):
            raise row.error("annotator", f"expected a string, got {sampling.json_type(who)} {sampling.show(who)}")
        rows.append(row.obj)
    a = agreement(rows)
    skipped = a["skipped_shared"]
    if a["prompts"] == 0:
        if skipped:
            raise ValueError(f"{path}: no prompt was judged by two annotators: the {_n(skipped, 'prompt')} shown "
                             f"to two or more {'was' if skipped == 1 else 'were'} skipped by all of them or all but "
                             f"one (a skip carries no ordering)")
        raise ValueError(f"{path}: no prompt was judged by two annotators (label with --overlap F and two or more "
                         f"browser sessions)")
    print(f"{path}: {_n(a['prompts'], 'prompt')} judged by two or more annotators ({_n(a['annotators'], 'annotator')})"
          + (f"; {skipped} more shown to two or more but skipped by all but one" if skipped else ""))
    if a["pairwise_agreement"] is not None:
        print(f"  pairwise agreement {a['pairwise_agreement']:.3f} over {_n(a['pairs'], 'response pair')} both "
              f"ordered strictly ({a['tied_pairs']} tied by one or both, left out)")
    else:
        print(f"  no pairwise agreement: each of the {_n(a['tied_pairs'], 'response pair')} that two annotators "
              f"judged was tied by one or both (it counts only pairs both ordered strictly)")
    if a["kendall_tau"] is not None:
        print(f"  Kendall's tau-b {a['kendall_tau']:.3f} (mean over {a['kendall_tau_n']} prompt x annotator pairs)")
    else:
        print("  no Kendall's tau-b: on every shared prompt one annotator or both tied all the responses "
              "(tau-b is undefined for such a judgement)")
    return 0


def _n(n: int, word: str) -> str:
    """`1 prompt`, `2 prompts`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _describe_result(r: dict) -> str:
    if not r["judgements"]:
        return f"A ({r['model_a']}) vs B ({r['model_b']}): no judgements yet"
    lo, hi = r["ci95"]
    return (f"A ({r['model_a']}) vs B ({r['model_b']}): A wins {r['win_rate_a']:.1%} (95% CI {lo:.1%}-{hi:.1%}) "
            f"of {r['judgements']} judgements ({r['a_wins']} A, {r['b_wins']} B, {r['ties']} ties)")


def _kept_note(k: int, prompts: list, known: dict[int, tuple[str, ...]]) -> str | None:
    """What a rerun with another --k says: judged prompts keep the responses they were judged on."""
    other = sorted({len(r) for r in known.values() if len(r) != k})
    n = sum(len(r) != k for r in known.values())
    if not other:
        return None
    return (f"--k {k}: {n} of {len(prompts)} prompts {'was' if n == 1 else 'were'} judged by an earlier run on "
            f"{' or '.join(map(str, other))} responses and {'keeps' if n == 1 else 'keep'} them; {k} responses "
            f"for the prompts sampled now")


def main(args) -> int:
    """Run `label` with parsed arguments; 0 when the server is stopped (Ctrl-C, SIGTERM), 2 on a
    user mistake, 128 + the signal (130 Ctrl-C, 143 SIGTERM) when stopped before serving, which
    writes nothing.

    Everything that can refuse the run does so before --out is created or changed and
    before any model is loaded: the options, the data file, the checkpoints, the rows an
    earlier run left in --out, the prompts' token budget, the port."""
    stopped: list[int] = []  # SIGTERM when `kill` stopped the run (Ctrl-C arrives as KeyboardInterrupt)

    def stop(signum, frame):
        stopped.append(signum)
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)  # `kill`: stop as Ctrl-C does
    store = server = out = None
    notes: list[str] = []
    try:
        _check_options(args)
        if args.agreement:
            return _agreement(args.agreement)
        mode = "compare" if args.compare else "rank"
        models = [os.path.abspath(c) for c in args.compare] if args.compare else None
        if models and os.path.realpath(models[0]) == os.path.realpath(models[1]):
            raise ValueError(f"--compare {args.compare[0]} {args.compare[1]}: both are the checkpoint "
                             f"{os.path.realpath(models[0])}; compare two different ones")
        given = stages = save_ids = source = None
        if args.responses:
            given = read_responses(args.responses)
            prompts = [it.prompt for it in given]
        else:
            prompts = sampling.read_prompts(args.prompts)
            stages = {ckpt: sampling.check_checkpoint(ckpt) for ckpt in models or [args.ckpt]}
            save_ids = [sampling.save_id(ckpt) for ckpt in models or [args.ckpt]]
        out = Path(args.out or ("compare.jsonl" if args.compare else "labels.jsonl"))
        store = LabelFile(out)  # reads what an earlier run wrote; writes nothing yet
        if args.ckpt:
            source = {"model": os.path.realpath(args.ckpt), "stage": stages[args.ckpt], "model_save_id": save_ids[0]}
        known = check_rows(store, prompts, mode=mode, models=models, source=source,
                           save_ids=save_ids if models else None,
                           responses=[it.responses for it in given] if given else None)
        result = ResultFile(result_path(out), models) if models else None  # checked; nothing written
        todo = [i for i in range(len(prompts)) if i not in known]
        max_new = None
        if stages:
            max_new, note = max_new_tokens(args, prompts, todo, list(stages))
            notes += [note] if note else []
        if args.ckpt:
            notes += filter(None, [_kept_note(args.k or DEFAULT_K, prompts, known)])
        token = None if is_loopback(args.host) else secrets.token_urlsafe(16)
        server = _bind(args.host, args.port, token)
        store.start()  # the first write to --out: every check has passed
    except (ValueError, KeyboardInterrupt) as e:  # DataError too
        if server is not None:
            server.server_close()
        if store is not None:
            store.close()
        if isinstance(e, KeyboardInterrupt):
            return _interrupted(stopped, "stopped" if args.agreement else "stopped before sampling", out, store)
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        for note in store.notes + notes:
            print(f"[label] {note}", flush=True)
        items = given or _sample(args, prompts, known, todo, models, max_new)
        def write_result(state):  # --compare: the win rate so far, after every change
            failing = result.error is not None
            if result.write(state.result()) and not failing:  # once, not after every judgement
                print(f"[label] could not write the result {result.error}; the judgements are in {out} "
                      f"(the result is derived from them: it is written again after the next change and "
                      f"at stop)", file=sys.stderr, flush=True)
        state = LabelState(items, store, mode=mode, overlap=args.overlap, seed=args.seed, models=models,
                           save_ids=save_ids if models else None, source=source,
                           on_change=write_result if mode == "compare" else None)
        server.state = state
        p = state.progress()
        stage = {c: f"{c} (stage {s})" for c, s in (stages or {}).items()}
        what = (f"{_n(len(items), 'prompt')}, A = {stage[models[0]]}, B = {stage[models[1]]}" if models
                else f"{_shape(items)} from {stage[args.ckpt]}" if not given
                else f"{_shape(items)} from {args.responses}")
        print(f"[label] {mode}: {what}; {p['done']} of {_n(p['total'], 'judgement')} already in {out}", flush=True)
        print(f"[label] open {server.url} in a browser (Ctrl-C stops; each judgement is on disk "
              f"before the next prompt shows)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if server.state is not None:
            with server.state.lock:  # let a judgement being written finish first
                store.close()
        else:
            store.close()
    if server.state is None:  # stopped before serving: nothing was judged
        return _interrupted(stopped, "sampling was stopped", out, store)
    s = server.state.summary()
    print(f"\n[label] stopped: {s['done']} of {_n(s['total'], 'judgement')} in {out} "
          f"({_n(s['sessions'], 'session')})")
    if mode == "compare":
        if not result.current and server.state.row_of:  # stale, or never written by this run
            result.write(s["result"])
        where = (f"written to {result.path}" if result.current
                 else f"could not write {result.error}" if result.error
                 else "nothing judged, no result file written")
        print(f"[label] {_describe_result(s['result'])}; {where}")
    return 0


def _interrupted(stopped: list[int], what: str, out: Path | None, store: LabelFile | None) -> int:
    """One line for a run stopped before its server served (--out is as it was: a file this
    run created is removed again); exit 128 + the signal, as a shell reports it."""
    signum = stopped[-1] if stopped else signal.SIGINT
    if out is None:
        written = "nothing was written"
    elif store is not None and store.repaired:
        written = f"no judgement was written to {out} (only its unfinished last line was repaired)"
    else:
        written = f"nothing was written to {out}"
    print(f"\ninterrupted ({'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}): {what}; {written}",
          file=sys.stderr, flush=True)
    return 128 + signum


def _shape(items: list[Item]) -> str:
    """`5 prompts x 3 responses`, or where an earlier run's prompts keep another K,
    `5 prompts: 3 with 3 responses, 2 with 4`."""
    ks = Counter(len(it.responses) for it in items)
    if len(ks) == 1:
        return f"{_n(len(items), 'prompt')} x {next(iter(ks))} responses"
    return f"{_n(len(items), 'prompt')}: " + ", ".join(f"{n} with {k}" + (" responses" if i == 0 else "")
                                                      for i, (k, n) in enumerate(sorted(ks.items())))


def _sample(args, prompts: list, known: dict[int, tuple[str, ...]], todo: list[int], models: list[str] | None,
            max_new: int) -> list[Item]:
    """Responses for the prompts no earlier run judged (`todo`; the others keep the responses they
    were judged on)."""
    kw = dict(max_new_tokens=max_new, temperature=args.temperature, batch_size=args.batch_size,
              seed=args.seed, device=args.device)
    fresh: dict[int, tuple[str, ...]] = {}
    if todo and models:
        a = sampling.sample(models[0], [prompts[i] for i in todo], n=1, **kw)
        b = sampling.sample(models[1], [prompts[i] for i in todo], n=1, **kw)
        fresh = {i: (ra[0], rb[0]) for i, ra, rb in zip(todo, a, b)}
    elif todo:
        got = sampling.sample(args.ckpt, [prompts[i] for i in todo], n=args.k or DEFAULT_K, **kw)
        fresh = {i: tuple(r) for i, r in zip(todo, got)}
    return [Item(p, known.get(i) or fresh[i]) for i, p in enumerate(prompts)]
