"""RemoteScorer: the Scorer protocol over HTTP, for a scorer served by ``flowopd.scorers.server``.

Used wherever a scorer is (benchmark column, GRPO reward, OPD router): ``RemoteScorer("http://127.0.0.1:8765")``
has the served scorer's ``name``, ``version``, ``higher_is_better`` and ``scale`` (read from ``GET /info``) and a
``score(images, prompts, metadata) -> ScoreBatch`` that splits batches to the server's ``max_batch`` and
request limits (images, bytes, pixels). Images are sent as 8-bit PNGs: the served scorer sees
``quantise_uint8(images)``, exactly what the image cache stores (the wire format: ``flowopd.scorers.wire``).
The token a server may require is read from ``FLOWOPD_SCORER_TOKEN`` unless given; a busy server (503) and a
reset connection are retried with exponential backoff, a bounded number of times (scoring is a pure function
of the images, so a resent request gives the same scores).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flowopd.scorers.base import Scale, ScoreBatch, to_uint8_hwc
from flowopd.scorers.wire import TOKEN_ENV, WIRE_VERSION, decode_batch, encode_png

# Bytes of JSON around each image (quotes, comma) and per request (keys, prompts excluded): for request sizing.
_PER_IMAGE_OVERHEAD = 4
_REQUEST_OVERHEAD = 64


class ScorerServerUnreachable(ConnectionError):
    """No scorer server answers at the URL (it is not started, or still loading past the start-up wait)."""


class RemoteScorerError(RuntimeError):
    """The scorer server answered with an error (bad request, too large, or the scorer itself failed)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteScorer:
    """A Scorer whose ``score`` runs in a scorer server (usually in another Python environment).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8765`` (what ``serve`` prints).
        timeout: seconds to wait for one HTTP answer (a large batch on a big model can take minutes).
        startup_wait: how long to keep retrying, with exponential backoff, while the connection is refused
            (the server may still be loading its model); 0 fails at once.
        expected_name: if given, the served scorer must have this name (guards against a server on the wrong
            port); also used in the "start it with" hint when the server is down.
        token: the server's token (sent as ``Authorization: Bearer``); default: ``$FLOWOPD_SCORER_TOKEN``, if set.
        retries: how many times one request is resent after a 503 (server busy) or a reset connection, with
            exponential backoff (0.1 s doubling to 5 s, jittered; a 503's ``Retry-After`` is honoured).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 600.0,
        startup_wait: float = 60.0,
        expected_name: str | None = None,
        token: str | None = None,
        retries: int = 5,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteScorer: url must look like http://HOST:PORT, got {url!r}")
        for name, value, low in (
            ("timeout", timeout, 1e-9), ("startup_wait", startup_wait, 0), ("retries", retries, 0)
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(f"RemoteScorer: {name} must be a number >= {low:g}, got {value!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.startup_wait = startup_wait
        self.retries = int(retries)
        self._token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self._hint_name = expected_name or "SCORER"
        info = self._request("GET", "/info", retry_for=startup_wait)
        if info.get("wire_version") != WIRE_VERSION:
            raise RemoteScorerError(
                f"scorer server at {self.url} speaks wire version {info.get('wire_version')!r}, this client "
                f"{WIRE_VERSION}: install the same flowopd version in both environments"
            )
        if expected_name is not None and info["name"] != expected_name:
            raise RemoteScorerError(
                f"scorer server at {self.url} serves {info['name']!r}, expected {expected_name!r}: check the port"
            )
        self.name: str = info["name"]
        self.version: str = info["version"]
        self.higher_is_better: bool = bool(info["higher_is_better"])
        self.scale = Scale(float(info["scale"]["low"]), float(info["scale"]["high"]))
        self.max_batch: int = int(info["max_batch"])
        self.max_request_bytes: int = int(info["max_request_bytes"])
        self.max_side: int | None = info.get("max_side")  # absent on servers older than the limits
        self.max_request_pixels: int | None = info.get("max_request_pixels")
        self._hint_name = self.name

    def __repr__(self) -> str:
        return f"RemoteScorer({self.url!r}, name={self.name!r}, version={self.version!r})"

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _unreachable(self, error: BaseException, waited: float) -> ScorerServerUnreachable:
        waited_note = (
            f"; waited {waited:.0f} s - if it is still loading its model, pass a larger startup_wait"
            if waited >= 1
            else ""
        )
        return ScorerServerUnreachable(
            f"scorer server at {self.url} is not reachable: start it with "
            f"`python -m flowopd.bench serve {self._hint_name}` (or its nox session, see docs/scorers/server.md) "
            f"[{error}{waited_note}]"
        )

    def _backoff(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(0.1 * 2 ** (attempt - 1), 5.0) * random.uniform(0.5, 1.5)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
        time.sleep(delay)

    def _request(self, method: str, path: str, payload: bytes | None = None, retry_for: float = 0.0) -> Any:
        """One JSON request. Retries while the connection is refused, for at most ``retry_for`` seconds, and
        after a 503 or a reset connection, at most ``self.retries`` times."""
        start = time.monotonic()
        deadline = start + retry_for
        delay, attempt = 0.05, 0
        while True:
            req = urllib.request.Request(self.url + path, data=payload, method=method)
            if payload is not None:
                req.add_header("Content-Type", "application/json")
            if self._token:
                req.add_header("Authorization", f"Bearer {self._token}")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = resp.read()
                break
            except urllib.error.HTTPError as e:
                if e.code == 503 and attempt < self.retries:
                    attempt += 1
                    retry_after = e.headers.get("Retry-After")
                    e.close()
                    self._backoff(attempt, retry_after)
                    continue
                raise self._http_error(e) from None
            except (OSError, http.client.HTTPException) as e:  # URLError wraps most socket errors in .reason
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                # A refused connection is certainly "not started yet" and safe to resend.
                if isinstance(reason, ConnectionRefusedError) and time.monotonic() + delay <= deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if isinstance(reason, TimeoutError):
                    raise RemoteScorerError(
                        f"scorer server at {self.url} did not answer {method} {path} within {self.timeout} s; "
                        "pass a larger RemoteScorer(timeout=...) or send smaller batches"
                    ) from e
                dropped = isinstance(reason, (ConnectionError, http.client.HTTPException))
                if dropped and not isinstance(reason, ConnectionRefusedError):
                    if attempt < self.retries:
                        attempt += 1
                        self._backoff(attempt)
                        continue
                    raise RemoteScorerError(
                        f"scorer server at {self.url} dropped the connection during {method} {path} "
                        f"{attempt + 1} times ({type(reason).__name__}: {reason}); did it crash? see its log"
                    ) from e
                raise self._unreachable(reason, time.monotonic() - start) from e
        try:
            return json.loads(data)
        except ValueError as e:
            raise RemoteScorerError(
                f"the answer of {self.url}{path} is not JSON: is a flowopd scorer server listening there?"
            ) from e

    def _http_error(self, error: urllib.error.HTTPError) -> RemoteScorerError:
        body = error.read()
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body.decode("utf-8", "replace")[:500] or error.reason
        return RemoteScorerError(f"scorer server at {self.url} answered {error.code}: {message}", error.code)

    # -- scoring ---------------------------------------------------------------------------------------------

    def _chunks(
        self, pngs: Sequence[str], prompts: Sequence[str], metadata: Sequence[str], pixels: int
    ) -> Iterator[slice]:
        """Consecutive slices within ``max_batch``, ``max_request_bytes`` and ``max_request_pixels``."""
        per_request = self.max_batch
        if self.max_request_pixels:
            per_request = min(per_request, self.max_request_pixels // pixels)
        start, size = 0, _REQUEST_OVERHEAD
        for i in range(len(pngs)):
            item = len(pngs[i]) + len(prompts[i]) + len(metadata[i]) + 3 * _PER_IMAGE_OVERHEAD
            if item + _REQUEST_OVERHEAD > self.max_request_bytes:
                raise RemoteScorerError(
                    f"image {i} alone ({item} bytes encoded) exceeds the server's max_request_bytes="
                    f"{self.max_request_bytes}; restart the server with a larger --max-request-bytes"
                )
            if i - start == per_request or size + item > self.max_request_bytes:
                yield slice(start, i)
                start, size = i, _REQUEST_OVERHEAD
            size += item
        if start < len(pngs):
            yield slice(start, len(pngs))

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        """Score on the server; identical to the served scorer's ``score(quantise_uint8(images), ...)``."""
        arrays = to_uint8_hwc(images)
        n = len(arrays)
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"got {n} images, {len(prompts)} prompts and {len(metadata)} metadata rows")
        if n == 0:
            return ScoreBatch(np.zeros(0))
        height, width = arrays.shape[1:3]
        if self.max_side and max(height, width) > self.max_side:
            raise RemoteScorerError(f"images of {width}x{height} exceed the server's max_side={self.max_side}; "
                                    "resize them or restart the server with a larger --max-side")
        if self.max_request_pixels and height * width > self.max_request_pixels:
            raise RemoteScorerError(f"one {width}x{height} image exceeds the server's max_request_pixels="
                                    f"{self.max_request_pixels}; restart the server with a larger "
                                    "--max-request-pixels")
        pngs = [encode_png(a) for a in arrays]
        prompt_json = [json.dumps(p) for p in prompts]
        meta_json = []
        for i, m in enumerate(metadata):
            try:
                meta_json.append(json.dumps(dict(m), allow_nan=False))
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata[{i}] is not JSON-serialisable ({e}): {m!r}") from e
        batches = []
        for part in self._chunks(pngs, prompt_json, meta_json, height * width):
            body = (
                '{"images": ["' + '", "'.join(pngs[part]) + '"], '
                '"prompts": [' + ", ".join(prompt_json[part]) + "], "
                '"metadata": [' + ", ".join(meta_json[part]) + "]}"
            ).encode("utf-8")
            batches.append(
                decode_batch(self._request("POST", "/score", body, retry_for=min(self.startup_wait, 5.0)))
            )
        return ScoreBatch.concat(batches)

    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` answer (status, scorer, requests and images scored so far)."""
        return self._request("GET", "/health")
