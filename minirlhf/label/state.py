"""Who labels what: prompts handed to browser sessions, judgements validated and turned into
preference rows, undo, progress. No HTTP here; server.py calls these under one lock.

An *item* is one prompt (a string, or a conversation: a list of {"role", "content"}
messages ending with a user turn, as minirlhf.data reads them) with its responses (K for
ranking; [A's, B's] for --compare). Each item needs one judgement, two if it is among the
overlapped fraction (--overlap F: the same round(F * N) items for a given --seed). A
*session* (one browser) holds at most one item at a time; it is offered the first item it
has not judged that is not full, counting the judgements written and the other sessions'
holds. A skip fills the slot like a judgement (the prompt was seen and declined) and is
written as a row that carries no preference.

The page sees responses in a per-(session, item) random order, so position bias does not
become preference; a judgement names display positions and is mapped back here. Rows:

    rank     {"prompt", "responses", "ranking": best first}             no ties
             {"prompt", "responses", "ratings": [7, 6, 6, 5 ...]}       ties (equal ratings)
    compare  {"prompt", "responses": [A's, B's], "ratings": [7, 6] | [6, 7] | [7, 7],
              "winner": "A" | "B" | "tie", "models": [A, B]}
    rank rows sampled from --ckpt also carry "model" (its resolved path), "stage" and
    "model_save_id" (checkpoint.save_id: a new one each time the directory is saved);
    compare rows carry "model_save_ids" beside "models"
    skipped  {"prompt", "responses", "ratings": [4] * K, "skipped": true}
    all with "item", "annotator", "shown" (response indices in display order),
    "seconds" (from showing to judging) and "time" (UTC).

`read_preferences` reads every row shape above: ties and skips drop out as pairs.

A request is valid or it changes nothing: a session id is registered only by a `next`
that is answered, and judge, skip and undo need a session the server knows. Once a
--compare is complete its result is shown, and its judgements are final: no undo (also
after a restart), so nobody judges knowing the score.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .sampling import DataError, show
from .stats import win_rate

K_MIN, K_MAX = 2, 8  # 8: any tie pattern then fits the 7 rating levels of the ratings row
RATING_BEST, RATING_SKIP = 7, 4
SESSION_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
HOLD_SECONDS = 3600.0  # a hold older than this (a tab left open) may go to another session
FIRST_HOLD_SECONDS = 600.0  # the same for a session that has judged nothing yet (a request, not a person?)


class BadRequest(ValueError):
    """A request the server answers with 400 and that changes nothing."""


@dataclass(frozen=True)
class Item:
    prompt: str | list[dict]   # a string, or messages [{"role", "content"}] ending with a user turn
    responses: tuple[str, ...]


@dataclass
class _Hold:
    item: int
    order: list[int]   # display position -> response index
    since: float       # clock() when first shown


@dataclass
class _Session:
    rows: list[int] = field(default_factory=list)   # row ids in the order written (undo pops)
    hold: _Hold | None = None


def ratings_from(ranking: list[int], ties: list[bool]) -> list[int]:
    """Ratings 7, 6, ... by tie group, best first: ties[i] means ranking[i] and ranking[i+1]
    are equally good. With K <= 8 there are at most 7 groups once one tie is marked."""
    out = [0] * len(ranking)
    level = RATING_BEST
    for pos, idx in enumerate(ranking):
        if pos and not ties[pos - 1]:
            level -= 1
        out[idx] = level
    return out


def overlapped(n_items: int, fraction: float, seed: int) -> set[int]:
    """The round(fraction * n) items that go to two annotators: a seeded sample, the same on restart."""
    return set(random.Random(f"overlap/{seed}").sample(range(n_items), round(fraction * n_items)))


def same_checkpoints(a: list[str], b: list[str]) -> bool:
    """Whether two lists of checkpoint paths name the same directories, however each is spelt
    (relative or absolute, through symlinks; a relative path is taken from the current directory)."""
    return [os.path.realpath(p) for p in a] == [os.path.realpath(p) for p in b]


def check_rows(store, prompts: list, *, mode: str, models: list[str] | None = None,
               responses: list[tuple[str, ...]] | None = None, source: dict | None = None,
               save_ids: list[str | None] | None = None) -> dict[int, tuple[str, ...]]:
    """Check the rows an earlier run left in the labels file against this run's prompts (and
    responses, when given; the checkpoint they were sampled from, `source` = {"model": path,
    "stage": stage, "model_save_id": id} of --ckpt; --compare's checkpoints' `save_ids`): the
    responses each judged item was shown, by item index. Raises DataError (file:line: field:
    what) for a row that belongs to another labelling run: one of another checkpoint, of the
    same directory saved again since (another save id), or of --responses, continued with
    --ckpt or --compare would mix two policies' responses in one file. Rows without a save
    id (written before ids existed) are not checked for one."""
    known: dict[int, tuple[str, ...]] = {}
    seen = set()
    for row_id, row in store.rows:
        where = f"{store.path}:{store.line_of[row_id]}"

        def bad(fld, what):
            return DataError(f"{where}: {fld}: {what}; this --out belongs to another labelling run, use a new one")
        item = row.get("item")
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < len(prompts):
            raise bad("item", f"expected a prompt index 0..{len(prompts) - 1}, got {show(item)}")
        if row.get("prompt") != prompts[item]:
            raise bad("prompt", f"differs from prompt {item} of this run")
        resp = row.get("responses")
        if not isinstance(resp, list) or not all(isinstance(r, str) for r in resp) \
                or not K_MIN <= len(resp) <= K_MAX:
            raise bad("responses", f"expected {K_MIN} to {K_MAX} strings")
        resp = tuple(resp)
        if item in known and known[item] != resp or responses is not None and responses[item] != resp:
            raise bad("responses", f"differ from the responses of prompt {item}")
        annotator = row.get("annotator")
        if not isinstance(annotator, str) or not SESSION_RE.fullmatch(annotator):
            raise bad("annotator", f"expected a session id, got {show(annotator)}")
        if (item, annotator) in seen:
            raise bad("annotator", f"judged prompt {item} twice")
        shown = row.get("shown")
        if not isinstance(shown, list) or sorted(shown) != list(range(len(resp))):
            raise bad("shown", "expected a permutation of the response indices")
        is_compare = "winner" in row or "models" in row
        if mode == "compare":
            given = row.get("models")
            if not (isinstance(given, list) and len(given) == 2 and all(isinstance(m, str) for m in given)):
                raise bad("models", f"expected [CKPT_A, CKPT_B], got {show(given)}")
            if not same_checkpoints(given, models):
                raise bad("models", changed_models(given, models))
            if "model_save_ids" in row and save_ids is not None:
                _check_save_ids(row["model_save_ids"], models, save_ids, bad)
            if not row.get("skipped") and row.get("winner") not in ("A", "B", "tie"):
                raise bad("winner", "expected A, B or tie")
        elif is_compare:
            raise bad("winner", "a --compare row in a ranking file")
        elif source is not None:
            _check_source(row, source, bad)
        seen.add((item, annotator))
        known[item] = resp
    return known


def _check_source(row: dict, source: dict, bad) -> None:
    """A ranking row continued with --ckpt: sampled from the same checkpoint, at the same stage."""
    q = json.dumps
    model, stage = row.get("model"), row.get("stage")
    if model is None:
        raise bad("model", f"missing: the rows are of --responses or of an older `label`, this run samples from "
                           f"{q(source['model'])[1:-1]}; continuing would mix responses of two sources")
    if not isinstance(model, str) or not same_checkpoints([model], [source["model"]]):
        was = q(model)[1:-1] if isinstance(model, str) else show(model)
        raise bad("model", f"the responses were sampled from {was}, this run samples from {q(source['model'])[1:-1]}; continuing would mix two policies' "
                           f"responses (give that --ckpt)")
    if stage != source["stage"]:
        raise bad("stage", f"{q(source['model'])[1:-1]} was stage {show(stage)} when the responses were sampled, "
                           f"it is stage {q(source['stage'])} now; continuing would mix two policies' responses")
    if "model_save_id" in row and "model_save_id" in source and row["model_save_id"] != source["model_save_id"]:
        raise bad("model_save_id", _resaved(source["model"], row["model_save_id"], source["model_save_id"]))


def _resaved(path: str, was, now) -> str:
    return (f"{json.dumps(path)[1:-1]} was saved again since the responses were sampled (save id {show(was)} "
            f"then, {show(now)} now): it holds other weights; continuing would mix two policies' responses")


def _check_save_ids(given, models: list[str], save_ids: list[str | None], bad) -> None:
    """--compare rows: each checkpoint still the save the responses were sampled from."""
    if not (isinstance(given, list) and len(given) == 2 and all(g is None or isinstance(g, str) for g in given)):
        raise bad("model_save_ids", f"expected [save id of A, save id of B], got {show(given)}")
    for ab, was, now, path in zip("AB", given, save_ids, models):
        if was != now:
            raise bad("model_save_ids", f"{ab}: {_resaved(path, was, now)}")


def changed_models(given: list[str], models: list[str]) -> str:
    """What differs between the checkpoints an earlier run compared and this run's, in full
    (paths as JSON strings: a path from the file may hold any character)."""
    q = json.dumps
    if same_checkpoints(given, models[::-1]):
        return (f"A and B are swapped: this --out compares A = {q(given[0])[1:-1]} and B = {q(given[1])[1:-1]} "
                f"(give them in that order)")
    return ", ".join(f"{ab} was {q(g)[1:-1]}, this run has {ab} = {q(m)[1:-1]}"
                     for ab, g, m in zip("AB", given, models) if not same_checkpoints([g], [m]))


class LabelState:
    """Items, sessions and the labels file; every public method takes the lock. Methods
    return the session's view: {"session", "mode", "item", "progress", "can_undo"}; when
    item is None also "held_by_others" (prompts other sessions hold) and "first_free_in"
    (seconds until the first of those holds may expire, or None), and with --compare, once
    every judgement is in, "result" (the win rate; never earlier, so the comparison stays blind;
    from then on can_undo is false and undo is refused: the judgements are final)."""

    def __init__(self, items: list[Item], store, *, mode: str = "rank", overlap: float = 0.0, seed: int = 0,
                 models: list[str] | None = None, save_ids: list[str | None] | None = None,
                 source: dict | None = None,
                 hold_seconds: float = HOLD_SECONDS, first_hold_seconds: float = FIRST_HOLD_SECONDS,
                 clock=time.monotonic, on_change=None):
        self.items, self.store, self.mode, self.models = items, store, mode, models
        self.source = source  # ranking from --ckpt: {"model": resolved path, "stage", "model_save_id"}, in each row
        self.save_ids = save_ids  # --compare: the two checkpoints' save ids, in each row (None: not recorded)
        self.on_change = on_change  # called with self, under the lock, after each row written or removed
        self.seed, self.hold_seconds, self.clock = seed, hold_seconds, clock
        self.first_hold_seconds = min(first_hold_seconds, hold_seconds)
        self.lock = threading.Lock()
        self.needs = [1] * len(items)
        for i in overlapped(len(items), overlap, seed):
            self.needs[i] = 2
        self.judged_by: list[dict[str, int]] = [{} for _ in items]   # item -> {session: row id}
        self.holders: list[set[str]] = [set() for _ in items]
        self.sessions: dict[str, _Session] = {}
        self.row_of: dict[int, dict] = {}
        for row_id, row in store.rows:  # checked by check_rows
            self._record(row_id, row)

    # ---- bookkeeping ----

    def _record(self, row_id: int, row: dict) -> None:
        s = row["annotator"]
        self.sessions.setdefault(s, _Session()).rows.append(row_id)
        self.judged_by[row["item"]][s] = row_id
        self.row_of[row_id] = row

    def _session(self, body: dict, create: bool = False) -> str:
        """The request's session id, checked; with create, a new one when the body has none.
        Nothing is registered here: `next` registers it once the request is known good, and the
        other calls need a session the server knows (from `next`, or a row of the file)."""
        sid = body.get("session")
        if sid is None and create:
            sid = secrets.token_urlsafe(12)
        if not isinstance(sid, str) or not SESSION_RE.fullmatch(sid):
            raise BadRequest("session: expected a session id (8-64 letters, digits, - or _)")
        if not create and sid not in self.sessions:
            raise BadRequest("session: not known to this server (reload the page)")
        return sid

    def _release(self, sid: str) -> None:
        hold = self.sessions[sid].hold
        if hold is not None:
            self.holders[hold.item].discard(sid)
            self.sessions[sid].hold = None

    def _hold(self, sid: str, item: int, order: list[int] | None = None) -> None:
        if order is None:
            order = list(range(len(self.items[item].responses)))
            random.Random(f"order/{self.seed}/{sid}/{item}").shuffle(order)
        self.sessions[sid].hold = _Hold(item, order, self.clock())
        self.holders[item].add(sid)

    def _left(self, sid: str) -> float:
        """Seconds until the session's hold may go to another session (<= 0: it may now). A
        session that has judged nothing holds for first_hold_seconds only: a request without a
        session id (a script, a page opened and forgotten) cannot keep a prompt for an hour."""
        s = self.sessions[sid]
        limit = self.hold_seconds if s.rows else self.first_hold_seconds
        return s.hold.since + limit - self.clock() if s.hold is not None else 0.0

    def _active(self, sid: str) -> bool:
        return self._left(sid) > 0

    def _offer(self, sid: str) -> None:
        """Give `sid` an item unless it holds one: the first it has not judged that has room."""
        if self.sessions[sid].hold is not None:
            return
        for i, judged in enumerate(self.judged_by):
            if sid in judged or len(judged) >= self.needs[i]:
                continue
            active = [h for h in self.holders[i] if self._active(h)]
            if len(judged) + len(active) < self.needs[i]:
                for stale in self.holders[i] - set(active):
                    self._release(stale)
                self._hold(sid, i)
                return

    def _final(self) -> bool:
        """--compare with every judgement in: the result is shown to every session from now on, so
        the judgements are final (re-judging knowing the score would bias it). Nothing can make
        it untrue again: only an undo lowers the count, and undo is refused from here on."""
        if self.mode != "compare":
            return False
        p = self.progress()
        return p["done"] >= p["total"]

    def _refuse_if_final(self) -> None:
        if self._final():
            raise BadRequest("the comparison is complete and its result shown: the judgements are final "
                             "(nobody judges knowing the score)")

    def _held(self, sid: str, body: dict) -> _Hold:
        self._refuse_if_final()
        hold = self.sessions[sid].hold
        item = body.get("item")
        if hold is None or type(item) is not int or item != hold.item:  # 1.0 and true are no index
            raise BadRequest(f"item: {show(item)} is not the prompt this session holds (reload the page)")
        return hold

    def _append(self, sid: str, row: dict) -> None:
        """Write the row (fsync), then update memory: a failed write changes nothing."""
        row_id = self.store.append(row)
        self._record(row_id, row)
        self._release(sid)
        if self.on_change:
            self.on_change(self)

    def _row(self, sid: str, hold: _Hold) -> dict:
        it = self.items[hold.item]
        row = {"prompt": it.prompt, "responses": list(it.responses)}
        if self.mode == "compare":
            row["models"] = list(self.models)
            if self.save_ids is not None:
                row["model_save_ids"] = list(self.save_ids)
        elif self.source is not None:
            row.update(self.source)
        row.update(item=hold.item, annotator=sid, shown=hold.order,
                   seconds=round(self.clock() - hold.since, 2),
                   time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return row

    # ---- what the page calls ----

    def next(self, body: dict) -> dict:
        """The session's current item (a new session when body has no "session")."""
        with self.lock:
            sid = self._session(body, create=True)
            _check_keys(body, {"session"})
            new = sid not in self.sessions
            self.sessions.setdefault(sid, _Session())  # new, or a session from before a restart
            self._offer(sid)
            view = self._view(sid)
            if new and self.sessions[sid].hold is None:  # nothing to hold, nothing judged: keep no state
                del self.sessions[sid]
            return view

    def judge(self, body: dict) -> dict:
        """body: {"session", "item", "ranking": display positions best first, "ties": [bool] * (K-1)}
        (--compare: K = 2, ranking [0, 1] = left better). Writes the row, then offers the next item."""
        with self.lock:
            sid = self._session(body)
            _check_keys(body, {"session", "item", "ranking", "ties"})
            hold = self._held(sid, body)
            k = len(hold.order)
            ranking = body.get("ranking")
            if not isinstance(ranking, list) or not all(type(p) is int for p in ranking) \
                    or sorted(ranking) != list(range(k)):
                raise BadRequest(f"ranking: expected a permutation of the {k} display positions 0..{k - 1}")
            ties = body.get("ties", [False] * (k - 1))
            if not isinstance(ties, list) or len(ties) != k - 1 or not all(type(t) is bool for t in ties):
                raise BadRequest(f"ties: expected {k - 1} booleans")
            ranked = [hold.order[p] for p in ranking]  # display positions -> response indices
            row = self._row(sid, hold)
            if self.mode == "compare":
                row["ratings"] = ratings_from(ranked, ties)
                row["winner"] = "tie" if ties[0] else "AB"[ranked[0]]
            elif any(ties):
                row["ratings"] = ratings_from(ranked, ties)
            else:
                row["ranking"] = ranked
            # key order of the file: the preference fields first
            self._append(sid, {k: row[k] for k in ("prompt", "responses", "ranking", "ratings", "winner")
                               if k in row} | row)
            self._offer(sid)
            return self._view(sid)

    def skip(self, body: dict) -> dict:
        """body: {"session", "item"}: a row with no preference; the session moves on."""
        with self.lock:
            sid = self._session(body)
            _check_keys(body, {"session", "item"})
            hold = self._held(sid, body)
            row = self._row(sid, hold)
            self._append(sid, {"prompt": row["prompt"], "responses": row["responses"],
                               "ratings": [RATING_SKIP] * len(hold.order), "skipped": True} | row)
            self._offer(sid)
            return self._view(sid)

    def undo(self, body: dict) -> dict:
        """body: {"session"}: remove the session's last row from the file (judgement or skip)
        and show that item again, in the same order."""
        with self.lock:
            sid = self._session(body)
            _check_keys(body, {"session"})
            self._refuse_if_final()
            rows = self.sessions[sid].rows
            if not rows:
                raise BadRequest("nothing to undo for this session")
            row_id = rows[-1]
            row = self.row_of[row_id]
            self.store.remove(row_id)
            rows.pop()
            del self.row_of[row_id], self.judged_by[row["item"]][sid]
            self._release(sid)
            self._hold(sid, row["item"], order=list(row["shown"]))
            if self.on_change:
                self.on_change(self)
            return self._view(sid)

    # ---- views ----

    def progress(self, sid: str | None = None) -> dict:
        done = sum(min(len(j), n) for j, n in zip(self.judged_by, self.needs))
        out = {"done": done, "total": sum(self.needs), "prompts": len(self.items)}
        if sid is not None:
            mine = [self.row_of[r] for r in self.sessions[sid].rows]
            secs = [r["seconds"] for r in mine if not r.get("skipped") and isinstance(r.get("seconds"), (int, float))]
            out.update(judged=len(secs), skipped=sum(bool(r.get("skipped")) for r in mine),
                       mean_seconds=round(sum(secs) / len(secs), 1) if secs else None,
                       last_seconds=secs[-1] if secs else None)
        return out

    def result(self) -> dict:
        """--compare: the win rate of A over B so far (see stats.win_rate)."""
        return {"model_a": self.models[0], "model_b": self.models[1], **win_rate(list(self.row_of.values()))}

    def _view(self, sid: str) -> dict:
        hold = self.sessions[sid].hold
        item = None
        if hold is not None:
            it = self.items[hold.item]
            item = {"id": hold.item, "prompt": it.prompt, "responses": [it.responses[j] for j in hold.order]}
        progress = self.progress(sid)
        final = self._final()
        view = {"session": sid, "mode": self.mode, "item": item, "progress": progress,
                "can_undo": bool(self.sessions[sid].rows) and not final}
        if item is None:  # nothing for this session now: what the others hold, and for how long
            held = [self._left(h) for h in self.sessions if h != sid and self._active(h)]
            view["held_by_others"] = len(held)
            view["first_free_in"] = round(min(held)) if held else None  # seconds
            if final:
                # blind until the whole comparison is done: nothing left, nothing held by anyone
                # (a session that has nothing to do yet, or a new one, learns nothing earlier)
                view["result"] = self.result()
        return view

    def summary(self) -> dict:
        with self.lock:
            out = {"mode": self.mode, **self.progress(), "sessions": len(self.sessions)}
            if self.mode == "compare":
                out["result"] = self.result()
            return out


def _check_keys(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadRequest(f"{show(extra[0])}: unexpected field")
