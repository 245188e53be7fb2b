"""Serve one registered scorer over a small local HTTP service (ARCHITECTURE.md, "Isolation of scorer environments").

Scorers whose official stacks conflict with ours (DeQA's old transformers with remote code, GenEval's mmdet,
PaddleOCR) run in their own Python environment behind this server; ``flowopd.scorers.client.
RemoteScorer`` talks to it and implements the same ``Scorer`` protocol, so the harness and the trainers
cannot tell the difference.

Wire format (version 1), safe by construction - JSON and PNG only, never pickle:

- ``GET /info``   -> ``{"name", "version", "higher_is_better", "scale": {"low", "high"}, "max_batch",
  "max_request_bytes", "wire_version"}``
- ``GET /health`` -> ``{"status": "ok", "scorer", "requests", "images"}``
- ``POST /score`` with ``{"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [object, ...]}``
  -> ``{"scores": [float | null, ...], "details": {name: [value, ...]}, "nonfinite": {name: {index: "nan"}}}``;
  a NaN score travels as ``null`` and +-inf as the strings ``"inf"`` / ``"-inf"``; a non-finite detail float
  as ``null`` plus its entry in ``nonfinite``, so that every value comes back as it left.
- Errors are JSON ``{"error": message}``: 400 for a malformed payload (not JSON, bad base64, not a PNG, not
  8-bit RGB, sizes that differ), 413 for too many images or too many bytes, 500 for an error raised inside
  the scorer. The server keeps serving after every one of them.

Images travel as lossless 8-bit RGB PNGs, so the scorer sees exactly ``quantise_uint8(images)``: the same
8-bit quantisation as the image cache. In-process scores computed on the quantised images match the served
scores exactly.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import ipaddress
import json
import logging
import math
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowopd.scorers.base import ScoreBatch, Scorer, to_uint8_hwc

logger = logging.getLogger("flowopd.scorers.server")

WIRE_VERSION = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BATCH = 64
# 64 PNGs of 1024x1024 noise, base64-encoded, fit comfortably; real generations compress much better.
DEFAULT_MAX_REQUEST_BYTES = 512 * 2**20
# Decompression-bomb guard: a 20-byte PNG header may claim any size; refuse before decoding pixels.
MAX_IMAGE_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A refused (too large) body is read and dropped up to this many bytes, then the connection is closed.
MAX_DISCARD_BYTES = 1024 * 2**20


class PayloadError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class BindError(OSError):
    """The server could not bind its address (port in use, address not on this machine)."""


# ----------------------------------------------------------------------------------------------------------
# wire format: images <-> base64 PNG, scores <-> JSON


def quantise_uint8(images: torch.Tensor) -> torch.Tensor:
    """The float32 (N, 3, H, W) images a served scorer sees: 8-bit quantised exactly as the image cache does."""
    return uint8_to_float(to_uint8_hwc(images))


def uint8_to_float(arr: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]; the inverse of ``to_uint8_hwc`` on 8-bit images."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(255.0)


def encode_png(image: np.ndarray) -> str:
    """One (H, W, 3) uint8 RGB image -> base64 text of a lossless PNG."""
    buf = io.BytesIO()
    # compress_level=1: PNG is lossless at every level; the fastest one keeps the client cheap.
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: Any, index: int) -> np.ndarray:
    """base64 PNG text -> (H, W, 3) uint8; a clear ``PayloadError`` naming image ``index`` otherwise."""
    if not isinstance(text, str):
        raise PayloadError(f"image {index}: expected a base64 string of PNG bytes, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"image {index}: not valid base64 ({e})") from e
    if not data.startswith(PNG_SIGNATURE):
        raise PayloadError(f"image {index}: not a PNG (the bytes do not start with the PNG signature)")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise PayloadError(
                    f"image {index}: {width}x{height} exceeds the server's limit of {MAX_IMAGE_PIXELS} pixels",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                )
            if img.mode != "RGB":
                raise PayloadError(
                    f"image {index}: expected an 8-bit RGB PNG, got mode {img.mode!r}; send (N, 3, H, W) images"
                )
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except PayloadError:
        raise
    except Exception as e:  # PIL raises many types on corrupt data; all mean "bad payload"
        raise PayloadError(f"image {index}: corrupt PNG ({type(e).__name__}: {e})") from e
    return arr


def encode_score(x: float) -> float | str | None:
    """NaN -> None (JSON null); +-inf -> "inf" / "-inf" (strict JSON has no infinities)."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def decode_score(x: Any) -> float:
    """The inverse of ``encode_score``."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        if x not in ("inf", "-inf"):
            raise ValueError(f"unexpected score value {x!r} in a server response")
        return float(x)
    return float(x)


def _detail_value(value: Any, where: str) -> Any:
    """A detail value as a JSON scalar (numpy scalars unwrapped); non-finite floats are handled by the caller."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(
        f"{where}: detail values must be JSON scalars (str, float, int, bool, None), got {value!r}"
    )


