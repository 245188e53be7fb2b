"""Bad and hostile input to the scorer server and its client: every case gets a clear answer, never a traceback.

Outcome classes (the test ids start with them):

- ``http4xx``: a malformed, oversized, unauthenticated or misdirected request is answered with a 4xx (or 503)
  JSON error naming what is wrong, and the server keeps serving;
- ``start``: settings the server refuses at start-up - one or two lines on stderr, a non-zero exit;
- ``client``: the client refuses or reports clearly before or after sending;
- ``retry``: a busy server (503) or a reset connection is retried with backoff, a bounded number of times.

The servers run in-process (``make_server`` in a thread) with the weight-free scorer of tests/_server_scorer.py.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import pytest
import torch
from _server_scorer import BrightnessScorer
from PIL import Image

from flowopd.scorers.client import RemoteScorer, RemoteScorerError
from flowopd.scorers.server import main, make_server
from flowopd.scorers.wire import TOKEN_ENV, Limits, encode_png

TOKEN = "t0ken-for-the-bad-input-tests"
LIMITS = Limits(max_batch=4, max_request_bytes=300_000, max_side=64, max_request_pixels=3 * 32 * 32)
PNG = encode_png(np.full((32, 32, 3), 128, np.uint8))


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def _serve(server) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    yield from _serve(make_server(BrightnessScorer(), port=0, limits=LIMITS))


@pytest.fixture(scope="module")
def token_server() -> Iterator[Any]:
    yield from _serve(make_server(BrightnessScorer(), port=0, limits=LIMITS, token=TOKEN))


def _raw(server, method: str = "POST", path: str = "/score", body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One request with exactly these headers (defaults: Host, JSON content type, Content-Length)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    sent = {"Host": f"{host}:{port}"}
    if body is not None:
        sent |= {"Content-Type": "application/json", "Content-Length": str(len(body))}
    sent |= headers or {}
    for key, value in sent.items():
        if value is not None:
            conn.putheader(key, value)
    conn.endheaders(body)
    resp = conn.getresponse()
    status, data = resp.status, resp.read()
    conn.close()
    return status, json.loads(data)


def _post(server, payload: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _raw(server, body=body, **kwargs)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int, depth: int = 8, colour: int = 2) -> str:
    """A PNG whose header claims any size (a decompression bomb's header) with a tiny, invalid image body."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return base64.b64encode(data + _png_chunk(b"IEND", b"")).decode()


def _pil_png(arr: np.ndarray, mode: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _request(images: list[Any], prompts: Any = None, **extra: Any) -> dict[str, Any]:
    return {"images": images, "prompts": prompts if prompts is not None else ["p"] * len(images), **extra}


TRUNCATED = base64.b64encode(base64.b64decode(PNG)[:60]).decode()

# (id, body, expected status, words the error must contain)
PAYLOADS = [
    ("not-json", b"{not json", 400, "not valid JSON"),
    ("nested-json", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("nested-json-in-metadata", b'{"images": [], "metadata": ' + b"{\"a\": " * 20_000 + b"1" + b"}" * 20_001,
     400, "nested too deeply"),
    ("not-utf8", b'{"images": ["\xff\xfe"]}', 400, "not valid JSON"),
    ("json-array", json.dumps([PNG]).encode(), 400, "must be a JSON object, got list"),
    ("unknown-key", _request([PNG], image=[PNG]), 400, "unknown key(s) ['image']"),
    ("images-not-list", {"images": PNG, "prompts": ["p"]}, 400, "'images' must be a non-empty list"),
    ("images-empty", _request([]), 400, "'images' must be a non-empty list"),
    ("image-not-string", _request([123]), 400, "image 0: expected a base64 string of PNG bytes, got int"),
    ("prompts-wrong-type", _request([PNG], prompts=[1]), 400, "'prompts' must be a list of 1 strings"),
    ("prompts-count", _request([PNG], prompts=["a", "b"]), 400, "'prompts' must be a list of 1 strings"),
    ("metadata-not-objects", _request([PNG], metadata=["x"]), 400, "'metadata' must be a list of 1 JSON objects"),
    ("bad-base64", _request(["%%%%" + PNG[4:]]), 400, "image 0: not valid base64"),
    ("bad-base64-after-header", _request([PNG[:60] + "%%%%" + PNG[64:]]), 400, "image 0: not valid base64"),
    ("not-png", _request([base64.b64encode(b"GIF89a" + b"\0" * 40).decode()]), 400, "image 0: not a PNG"),
    ("truncated-png", _request([TRUNCATED]), 400, "image 0: corrupt PNG"),
    ("png-mode-L", _request([_pil_png(np.zeros((8, 8), np.uint8), "L")]), 400, "got mode 'L'"),
    ("png-mode-RGBA", _request([_pil_png(np.zeros((8, 8, 4), np.uint8), "RGBA")]), 400, "got mode 'RGBA'"),
    ("png-16-bit", _request([_png_claiming(8, 8, depth=16)]), 400, "got mode 'RGB;16'"),
    ("png-zero-side", _request([_png_claiming(0, 8)]), 400, "its header says 0x8"),
    ("sizes-differ", _request([PNG, encode_png(np.zeros((16, 32, 3), np.uint8))]), 400, "share one size"),
    ("bomb-side", _request([_png_claiming(100_000, 100_000)]), 413, "exceeds the server's max_side=64"),
    ("pixels-over-budget", _request([PNG] * 4), 413, "over the server's max_request_pixels=3072"),
    ("batch-over-limit", _request([PNG] * 5), 413, "exceeds the server's max_batch=4"),
]


@pytest.mark.parametrize("body, status, words", [p[1:] for p in PAYLOADS], ids=[f"http4xx-{p[0]}" for p in PAYLOADS])
def test_malformed_score_requests_get_a_json_4xx(server, caplog, body, status, words):
    before = server.health()["requests"]
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="flowopd.scorers.server"):
        got, answer = _post(server, body)
    assert (got, answer["status"]) == (status, status) and words in answer["error"], answer
    assert time.monotonic() - start < 5  # refused on headers, nothing large decoded
    assert "Traceback" not in caplog.text
    assert _post(server, _request([PNG]))[0] == 200  # still serving
    assert server.health()["requests"] == before + 1


HEADER_CASES = [
    ("body-too-large", "POST", "/score", b"x" * 300_001, {}, 413, "exceeds the server's max_request_bytes=300000"),
    ("no-content-length", "POST", "/score", None, {"Content-Type": "application/json"}, 411, "Content-Length"),
    ("bad-content-length", "POST", "/score", None, {"Content-Type": "application/json", "Content-Length": "x"},
     411, "Content-Length"),
    ("chunked", "POST", "/score", None, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
     411, "no chunked bodies"),
    ("wrong-content-type", "POST", "/score", b"{}", {"Content-Type": "text/plain"}, 415,
     "needs 'Content-Type: application/json', got 'text/plain'"),
    ("foreign-host", "GET", "/info", None, {"Host": "attacker.example:8765"}, 400,
     "Host 'attacker.example:8765' does not name this server"),
    ("no-host", "GET", "/info", None, {"Host": None}, 400, "a Host header is required"),
    ("unknown-path", "GET", "/admin", None, {}, 404, "no endpoint '/admin'"),
    ("post-elsewhere", "POST", "/info", b"{}", {}, 404, "no endpoint '/info' for POST"),
    ("get-score", "GET", "/score", None, {}, 405, "use POST /score"),
    ("method-put", "PUT", "/score", b"{}", {}, 501, "method 'PUT' is not supported"),
]


@pytest.mark.parametrize("method, path, body, headers, status, words", [c[1:] for c in HEADER_CASES],
                         ids=[f"http4xx-{c[0]}" for c in HEADER_CASES])
def test_bad_headers_methods_and_paths_get_a_json_4xx(server, method, path, body, headers, status, words):
    got, answer = _raw(server, method, path, body, headers)
    assert (got, answer["status"]) == (status, status) and words in answer["error"], answer
    assert _raw(server, "GET", "/health")[0] == 200


def test_http4xx_garbled_request_line_and_short_body(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 garbage\r\n\r\n")  # e.g. a TLS hello sent to plain HTTP
        head, _, body = sock.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") and json.loads(body)["status"] == 400
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST /score HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"images\": ".encode())
        sock.shutdown(socket.SHUT_WR)
        head, _, body = sock.makefile("rb").read().partition(b"\r\n\r\n")
    assert b" 400 " in head.splitlines()[0] and "ended after 11 of its 1000 bytes" in json.loads(body)["error"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-of-enough-length", f"Basic {TOKEN}", TOKEN],
                         ids=["http4xx-token-missing", "http4xx-token-wrong", "http4xx-token-wrong-scheme",
                              "http4xx-token-no-scheme"])
def test_a_token_server_refuses_requests_without_its_token(token_server, auth):
    for method, path, body in (("GET", "/info", None), ("POST", "/score", json.dumps(_request([PNG])).encode())):
        status, answer = _raw(token_server, method, path, body, {"Authorization": auth})
        assert status == 401 and "needs its token" in answer["error"] and TOKEN_ENV in answer["error"]
    assert token_server.health()["requests"] == 0
    status, answer = _raw(token_server, "GET", "/info", None, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and answer["name"] == "test-brightness"


# -- start-up refusals -------------------------------------------------------------------------------------

SCORER = ["test-brightness", "--register", "test-brightness=_server_scorer:BrightnessScorer"]


def _start_fails(capsys, argv: list[str], words: str) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors exit from inside parse_args
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


@pytest.mark.parametrize("argv, words", [
    (["test-brightness", "--host", "0.0.0.0"], "refusing to serve on 0.0.0.0, beyond loopback, without a token"),
    (["test-brightness", "--port", "70000"], "argument --port: expected a port number 0-65535, got '70000'"),
    (["test-brightness", "--max-batch", "0"], "argument --max-batch: expected an integer >= 1, got '0'"),
    (["test-brightness", "--workers", "-2"], "argument --workers: expected an integer >= 1"),
    (["test-brightness", "--max-request-pixels", "many"], "argument --max-request-pixels: expected an integer"),
    (["test-brightness", "--token-file", "/nonexistent/token"], "--token-file /nonexistent/token: cannot read"),
    (["no-such-scorer", "--port", "0"], "unknown scorer 'no-such-scorer'"),
    (["x", "--register", "x=no_module"], "expected name=module:Class, got 'x=no_module'"),
    ([*SCORER, "--port", "0", "--option", "nope=1"], "--option: scorer 'test-brightness' does not take these options"),
], ids=["start-open-host-no-token", "start-port-range", "start-max-batch-0", "start-workers-negative",
        "start-pixels-not-int", "start-token-file-missing", "start-unknown-scorer", "start-bad-register",
        "start-bad-option"])
def test_the_server_refuses_to_start_with_one_line(capsys, argv, words):
    _start_fails(capsys, argv, words)


def test_start_token_weak_or_empty_is_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(TOKEN_ENV, "short")
    _start_fails(capsys, ["test-brightness", "--host", "0.0.0.0"], "token must be at least 16 printable characters")
    empty = tmp_path / "token"
    empty.write_text("\n")
    _start_fails(capsys, ["test-brightness", "--token-file", str(empty)], f"--token-file {empty}: the file is empty")


def test_start_port_in_use_is_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _start_fails(capsys, [*SCORER, "--port", str(port)], f"cannot bind 127.0.0.1:{port}")


# -- the client --------------------------------------------------------------------------------------------


def _url(server) -> str:
    return server.url


@pytest.mark.parametrize("kwargs, words", [
    ({"url": "127.0.0.1:8765"}, "url must look like http://HOST:PORT, got '127.0.0.1:8765'"),
    ({"url": "http://127.0.0.1:1", "timeout": 0}, "timeout must be a number"),
    ({"url": "http://127.0.0.1:1", "retries": -1}, "retries must be a number >= 0, got -1"),
], ids=["client-url-no-scheme", "client-timeout-zero", "client-retries-negative"])
def test_client_arguments_are_checked(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        RemoteScorer(**kwargs)


def test_client_without_the_token_gets_a_401_naming_the_variable(token_server, monkeypatch):
    with pytest.raises(RemoteScorerError, match=f"answered 401: .*{TOKEN_ENV}") as info:
        RemoteScorer(_url(token_server), startup_wait=0)
    assert info.value.status == 401
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the environment is where RemoteScorer (and reward.servers) find it
    remote = RemoteScorer(_url(token_server), startup_wait=0)
    assert remote.score(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}]).scores.shape == (2,)


def test_client_refuses_images_over_the_servers_limits_before_sending(server):
    remote = RemoteScorer(_url(server), startup_wait=0)
    before = server.health()["requests"]
    with pytest.raises(RemoteScorerError, match="65x8 exceed the server's max_side=64"):
        remote.score(torch.rand(1, 3, 8, 65), ["a"], [{}])
    with pytest.raises(ValueError, match="metadata\\[0\\] is not JSON-serialisable"):
        remote.score(torch.rand(1, 3, 8, 8), ["a"], [{"x": object()}])
    # 5 images of 32x32 = 5,120 pixels: split into requests of 3 (the pixel budget), not refused
    assert remote.score(torch.rand(5, 3, 32, 32), ["a"] * 5, [{}] * 5).scores.shape == (5,)
    assert server.health()["requests"] == before + 2


class _Flaky(BaseHTTPRequestHandler):
    """A stub server: /info as a real one; POST /score fails ``failures`` times (503 or a reset), then answers."""

    failures = 0
    mode = "503"
    posts = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json(200, {"name": "stub", "version": "1", "higher_is_better": True, "scale": {"low": 0, "high": 1},
                         **LIMITS.to_info(), "wire_version": 1})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts += 1
        if type(self).posts <= type(self).failures:
            if type(self).mode == "503":
                self._json(503, {"error": "busy", "status": 503}, {"Retry-After": "0"})
            else:  # an abortive close: the client sees a reset connection
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
            return
        self._json(200, {"scores": [0.5] * len(body["images"]), "details": {}, "nonfinite": {}})


@pytest.fixture()
def flaky() -> Iterator[type[_Flaky]]:
    srv = HTTPServer(("127.0.0.1", 0), _Flaky)
    _Flaky.posts = 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _Flaky.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield _Flaky
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("mode", ["503", "reset"], ids=["retry-busy-then-ok", "retry-reset-then-ok"])
def test_client_retries_busy_and_reset_and_then_scores(flaky, mode):
    flaky.mode, flaky.failures = mode, 2
    got = RemoteScorer(flaky.url, startup_wait=0, retries=3).score(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])
    assert list(got.scores) == [0.5, 0.5] and flaky.posts == 3


@pytest.mark.parametrize("mode, words", [("503", "answered 503: busy"), ("reset", "dropped the connection during "
                                                                                 "POST /score 3 times")],
                         ids=["retry-busy-gives-up", "retry-reset-gives-up"])
def test_client_retries_are_bounded(flaky, mode, words):
    flaky.mode, flaky.failures = mode, 100
    start = time.monotonic()
    with pytest.raises(RemoteScorerError, match=words):
        RemoteScorer(flaky.url, startup_wait=0, retries=2).score(torch.rand(1, 3, 8, 8), ["a"], [{}])
    assert flaky.posts == 3 and time.monotonic() - start < 5


class _Blocking(BrightnessScorer):
    """Holds the scoring lock until released: the server's one worker stays busy."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def score(self, images, prompts, metadata):
        self.entered.set()
        self.release.wait(30)
        return super().score(images, prompts, metadata)


def test_http4xx_busy_server_answers_503_json_with_retry_after():
    scorer = _Blocking()
    srv = make_server(scorer, port=0, limits=LIMITS, workers=1, queue_size=1)
    body = json.dumps(_request([PNG])).encode()
    results: list[tuple[int, dict[str, Any]]] = []
    serving = _serve(srv)
    next(serving)
    try:
        first = threading.Thread(target=lambda: results.append(_post(srv, body)))
        first.start()
        assert scorer.entered.wait(10)  # the worker is scoring; the next connection waits in the queue
        second = threading.Thread(target=lambda: results.append(_post(srv, body)))
        second.start()
        deadline = time.monotonic() + 10
        while srv._connections.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, answer = _post(srv, body)  # the queue is full: 503
        assert status == 503 and "busy" in answer["error"] and srv.health()["busy_refusals"] == 1
        scorer.release.set()
        first.join(10)
        second.join(10)
        assert [r[0] for r in results] == [200, 200]
    finally:
        scorer.release.set()
        next(serving, None)


def test_http4xx_host_check_accepts_this_servers_names_only():
    from flowopd.scorers.server import ScorerServer, host_name

    assert [host_name(h) for h in ("[::1]:8765", "LocalHost:1", "127.0.0.1", "example.org")] == [
        "::1", "localhost", "127.0.0.1", "example.org"]
    loopback = ScorerServer._allowed_hosts("127.0.0.2", ())
    assert {"127.0.0.2", "localhost", "127.0.0.1", "::1"} <= loopback and "attacker.example" not in loopback
    assert "scorer.lab" in ScorerServer._allowed_hosts("127.0.0.1", ["scorer.lab:8765"])
    assert ScorerServer._allowed_hosts("0.0.0.0", ()) is None  # any name: the token guards a wildcard bind
    assert "attacker.example" not in ScorerServer._allowed_hosts("0.0.0.0", ["scorer.lab"])
