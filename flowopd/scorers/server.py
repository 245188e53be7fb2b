"""Serve one registered scorer over a small HTTP service (ARCHITECTURE.md, "Isolation of scorer environments").

Scorers whose official stacks conflict with ours (DeQA's old transformers with remote code, GenEval's mmdet,
PaddleOCR) run in their own Python environment behind this server; ``flowopd.scorers.client.RemoteScorer``
talks to it and implements the same ``Scorer`` protocol, so the harness and the trainers cannot tell the
difference. The wire format (JSON and PNG, never pickle) lives in ``flowopd.scorers.wire``.

Fit to be left running (docs/scorers/server.md):

- a token (``Authorization: Bearer ...``) is required whenever one is set, and one must be set to bind beyond
  loopback - the server refuses to start otherwise; the ``Host`` header must name this server (DNS rebinding)
  and ``POST /score`` must be ``application/json``;
- limits on body size, batch, image side and pixels per request are checked before anything is decoded (the
  body size before it is read, the sizes on the PNG headers);
- memory is bounded under any number of clients: connections wait in a bounded queue (beyond it: 503 with a
  JSON error) and a fixed pool of workers reads, decodes and answers them; scoring itself is serialised on the
  model (one lock), so at most ``workers`` decoded requests exist at a time;
- the listen backlog (default 128) holds a burst of many clients, and every malformed request - bad JSON,
  JSON nested too deep, wrong types, bad base64 or PNG - gets a 4xx JSON answer; the server keeps serving.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch

from flowopd.errors import CLIParser, positive_int, run_cli
from flowopd.logs import SERVER_FORMAT, add_log_level_argument, configure
from flowopd.scorers.base import ScoreBatch, Scorer
from flowopd.scorers.wire import (
    MIN_TOKEN_LENGTH,
    TOKEN_ENV,
    WIRE_VERSION,
    Limits,
    PayloadError,
    encode_batch,
    parse_score_request,
)

logger = logging.getLogger("flowopd.scorers.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_WORKERS = 2
DEFAULT_QUEUE_SIZE = 64
DEFAULT_BACKLOG = 128
# A refused body is read and dropped up to this many bytes (so the client reads the answer, not a reset).
MAX_DISCARD_BYTES = 256 * 2**20
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class ServerConfigError(ValueError):
    """The server refuses to start with these settings (e.g. beyond loopback without a token)."""


class BindError(OSError):
    """The server could not bind its address (port in use, address not on this machine)."""


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def check_settings(host: str, token: str | None) -> None:
    """Refuse (``ServerConfigError``) a token that is too weak, or a non-loopback address without a token."""
    if token is not None:
        if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or any(c.isspace() for c in token):
            raise ServerConfigError(
                f"the scorer server's token must be at least {MIN_TOKEN_LENGTH} printable characters without "
                f"spaces (got {len(token)}); e.g. `export {TOKEN_ENV}=$(python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')`"
            )
    elif not is_loopback(host):
        raise ServerConfigError(
            f"refusing to serve on {host}, beyond loopback, without a token: anyone who can reach it could run the "
            f"scorer; set {TOKEN_ENV} (or --token-file FILE) on both sides, or bind 127.0.0.1"
        )


def host_name(header: str) -> str:
    """The host part of a ``Host`` header value (``[::1]:8765`` -> ``::1``, ``Example:80`` -> ``example``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


class ScorerServer(HTTPServer):
    """An HTTP server holding one scorer: a bounded queue of connections, a pool of workers, one scoring lock.

    Args:
        scorer: the scorer to serve.
        host, port: address to bind (port 0 picks a free port; see ``.url``).
        limits: what one request may carry (``wire.Limits``).
        token: the shared secret every request must present (``Authorization: Bearer``); required beyond
            loopback.
        workers: threads that read, decode and answer requests (their number bounds the decoded requests in
            memory); scoring is serialised on the model whatever their number.
        queue_size: accepted connections that may wait for a worker; one more gets 503.
        backlog: the listen backlog (connections the kernel holds before they are accepted).
        allowed_hosts: extra names the ``Host`` header may carry (a DNS name of this machine, a proxy's name).
    """

    allow_reuse_address = True  # a restarted server can rebind its port while old connections linger

    def __init__(
        self,
        scorer: Scorer,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        limits: Limits | None = None,
        token: str | None = None,
        workers: int = DEFAULT_WORKERS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        backlog: int = DEFAULT_BACKLOG,
        allowed_hosts: Sequence[str] = (),
    ) -> None:
        check_settings(host, token)
        for name, value in (("workers", workers), ("queue_size", queue_size), ("backlog", backlog)):
            if value < 1:
                raise ServerConfigError(f"{name} must be at least 1, got {value}")
        self.scorer = scorer
        self.limits = limits or Limits()
        self.token = token
        self.request_queue_size = backlog  # socketserver passes it to listen()
        self.allowed_hosts = self._allowed_hosts(host, allowed_hosts)
        self.score_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.requests_scored = self.images_scored = self.busy_refusals = 0
        self._connections: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(maxsize=queue_size)
        self._refusals: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(maxsize=queue_size)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._workers = [threading.Thread(target=self._work, args=(self._connections, ScorerRequestHandler),
                                          name=f"scorer-worker-{i}", daemon=True) for i in range(workers)]
        self._refuser = threading.Thread(target=self._work, args=(self._refusals, BusyHandler),
                                         name="scorer-busy", daemon=True)
        super().__init__((host, port), ScorerRequestHandler)  # binds; closes the socket again if that fails
        for thread in (*self._workers, self._refuser):
            thread.start()

    @staticmethod
    def _allowed_hosts(host: str, extra: Sequence[str]) -> frozenset[str] | None:
        """Names the Host header may carry; None = any (a wildcard bind with no --allow-host)."""
        if _is_wildcard(host) and not extra:
            return None
        names = set(LOOPBACK_NAMES) | {host.lower()} | {host_name(h) for h in extra}
        if not is_loopback(host):
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return frozenset(names)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        s = self.scorer
        return {
            "name": s.name,
            "version": s.version,
            "higher_is_better": bool(s.higher_is_better),
            "scale": {"low": float(s.scale.low), "high": float(s.scale.high)},
            **self.limits.to_info(),
            "wire_version": WIRE_VERSION,
        }

    def health(self) -> dict[str, Any]:
        with self.stats_lock:
            return {"status": "ok", "scorer": self.scorer.name, "requests": self.requests_scored,
                    "images": self.images_scored, "busy_refusals": self.busy_refusals}

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Any]:
        """Score one parsed request under the model's lock; the JSON body of the answer."""
        with self.score_lock:
            batch = self.scorer.score(images, prompts, metadata)
        if not isinstance(batch, ScoreBatch) or len(batch) != len(prompts):
            got = len(batch) if isinstance(batch, ScoreBatch) else type(batch).__name__
            raise RuntimeError(f"scorer {self.scorer.name!r} returned {got} scores for {len(prompts)} images")
        with self.stats_lock:
            self.requests_scored += 1
            self.images_scored += len(prompts)
        return encode_batch(batch)

    # -- connections: accepted by serve_forever's thread, answered by the pool ------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self._connections.put_nowait((request, client_address))
            return
        except queue.Full:
            pass
        with self.stats_lock:
            self.busy_refusals += 1
        try:
            self._refusals.put_nowait((request, client_address))
        except queue.Full:  # overwhelmed: even the 503 answers are queued out
            self.shutdown_request(request)

    def _work(self, connections: queue.Queue, handler: type[BaseHTTPRequestHandler]) -> None:
        # HTTP/1.0 handlers: one request per connection, so the worker is free again after each answer
        while (item := connections.get()) is not None:
            request, client_address = item
            try:
                handler(request, client_address, self)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line per failed connection (a client that vanished, a timeout), not a traceback on stderr."""
        exc = sys.exc_info()[1]
        logger.warning("connection from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)

    def server_close(self) -> None:
        """Stop listening, let the workers answer what is queued and in flight, then stop them."""
        super().server_close()
        if not self._refuser.is_alive():  # the bind failed: nothing was started
            return
        for _ in self._workers:
            self._connections.put(None)
        self._refusals.put(None)
        for thread in (*self._workers, self._refuser):
            thread.join()


class ScorerRequestHandler(BaseHTTPRequestHandler):
    """GET /info, GET /health, POST /score; every answer, errors included, is JSON."""

    server: ScorerServer
    server_version = "flowopd-scorer"
    # socket timeout (s) for each read: a stalled client cannot hold a worker for long
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: HTTPStatus, payload: Mapping[str, Any],
                   headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _refuse(self, status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> None:
        """Answer an error before the body was read: drop the body (bounded) first, then close."""
        self._discard_body()
        self._send_json(status, {"error": message, "status": int(status)}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method, headers too long) as JSON too."""
        self.close_connection = True
        self.request_version = self.protocol_version  # no HTTP/0.9 answers without a status line: garbage is 400
        status = HTTPStatus(code)
        text = message or status.phrase
        if code == HTTPStatus.NOT_IMPLEMENTED:
            text = f"method {self.command!r} is not supported; use GET /info, GET /health or POST /score"
        try:
            self._send_json(status, {"error": text, "status": int(status)})
        except OSError:
            pass

    def _content_length(self) -> int:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return -1
        return length

    def _discard_body(self) -> None:
        self.close_connection = True
        left = min(self._content_length(), MAX_DISCARD_BYTES)
        while left > 0:
            chunk = self.rfile.read(min(left, 2**20))
            if not chunk:
                break
            left -= len(chunk)

    def _admitted(self) -> bool:
        """Host and token checks shared by every endpoint; False once an error answer has been sent."""
        allowed = self.server.allowed_hosts
        host = self.headers.get("Host")
        if host is None:
            self._refuse(HTTPStatus.BAD_REQUEST, "a Host header is required")
            return False
        if allowed is not None and host_name(host) not in allowed:
            self._refuse(HTTPStatus.BAD_REQUEST,
                         f"Host {host!r} does not name this server (accepted: {', '.join(sorted(allowed))}); "
                         "start the server with --allow-host NAME to accept another name")
            return False
        token = self.server.token
        if token is not None:
            scheme, _, given = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                self._refuse(HTTPStatus.UNAUTHORIZED,
                             f"this scorer server needs its token: send 'Authorization: Bearer <token>' "
                             f"(RemoteScorer reads it from {TOKEN_ENV})", {"WWW-Authenticate": "Bearer"})
                return False
        return True

    def do_GET(self) -> None:
        if not self._admitted():
            return
        if self.path == "/info":
            self._send_json(HTTPStatus.OK, self.server.info())
        elif self.path == "/health":
            self._send_json(HTTPStatus.OK, self.server.health())
        elif self.path == "/score":
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /score with a JSON body")
        else:
            self._refuse(HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r}; try GET /info, GET /health, POST /score")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if not self._admitted():
            return
        if self.path != "/score":
            self._refuse(HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r} for POST; use POST /score")
            return
        content_type = self.headers.get("Content-Type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                         f"POST /score needs 'Content-Type: application/json', got {content_type or 'none'!r}")
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "POST /score needs a Content-Length (no chunked bodies)")
            return
        length, limit = self._content_length(), self.server.limits.max_request_bytes
        if length < 0:
            self.close_connection = True
            self._send_json(HTTPStatus.LENGTH_REQUIRED,
                            {"error": "POST /score needs a valid Content-Length header", "status": 411})
            return
        if length > limit:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"request of {length} bytes exceeds the server's max_request_bytes={limit}; send fewer or "
                         "smaller images (RemoteScorer splits for you)")
            return
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"the body ended after {len(data)} of its "
                                                              f"{length} bytes", "status": 400})
            return
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested deeper than the parser's stack
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"the request body is not valid JSON ({why})",
                                                     "status": 400})
            return
        del data  # from here on only the parsed body, then only the decoded images, are held
        try:
            images, prompts, metadata = parse_score_request(body, self.server.limits)
        except PayloadError as e:
            self._send_json(e.status, {"error": str(e), "status": int(e.status)})
            return
        del body
        try:
            answer = self.server.score(images, prompts, metadata)
        except Exception as e:  # an error inside the scorer: report it, keep serving
            logger.error("scorer %r failed:\n%s", self.server.scorer.name, traceback.format_exc())
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"scorer {self.server.scorer.name!r} failed: {type(e).__name__}: {e}", "status": 500})
            return
        self._send_json(HTTPStatus.OK, answer)