def encode_batch(batch: ScoreBatch) -> dict[str, Any]:
    """ScoreBatch -> the JSON body of a ``/score`` response.

    Non-finite detail floats travel as ``null`` in ``details`` plus an entry ``nonfinite[key][index]`` =
    ``"nan"`` / ``"inf"`` / ``"-inf"``, so that they come back as floats and a real ``None`` stays ``None``.
    """
    details: dict[str, list[Any]] = {}
    nonfinite: dict[str, dict[str, str]] = {}
    for key, values in batch.details.items():
        column = details[key] = []
        for i, v in enumerate(values):
            v = _detail_value(v, f"detail {key!r}[{i}]")
            if isinstance(v, float) and not math.isfinite(v):
                nonfinite.setdefault(key, {})[str(i)] = str(v)  # 'nan', 'inf', '-inf'
                v = None
            column.append(v)
    return {"scores": [encode_score(s) for s in batch.scores], "details": details, "nonfinite": nonfinite}


def decode_batch(body: Mapping[str, Any]) -> ScoreBatch:
    """The JSON body of a ``/score`` response -> ScoreBatch (non-finite scores and detail floats restored)."""
    scores = np.array([decode_score(s) for s in body["scores"]], dtype=np.float64)
    details = {key: list(values) for key, values in body.get("details", {}).items()}
    for key, entries in body.get("nonfinite", {}).items():
        for index, text in entries.items():
            details[key][int(index)] = float(text)
    return ScoreBatch(scores, details)


