"""`python -m minirlhf label`: rank K responses per prompt in the browser, compare two
checkpoints blind, or report inter-annotator agreement.

    label --ckpt SFT_DIR --prompts FILE [--k 4] [--out labels.jsonl]
    label --responses FILE [--out labels.jsonl]            pre-sampled {"prompt", "responses"} rows
    label --compare CKPT_A CKPT_B --prompts FILE [--out compare.jsonl]
    label --agreement labels.jsonl

Every user mistake (a missing or malformed file, bad option values, a port in use, an --out
of another run) is reported as one line `error: ...` with exit 2 before any model is
loaded. Then the responses still needed are sampled, the server starts and prints its URL.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from . import sampling
from .server import LabelServer, is_loopback
from .state import K_MAX, K_MIN, Item, LabelState, check_rows
from .stats import agreement
from .store import LabelFile

DEFAULT_PORT = 8765


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to label (give one)")
    what.add_argument("--ckpt", metavar="DIR", help="checkpoint to sample --k responses per prompt from (with --prompts)")
    what.add_argument("--responses", metavar="FILE",
                      help=f"pre-sampled responses instead: JSONL rows {{\"prompt\", \"responses\": [{K_MIN}..{K_MAX} strings]}}")
    what.add_argument("--compare", nargs=2, metavar=("CKPT_A", "CKPT_B"),
                      help="blind side-by-side evaluation of two checkpoints on --prompts: win rate of A over B")
    what.add_argument("--agreement", metavar="LABELS",
                      help="report inter-annotator agreement of a labels file (pairwise, Kendall's tau) and exit")
    p.add_argument("--prompts", metavar="FILE", help="prompts JSONL, rows {\"prompt\"} (with --ckpt or --compare)")
    p.add_argument("--k", type=int, default=None, help=f"responses per prompt to rank, {K_MIN}..{K_MAX} (default 4; with --ckpt)")
    p.add_argument("--out", default=None, help="labels JSONL to write (default labels.jsonl, compare.jsonl with "
                                               "--compare); rerun with the same --out to continue")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind; any non-loopback address requires the printed access token (default %(default)s)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT, help="port, 0 for any free one (default %(default)s)")
    srv.add_argument("--overlap", type=float, default=0.0,
                     help="fraction of prompts given to two annotators, for --agreement (0..1, default %(default)s)")
    srv.add_argument("--seed", type=int, default=0, help="sampling seed; also picks the overlapped prompts (default %(default)s)")
    smp = p.add_argument_group("sampling")
    smp.add_argument("--max-new-tokens", type=int, default=48, help="(default %(default)s)")
    smp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default %(default)s)")
    smp.add_argument("--batch-size", type=int, default=32, help="sequences sampled at once (default %(default)s)")
    smp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def read_responses(path) -> list[Item]:
    """Items from a JSONL of {"prompt": str, "responses": [str] * K} (K = 2..8; other fields,
    such as a ranking, are ignored). Raises DataError `file:line: field: what is wrong`."""
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise sampling.DataError(f"{path}:0: file: cannot read ({getattr(e, 'strerror', None) or e})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise sampling.DataError(f"{path}:{n}: json: not valid JSON ({e.msg} at column {e.colno})") from None
        prompt, resp = (row.get("prompt"), row.get("responses")) if isinstance(row, dict) else (None, None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise sampling.DataError(f"{path}:{n}: prompt: expected a non-empty string")
        if not isinstance(resp, list) or not K_MIN <= len(resp) <= K_MAX or not all(isinstance(r, str) for r in resp):
            raise sampling.DataError(f"{path}:{n}: responses: expected an array of {K_MIN} to {K_MAX} strings")
        items.append(Item(prompt, tuple(resp)))
    if not items:
        raise sampling.DataError(f"{path}:0: file: empty, expected one JSON object per line")
    return items


def _check_options(args) -> None:
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
    if args.k is not None and not K_MIN <= args.k <= K_MAX:
        raise ValueError(f"--k {args.k}: expected {K_MIN}..{K_MAX}")
    if not 0.0 <= args.overlap <= 1.0:
        raise ValueError(f"--overlap {args.overlap}: expected a fraction in 0..1")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0..65535")
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.temperature < 0:
        raise ValueError("--max-new-tokens and --batch-size must be >= 1, --temperature >= 0")
    if src in ("ckpt", "compare"):
        sampling.check_device(args.device)


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
    for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").split("\n"), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("annotator"), str):
                raise sampling.DataError(f"{path}:{n}: annotator: missing; agreement needs a file `label` wrote")
            rows.append(row)
    a = agreement(rows)
    if a["prompts"] == 0:
        raise ValueError(f"{path}: no prompt was judged by two annotators (label with --overlap F and two or more "
                         f"browser sessions)")
    print(f"{path}: {a['prompts']} prompts judged by two or more annotators ({a['annotators']} annotators)")
    if a["pairwise_agreement"] is not None:
        print(f"  pairwise agreement {a['pairwise_agreement']:.3f} over {a['pairs']} response pairs both ordered "
              f"strictly ({a['tied_pairs']} pairs tied by one or both, left out)")
    if a["kendall_tau"] is not None:
        print(f"  Kendall's tau-b {a['kendall_tau']:.3f} (mean over {a['kendall_tau_n']} prompt x annotator pairs)")
    return 0


def result_path(out: Path) -> Path:
    """Where --compare writes its result: compare.jsonl -> compare.result.json."""
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".result.json")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_result(r: dict) -> str:
    if not r["judgements"]:
        return f"A ({r['model_a']}) vs B ({r['model_b']}): no judgements yet"
    lo, hi = r["ci95"]
    return (f"A ({r['model_a']}) vs B ({r['model_b']}): A wins {r['win_rate_a']:.1%} (95% CI {lo:.1%}-{hi:.1%}) "
            f"of {r['judgements']} judgements ({r['a_wins']} A, {r['b_wins']} B, {r['ties']} ties)")


def main(args) -> int:
    """Run `label` with parsed arguments; 0 when stopped (Ctrl-C), 2 on a user mistake."""
    store = server = None
    try:
        _check_options(args)
        if args.agreement:
            return _agreement(args.agreement)
        mode = "compare" if args.compare else "rank"
        models = [os.path.normpath(c) for c in args.compare] if args.compare else None
        given = None
        if args.responses:
            given = read_responses(args.responses)
            prompts = [it.prompt for it in given]
        else:
            prompts = sampling.read_prompts(args.prompts)
            for ckpt in models or [args.ckpt]:
                sampling.check_checkpoint(ckpt)
        out = Path(args.out or ("compare.jsonl" if args.compare else "labels.jsonl"))
        store = LabelFile(out)
        known = check_rows(store, prompts, mode=mode, models=models,
                           responses=[it.responses for it in given] if given else None)
        token = None if is_loopback(args.host) else secrets.token_urlsafe(16)
        server = _bind(args.host, args.port, token)
    except ValueError as e:  # DataError too
        print(f"error: {e}", file=sys.stderr)
        if store is not None:
            store.close()
        return 2

    def stop(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)  # `kill`: stop as Ctrl-C does
    try:
        for note in store.notes:
            print(f"[label] {note}")
        items = given or _sample(args, prompts, known, models)
        def write_result(state):  # --compare: the win rate so far, after every change
            _write_json(result_path(out), state.result())
        state = LabelState(items, store, mode=mode, overlap=args.overlap, seed=args.seed, models=models,
                           on_change=write_result if mode == "compare" else None)
        server.state = state
        p = state.progress()
        what = (f"{len(items)} prompts, A = {models[0]}, B = {models[1]}" if models
                else f"{len(items)} prompts x {len(items[0].responses)} responses" if not given
                else f"{len(items)} prompts from {args.responses}")
        print(f"[label] {mode}: {what}; {p['done']} of {p['total']} judgements already in {out}", flush=True)
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
    if server.state is not None:
        s = server.state.summary()
        print(f"\n[label] stopped: {s['done']} of {s['total']} judgements in {out} ({s['sessions']} sessions)")
        if mode == "compare":
            print(f"[label] {_describe_result(s['result'])}; written to {result_path(out)}")
    return 0


def _sample(args, prompts: list[str], known: dict[int, tuple[str, ...]], models: list[str] | None) -> list[Item]:
    """Responses for the prompts no earlier run judged (those keep the responses they were judged on)."""
    todo = [i for i in range(len(prompts)) if i not in known]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=args.batch_size,
              seed=args.seed, device=args.device)
    fresh: dict[int, tuple[str, ...]] = {}
    if todo and models:
        a = sampling.sample(models[0], [prompts[i] for i in todo], n=1, **kw)
        b = sampling.sample(models[1], [prompts[i] for i in todo], n=1, **kw)
        fresh = {i: (ra[0], rb[0]) for i, ra, rb in zip(todo, a, b)}
    elif todo:
        got = sampling.sample(args.ckpt, [prompts[i] for i in todo], n=args.k or 4, **kw)
        fresh = {i: tuple(r) for i, r in zip(todo, got)}
    return [Item(p, known.get(i) or fresh[i]) for i, p in enumerate(prompts)]