class BusyHandler(ScorerRequestHandler):
    """The answer to a connection the queue has no room for: 503 (after reading its headers and body)."""

    timeout = 5

    def _busy(self) -> None:
        self._refuse(HTTPStatus.SERVICE_UNAVAILABLE,
                     "the scorer server is busy (its request queue is full); retry shortly", {"Retry-After": "1"})

    do_GET = do_HEAD = do_POST = _busy


def make_server(
    scorer: Scorer,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    limits: Limits | None = None,
    token: str | None = None,
    workers: int = DEFAULT_WORKERS,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    backlog: int = DEFAULT_BACKLOG,
    allowed_hosts: Sequence[str] = (),
) -> ScorerServer:
    """Bind a server for an already-built scorer (port 0 picks a free port; see ``.url``); not yet serving.

    Raises ``ServerConfigError`` beyond loopback without a token (or with a weak one), ``BindError`` when the
    address cannot be bound.
    """
    try:
        return ScorerServer(scorer, host, port, limits, token, workers, queue_size, backlog, allowed_hosts)
    except OSError as e:
        raise BindError(f"cannot bind {host}:{port} ({e.strerror or e}); pick another --port (0 = any free)") from e


def serve(
    scorer_name: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    scorer_options: Mapping[str, Any] | None = None,
    limits: Limits | None = None,
    token: str | None = None,
    workers: int = DEFAULT_WORKERS,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    backlog: int = DEFAULT_BACKLOG,
    allowed_hosts: Sequence[str] = (),
    announce: Callable[[str], None] = logger.info,
) -> None:
    """Build the registered scorer ``scorer_name`` and serve it until SIGINT or SIGTERM (then shut down cleanly).

    The settings are checked before the model is loaded. ``announce`` gets ``serving '<name>' at <url> ...``
    once the socket is bound (with ``port=0`` this is how a caller learns the port) and ``scorer server for
    '<name>' at <url> shut down`` at the end; the command line prints both on stdout.
    """
    from flowopd.scorers import build_scorer

    check_settings(host, token)
    # the port is bound only once the model is loaded: until then clients see "connection refused" and retry
    logger.info("loading scorer %r ...", scorer_name)
    try:
        scorer = build_scorer(scorer_name, **dict(scorer_options or {}))
    except TypeError as e:  # an --option the constructor does not take
        raise ServerConfigError(f"--option: scorer {scorer_name!r} does not take these options ({e})") from e
    limits = limits or Limits()
    server = make_server(scorer, host, port, limits, token, workers, queue_size, backlog, allowed_hosts)

    def stop(signum: int, _frame: Any) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, which runs in this (main) thread: call it from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    announce(f"serving {scorer.name!r} at {server.url} (max_batch={limits.max_batch}, workers={workers}, "
             f"token {'required' if token else 'off'})")
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():  # a second Ctrl-C aborts the wait below
            signal.signal(sig, handler)
        server.server_close()  # waits for the requests in flight
        announce(f"scorer server for {scorer.name!r} at {server.url} shut down")


