"""The HTTP side: stdlib ThreadingHTTPServer, three static files, four JSON endpoints.

    GET  /                   index.html          GET /static/label.js, /static/label.css
    POST /api/next           {"session"?}                          -> view (a new session without one)
    POST /api/judge          {"session", "item", "ranking", "ties"} -> view after the row is fsynced
    POST /api/skip           {"session", "item"}                   -> view
    POST /api/undo           {"session"}                           -> view

Access: on a loopback address anyone on this machine may connect, but the Host header
must name the loopback address (a web page on another site cannot reach the server
through DNS rebinding). On any other address every request needs the access token: as
?token= (the printed URL; the page then keeps it in an HttpOnly SameSite=Strict cookie)
or in that cookie; without it the answer is 403. POSTs must be application/json (a
cross-site form cannot send that without a CORS preflight, which is never granted) and at
most MAX_BODY bytes; anything malformed is 400 and changes nothing. The static files are
read from the package once, at start: no request names a file, so none can read or write
one; the only file written is the labels file (--out) behind LabelState.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from .state import BadRequest

MAX_BODY = 16 * 1024      # a judgement is ~100 bytes
DRAIN_LIMIT = 1 << 20     # an oversized body is read (and dropped) up to this, so the 400 arrives
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/label.js": ("label.js", "text/javascript; charset=utf-8"),
          "/static/label.css": ("label.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: the addresses that need no access token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_static() -> dict[str, tuple[bytes, str]]:
    """URL path -> (bytes, content type) of the page's files, shipped as package data."""
    root = resources.files(__package__).joinpath("static")
    return {path: (root.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in STATIC.items()}


class _Reply(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LabelServer(ThreadingHTTPServer):
    """Binds at construction (so a port in use fails before any sampling); `state` (a
    LabelState) must be set before serve_forever. token=None: loopback only, Host checked."""

    daemon_threads = True
    allow_reuse_port = False  # never share the port with another server

    def __init__(self, host: str, port: int, token: str | None = None, state=None):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.token, self.state, self.static = token, state, load_static()
        super().__init__((host, port), _Handler)
        self.port = self.server_address[1]
        self.host = host
        if token is None:  # what a browser on this machine may send as Host
            names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
            self.allowed_hosts = {f"{n}:{self.port}" for n in names} | ({*names} if self.port == 80 else set())

    @property
    def cookie(self) -> str:
        return f"minirlhf_label_{self.port}"  # cookies ignore the port: one name per server

    @property
    def url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")


class _Handler(BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "minirlhf-label"
    sys_version = ""
    timeout = 30  # seconds a connection may stall (a slow client cannot pin a thread forever)

    def log_message(self, format, *args):  # quiet: the URL carries the token
        pass

    def do_GET(self):
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _handle(self, route) -> None:
        try:
            url = urlsplit(self.path)
            set_cookie = self._check_access(url)
            route(url, set_cookie)
        except _Reply as r:
            self._send(r.status, json.dumps({"error": r.message}).encode(), "application/json")
        except BadRequest as e:
            self._send(400, json.dumps({"error": str(e)}).encode(), "application/json")
        except OSError as e:  # the labels file could not be written: nothing was recorded
            traceback.print_exc(file=sys.stderr)
            self._send(500, json.dumps({"error": f"could not write the labels file: {e}"}).encode(),
                       "application/json")
        except Exception:  # a bug: say so in the terminal, keep serving
            traceback.print_exc(file=sys.stderr)
            self._send(500, b'{"error": "internal error (see the server terminal)"}', "application/json")

    def _check_access(self, url) -> bool:
        """403 unless the request may come in; True when the token arrived in the query (set the cookie)."""
        token = self.server.token
        if token is None:
            host = self.headers.get("Host")
            if host is not None and host.lower() not in self.server.allowed_hosts:
                raise _Reply(403, f"Host {host!r} is not this server's loopback address")
            return False
        given = parse_qs(url.query).get("token", [""])[0]
        from_query = bool(given)
        if not given:
            for part in self.headers.get("Cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == self.server.cookie:
                    given = value
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise _Reply(403, "access token missing or wrong: open the URL the server printed")
        return from_query

    def _get(self, url, set_cookie: bool) -> None:
        if url.path not in self.server.static:
            raise _Reply(404, "not found")
        body, ctype = self.server.static[url.path]
        self._send(200, body, ctype, set_cookie)

    def _post(self, url, set_cookie: bool) -> None:
        state = self.server.state
        routes = {"/api/next": state.next, "/api/judge": state.judge, "/api/skip": state.skip,
                  "/api/undo": state.undo}
        if url.path not in routes:
            raise _Reply(404, "not found")
        body = self._read_json()
        self._send(200, json.dumps(routes[url.path](body), ensure_ascii=False).encode(), "application/json",
                   set_cookie)

    def _read_json(self) -> dict:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _Reply(400, "Content-Type must be application/json")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise _Reply(400, "Content-Length required")
        length = int(length)
        if length > MAX_BODY:
            self.close_connection = True
            try:
                left = min(length, DRAIN_LIMIT)
                while left > 0:
                    chunk = self.rfile.read(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:
                pass
            raise _Reply(400, f"request body of {length} bytes, at most {MAX_BODY}")
        try:
            raw = self.rfile.read(length)
        except OSError:
            raise _Reply(400, "request body incomplete") from None
        if len(raw) != length:
            raise _Reply(400, "request body incomplete")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Reply(400, f"body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise _Reply(400, "body must be a JSON object")
        return body

    def _send(self, status: int, body: bytes, ctype: str, set_cookie: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        if set_cookie:
            self.send_header("Set-Cookie", f"{self.server.cookie}={self.server.token}; Path=/; HttpOnly; "
                                           f"SameSite=Strict")
        self.end_headers()
        self.wfile.write(body)