def parse_score_request(body: Any, max_batch: int) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Validate a decoded ``/score`` JSON body; return (images (N, 3, H, W) float32, prompts, metadata)."""
    if not isinstance(body, dict):
        raise PayloadError(f"the request body must be a JSON object, got {type(body).__name__}")
    images, prompts = body.get("images"), body.get("prompts")
    metadata = body.get("metadata")
    if not isinstance(images, list) or not images:
        raise PayloadError("'images' must be a non-empty list of base64 PNG strings")
    n = len(images)
    if n > max_batch:
        raise PayloadError(
            f"batch of {n} images exceeds the server's max_batch={max_batch}; split it "
            "(RemoteScorer does this for you)",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    if not isinstance(prompts, list) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise PayloadError(f"'prompts' must be a list of {n} strings, one per image")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if not isinstance(metadata, list) or len(metadata) != n or not all(isinstance(m, dict) for m in metadata):
        raise PayloadError(f"'metadata' must be a list of {n} JSON objects, one per image")
    arrays = [decode_png(text, i) for i, text in enumerate(images)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = sorted(f"{w}x{h}" for h, w, _ in shapes)
        raise PayloadError(f"all images in one request must share one size, got {', '.join(sizes)}")
    return uint8_to_float(np.stack(arrays)), prompts, metadata


# ----------------------------------------------------------------------------------------------------------
# the HTTP service


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ScorerServer(ThreadingHTTPServer):
    """A threading HTTP server holding one scorer; scoring is serialised (models are rarely thread-safe)."""

    # Graceful shutdown: server_close() waits for in-flight requests (HTTP/1.0: one request per connection).
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        scorer: Scorer,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if max_batch < 1 or max_request_bytes < 1:
            raise ValueError(
                f"max_batch and max_request_bytes must be positive, got {max_batch}, {max_request_bytes}"
            )
        self.scorer = scorer
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.score_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.requests_scored = 0
        self.images_scored = 0
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), ScorerRequestHandler)

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
            "max_batch": self.max_batch,
            "max_request_bytes": self.max_request_bytes,
            "wire_version": WIRE_VERSION,
        }

    def score(self, body: Any) -> dict[str, Any]:
        images, prompts, metadata = parse_score_request(body, self.max_batch)
        with self.score_lock:
            batch = self.scorer.score(images, prompts, metadata)
        if not isinstance(batch, ScoreBatch) or len(batch) != len(prompts):
            got = len(batch) if isinstance(batch, ScoreBatch) else type(batch).__name__
            raise RuntimeError(f"scorer {self.scorer.name!r} returned {got} scores for {len(prompts)} images")
        with self.stats_lock:
            self.requests_scored += 1
            self.images_scored += len(prompts)
        return encode_batch(batch)


class ScorerRequestHandler(BaseHTTPRequestHandler):
    """GET /info, GET /health, POST /score; every answer is JSON."""

    server: ScorerServer
    server_version = "flowopd-scorer"
    timeout = 120  # socket timeout (s): a stalled client cannot hold a worker thread (or shutdown) for long

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: HTTPStatus, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": message, "status": int(status)})

    def _discard_body(self, length: int) -> None:
        """Read and drop a refused body (bounded) so the client gets the 413 instead of a reset connection."""
        self.close_connection = True
        left = min(length, MAX_DISCARD_BYTES)
        while left > 0:
            chunk = self.rfile.read(min(left, 2**20))
            if not chunk:
                break
            left -= len(chunk)

    def do_GET(self) -> None:
        if self.path == "/info":
            self._send_json(HTTPStatus.OK, self.server.info())
        elif self.path == "/health":
            with self.server.stats_lock:
                stats = {"requests": self.server.requests_scored, "images": self.server.images_scored}
            self._send_json(HTTPStatus.OK, {"status": "ok", "scorer": self.server.scorer.name, **stats})
        elif self.path == "/score":
            self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /score with a JSON body")
        else:
            self._send_error(
                HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r}; try GET /info, GET /health, POST /score"
            )

    def do_POST(self) -> None:
        if self.path != "/score":
            self._send_error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r} for POST; use POST /score")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_error(HTTPStatus.LENGTH_REQUIRED, "POST /score needs a valid Content-Length header")
            return
        if length > self.server.max_request_bytes:
            self._discard_body(length)
            self._send_error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request of {length} bytes exceeds the server's max_request_bytes={self.server.max_request_bytes}; "
                "send fewer or smaller images",
            )
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._send_error(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON ({e})")
            return
        try:
            answer = self.server.score(body)
        except PayloadError as e:
            self._send_error(e.status, str(e))
            return
        except Exception as e:  # an error inside the scorer: report it, keep serving
            logger.error("scorer %r failed:\n%s", self.server.scorer.name, traceback.format_exc())
            self._send_error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"scorer {self.server.scorer.name!r} failed: {type(e).__name__}: {e}",
            )
            return
        self._send_json(HTTPStatus.OK, answer)


def make_server(
    scorer: Scorer,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> ScorerServer:
    """Bind a server for an already-built scorer (port 0 picks a free port; see ``.url``); not yet serving."""
    if not is_loopback(host):
        logger.warning(
            "binding the scorer server to %s: anyone who can reach this address can run the scorer, and there "
            "is no authentication; keep the default 127.0.0.1 unless the network is trusted",
            host,
        )
    return ScorerServer(scorer, host, port, max_batch, max_request_bytes)


def serve(
    scorer_name: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    scorer_options: Mapping[str, Any] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """Build the registered scorer ``scorer_name`` and serve it until SIGINT or SIGTERM (then shut down cleanly).

    Prints ``serving '<name>' at <url>`` on stdout once the socket is bound (with ``port=0`` this is how a caller
    learns the port).
    """
    from flowopd.scorers import build_scorer

    # the port is bound only once the model is loaded: until then clients see "connection refused" and retry
    print(f"loading scorer {scorer_name!r} ...", flush=True)
    scorer = build_scorer(scorer_name, **dict(scorer_options or {}))
    try:
        server = make_server(scorer, host, port, max_batch, max_request_bytes)
    except OSError as e:
        raise BindError(
            f"cannot bind {host}:{port} ({e.strerror or e}); pick another --port (0 = any free)"
        ) from e

    def stop(signum: int, _frame: Any) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, which runs in this (main) thread: call it from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"serving {scorer.name!r} at {server.url} (max_batch={max_batch})", flush=True)
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():  # a second Ctrl-C aborts the wait below
            signal.signal(sig, handler)
        server.server_close()  # waits for the requests in flight
        print(f"scorer server for {scorer.name!r} at {server.url} shut down", flush=True)


# ----------------------------------------------------------------------------------------------------------
# command line


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as JSON when it parses (numbers, true, null), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_registration(text: str) -> tuple[str, str]:
    """``name=module:Class`` -> (name, target) for ``SCORERS.register``."""
    name, sep, target = text.partition("=")
    if not sep or not name.strip() or ":" not in target:
        raise argparse.ArgumentTypeError(f"expected name=module:Class, got {text!r}")
    return name.strip(), target.strip()


def build_parser(prog: str = "python -m flowopd.bench serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve one registered scorer over local HTTP (JSON + PNG, never pickle) for RemoteScorer.",
    )
    parser.add_argument("scorer", help="registered scorer name, e.g. deqa, imagereward, geneval")
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s, loopback)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 = any free)"
    )
    parser.add_argument(
        "--option",
        "-o",
        action="append",
        type=parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="scorer constructor option (repeatable); values parse as JSON when they can, e.g. device=cuda, batch_size=8",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="pass trust_remote_code=True to the scorer (DeQA's mPLUG-Owl2 needs it); only for checkpoints you trust",
    )
    parser.add_argument(
        "--register",
        action="append",
        type=parse_registration,
        default=[],
        metavar="NAME=MODULE:CLASS",
        help="register an extra scorer before serving (repeatable), e.g. my-score=mypkg.scorers:MyScorer",
    )
    parser.add_argument(
        "--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="images per request (default: %(default)s)"
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body in bytes (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m flowopd.bench serve") -> int:
    """CLI entry point: ``python -m flowopd.bench serve SCORER [options]``; returns the exit status."""
    from flowopd.registry import UnknownNameError
    from flowopd.scorers import SCORERS

    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for name, target in args.register:
        SCORERS.register(name, target)
    options = dict(args.option)
    if args.trust_remote_code:
        options["trust_remote_code"] = True
    try:
        serve(args.scorer, args.host, args.port, options, args.max_batch, args.max_request_bytes)
    except UnknownNameError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BindError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m flowopd.scorers.server"))