# ----------------------------------------------------------------------------------------------------------
# command line


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as JSON when it parses (numbers, true, null), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        value = raw
    return key.strip(), value


def parse_registration(text: str) -> tuple[str, str]:
    """``name=module:Class`` -> (name, target) for ``SCORERS.register``."""
    name, sep, target = text.partition("=")
    if not sep or not name.strip() or ":" not in target:
        raise argparse.ArgumentTypeError(f"expected name=module:Class, got {text!r}")
    return name.strip(), target.strip()


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0 = any free port)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def read_token(token_file: str | None) -> str | None:
    """The token from ``--token-file`` (its first line) or else from the environment (``TOKEN_ENV``)."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    path = Path(token_file)
    try:
        token = path.read_text().splitlines()[0].strip() if path.stat().st_size else ""
    except OSError as e:
        raise ServerConfigError(f"--token-file {token_file}: cannot read it ({e.strerror or e})") from e
    if not token:
        raise ServerConfigError(f"--token-file {token_file}: the file is empty; write the token on its first line")
    return token


def build_parser(prog: str = "python -m flowopd.bench serve") -> argparse.ArgumentParser:
    parser = CLIParser(
        prog=prog,
        description="Serve one registered scorer over HTTP (JSON + PNG, never pickle) for RemoteScorer; see "
                    "docs/scorers/server.md.",
    )
    parser.add_argument("scorer", help="registered scorer name, e.g. deqa, imagereward, geneval")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default: %(default)s, loopback); any other address needs a token "
                             f"({TOKEN_ENV} or --token-file)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="port (default: %(default)s; 0 = any free)")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"file whose first line is the token clients must send (default: ${TOKEN_ENV}; none "
                             "= no token, loopback only)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="another name the Host header may carry (repeatable), e.g. the machine's DNS name")
    parser.add_argument(
        "--option", "-o", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
        help="scorer constructor option (repeatable); values parse as JSON when they can, e.g. device=cuda, "
             "batch_size=8",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="pass trust_remote_code=True to the scorer (DeQA's mPLUG-Owl2 needs it); only for checkpoints you trust",
    )
    parser.add_argument(
        "--register", action="append", type=parse_registration, default=[], metavar="NAME=MODULE:CLASS",
        help="register an extra scorer before serving (repeatable), e.g. my-score=mypkg.scorers:MyScorer",
    )
    defaults = Limits()
    parser.add_argument("--max-batch", type=positive_int, default=defaults.max_batch,
                        help="images per request (default: %(default)s)")
    parser.add_argument("--max-request-bytes", type=positive_int, default=defaults.max_request_bytes,
                        help="largest request body in bytes, refused before it is read (default: %(default)s)")
    parser.add_argument("--max-side", type=positive_int, default=defaults.max_side,
                        help="largest image width or height, read from the PNG header (default: %(default)s)")
    parser.add_argument("--max-request-pixels", type=positive_int, default=defaults.max_request_pixels,
                        help="pixels of all images in one request (default: %(default)s = 64 x 512 x 512)")
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS,
                        help="threads that read and decode requests; bounds the memory (default: %(default)s)")
    parser.add_argument("--queue-size", type=positive_int, default=DEFAULT_QUEUE_SIZE,
                        help="connections waiting for a worker before 503 (default: %(default)s)")
    parser.add_argument("--backlog", type=positive_int, default=DEFAULT_BACKLOG,
                        help="listen backlog (default: %(default)s)")
    add_log_level_argument(parser)
    return parser


def _main(argv: Sequence[str] | None, prog: str) -> int:
    from flowopd.scorers import SCORERS

    args = build_parser(prog).parse_args(argv)
    configure(args.log_level, SERVER_FORMAT, stderr_only=True)  # stdout: the announcements below
    token = read_token(args.token_file)
    check_settings(args.host, token)  # before the scorer's model is loaded
    for name, target in args.register:
        SCORERS.register(name, target)
    options = dict(args.option)
    if args.trust_remote_code:
        options["trust_remote_code"] = True
    limits = Limits(args.max_batch, args.max_request_bytes, args.max_side, args.max_request_pixels)
    serve(args.scorer, args.host, args.port, options, limits, token, args.workers, args.queue_size, args.backlog,
          args.allow_host, announce=lambda line: print(line, flush=True))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m flowopd.bench serve") -> int:
    """CLI entry point: ``python -m flowopd.bench serve SCORER [options]``; returns the exit status.

    Every error (a bad flag, an unknown scorer, a refused setting, a port in use) is one line on stderr and a
    non-zero exit; a traceback only with ``FLOWOPD_DEBUG=1``.
    """
    return run_cli(lambda: _main(argv, prog), prog=prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m flowopd.scorers.server"))
