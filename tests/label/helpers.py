"""Helpers of the label tests: a server on a free port in a thread, a small JSON client."""
from __future__ import annotations

import http.client
import json
import threading
from contextlib import contextmanager
from pathlib import Path

from minirlhf.label.server import LabelServer
from minirlhf.label.state import Item, LabelState, check_rows
from minirlhf.label.store import LabelFile

# untrusted text a model could emit: must be shown verbatim and never run
NASTY = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">',
         '</textarea><b id="bold">not bold</b> & "quotes"']

ITEMS = [
    Item("What does the fox eat?", ("berries", "The fox eats berries.", "The fox eats fish.")),
    Item("Where is Lima?", ("Lima is in Peru.", "Peru", "Lima is in Chile.", "I like trains.")),
    Item("Name two facts about the owl.", ("The owl hunts at night.", "Owls hoot.", "The owl eats mice.")),
    Item("What colour is the sky?", tuple(NASTY)),
    Item("Say hello.", ("hello", "hi", "good morning")),
]


class Client:
    """A JSON client for one browser session; `session` is filled in by the first answer."""

    def __init__(self, server: LabelServer, session: str | None = None, headers: dict | None = None):
        self.port, self.session, self.headers = server.port, session, headers or {}

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict | None = None, **kw):
        body = dict(body or {})
        if self.session is not None and "session" not in body:
            body["session"] = self.session
        status, headers, data = self.raw("POST", path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json", **kw.pop("headers", {})})
        out = json.loads(data)
        if status == 200:
            self.session = out["session"]
        return status, out

    def next(self):
        status, view = self.post("/api/next")
        assert status == 200, view
        return view

    def judge_by_text(self, view: dict, best_first: list[str], ties: list[bool] | None = None):
        """Rank the shown responses by their texts (the display order is random)."""
        shown = view["item"]["responses"]
        ranking = [shown.index(t) for t in best_first]
        return self.post("/api/judge", {"item": view["item"]["id"], "ranking": ranking,
                                        "ties": ties or [False] * (len(shown) - 1)})


@contextmanager
def running(out: Path, items=ITEMS, *, mode="rank", overlap=0.0, seed=0, models=None, token=None, port=0,
            **state_kw):
    """A label server over `items` writing `out` on `port` (0: any free one), serving in a thread
    until the block ends."""
    store = LabelFile(out)
    try:
        check_rows(store, [it.prompt for it in items], mode=mode, models=models,
                   responses=[it.responses for it in items])
        store.start()
    except ValueError:
        store.close()
        raise
    state = LabelState(items, store, mode=mode, overlap=overlap, seed=seed, models=models, **state_kw)
    server = LabelServer("127.0.0.1", port, token=token, state=state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        store.close()


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
