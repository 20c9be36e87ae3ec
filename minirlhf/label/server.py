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
or in that cookie; without it the answer is 403. A request with Content-Length or Host twice, or any Transfer-Encoding, is 400 (no header
that two parsers could read two ways: request smuggling). POSTs must be application/json (a
cross-site form cannot send that without a CORS preflight, which is never granted) and at
most MAX_BODY bytes; anything malformed is 400 and changes nothing. Every answer but the
page's own files is JSON, the refusals too, and every one carries the security headers: any
other method (PUT, HEAD, OPTIONS, ...) passes the same access checks, then gets 405, and
what the stdlib refuses before a handler runs (a request line or headers it cannot parse)
is JSON as well. A client that goes away mid-request costs a closed connection and not a
word in the terminal; the terminal gets one line for a labels file that cannot be written,
and a traceback only for a bug. The static files are read from the package once, at start:
no request names a file, so none can read or write one; the only file written is the
labels file (--out) behind LabelState.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from .state import BadRequest

MAX_BODY = 16 * 1024      # a judgement is ~100 bytes
CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")  # ASCII digits only (str.isdigit takes "٣"), no 5000-digit int()
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


def _gone(e: BaseException) -> bool:
    """The client went away or stalled: nothing to answer, nothing to report."""
    return isinstance(e, (ConnectionError, TimeoutError))


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

    def handle_error(self, request, client_address) -> None:
        """What escaped a handler: quiet for a client that went away, one line otherwise."""
        e = sys.exc_info()[1]
        if e is not None and not _gone(e):
            print(f"[label] error serving {client_address[0]}: {type(e).__name__}: {e}", file=sys.stderr)

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

    def __getattr__(self, name: str):
        """do_PUT, do_HEAD, do_OPTIONS, ...: any other method, checked like GET and POST, then 405
        (the stdlib would answer an HTML 501 without the access checks or the security headers)."""
        if name.startswith("do_"):
            return lambda: self._handle(self._not_allowed)
        raise AttributeError(name)

    def _handle(self, route) -> None:
        try:
            self._check_framing()
            url = urlsplit(self.path)
            set_cookie = self._check_access(url)
            route(url, set_cookie)
        except _Reply as r:
            self._send_error(r.status, r.message)
        except BadRequest as e:
            self._send_error(400, str(e))
        except OSError as e:
            if _gone(e):  # the client left while we read its request or answered it
                self.close_connection = True
                return
            # the labels file could not be written: nothing was recorded
            print(f"[label] error: could not write the labels file: {e}", file=sys.stderr)
            self._send_error(500, f"could not write the labels file: {e}")
        except Exception:  # a bug: say so in the terminal, keep serving
            traceback.print_exc(file=sys.stderr)
            self._send_error(500, "internal error (see the server terminal)")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (a request line or headers it cannot parse, a method it does
        not know): JSON with the security headers, as every other answer."""
        if self.request_version == "HTTP/0.9":  # a request line it could not parse: answer with a status line
            self.request_version = "HTTP/1.0"
        self._send_error(code, message or self.responses.get(code, ("error",))[0])

    def _send_error(self, status: int, message: str) -> None:
        self.close_connection = True  # a body we did not read must not be taken for the next request
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _not_allowed(self, url, set_cookie: bool) -> None:
        raise _Reply(405, f"method {self.command[:20]!r} not allowed (GET the page, POST to /api/...)")

    def _check_framing(self) -> None:
        """400 for headers two parsers could read two ways (request smuggling through a proxy in
        front): Content-Length or Host given twice (the stdlib would take the first), and any
        Transfer-Encoding (the stdlib does not decode chunked bodies; with a Content-Length as
        well, a proxy may frame the body by the other header)."""
        for name in ("Content-Length", "Host"):
            if len(self.headers.get_all(name) or ()) > 1:
                raise _Reply(400, f"{name} given more than once")
        if self.headers.get("Transfer-Encoding") is not None:
            raise _Reply(400, "Transfer-Encoding is not accepted: send the body with one Content-Length")

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
        length = self.headers.get("Content-Length", "").strip()
        if not CONTENT_LENGTH.fullmatch(length):
            raise _Reply(400, "Content-Length required (a number of bytes)")
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
        except RecursionError:
            raise _Reply(400, "body is nested too deeply") from None
        except ValueError as e:  # not UTF-8, not JSON, an integer of more than 4300 digits
            raise _Reply(400, f"body is not JSON ({str(e)[:200]})") from None
        if not isinstance(body, dict):
            raise _Reply(400, "body must be a JSON object")
        return body

    def _send(self, status: int, body: bytes, ctype: str, set_cookie: bool = False) -> None:
        """One answer with the security headers; a client that has gone away is let go quietly."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            if status == 405:
                self.send_header("Allow", "GET, POST")
            if set_cookie:
                self.send_header("Set-Cookie", f"{self.server.cookie}={self.server.token}; Path=/; HttpOnly; "
                                               f"SameSite=Strict")
            self.end_headers()
            if self.command != "HEAD":  # HEAD: the headers alone
                self.wfile.write(body)
            self.wfile.flush()
        except OSError as e:
            if not _gone(e):
                raise
            self.close_connection = True
