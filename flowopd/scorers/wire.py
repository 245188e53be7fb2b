"""The scorer server's wire format (version 1), imported by both sides: ``server.py`` and ``client.py``.

Safe by construction - JSON and PNG only, never pickle:

- ``GET /info``   -> ``{"name", "version", "higher_is_better", "scale": {"low", "high"}, "max_batch",
  "max_request_bytes", "max_side", "max_request_pixels", "wire_version"}``
- ``GET /health`` -> ``{"status": "ok", "scorer", "requests", "images", "busy_refusals"}``
- ``POST /score`` (``Content-Type: application/json``) with ``{"images": [base64 PNG, ...], "prompts": [str,
  ...], "metadata": [object, ...]}`` -> ``{"scores": [float | null, ...], "details": {name: [value, ...]},
  "nonfinite": {name: {index: "nan"}}}``; a NaN score travels as ``null`` and +-inf as the strings ``"inf"`` /
  ``"-inf"``; a non-finite detail float as ``null`` plus its entry in ``nonfinite``, so that every value comes
  back as it left.
- Every request carries ``Authorization: Bearer <token>`` when the server has a token (:data:`TOKEN_ENV`).
- Errors are JSON ``{"error": message, "status": code}`` (docs/scorers/server.md lists the statuses).

Images travel as lossless 8-bit RGB PNGs, so the scorer sees exactly ``quantise_uint8(images)``: the same
8-bit quantisation as the image cache. Limits (:class:`Limits`) are checked on the PNG headers - 33 bytes
decoded from the first 44 base64 characters of each image - before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowopd.scorers.base import ScoreBatch, to_uint8_hwc

WIRE_VERSION = 1
#: the environment variable both sides read the shared secret from
TOKEN_ENV = "FLOWOPD_SCORER_TOKEN"
#: a token shorter than this is refused (guessable)
MIN_TOKEN_LENGTH = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# signature (8) + IHDR length (4) + b"IHDR" (4) + width, height, depth, colour type, ... (13) + CRC (4)
_PNG_HEADER_BYTES = 33
_PNG_HEADER_B64 = 44  # base64 characters that decode to exactly those 33 bytes
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}  # PNG colour type -> PIL's mode name
REQUEST_KEYS = ("images", "prompts", "metadata")


class PayloadError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one ``POST /score`` may carry; the server checks all of it before decoding a pixel.

    Memory: one request holds at most ``max_request_bytes`` of JSON and ``max_request_pixels`` decoded pixels
    (3 bytes each as uint8, 12 as the float32 batch the scorer gets); the server decodes at most ``workers``
    requests at a time.
    """

    max_batch: int = 64
    max_request_bytes: int = 64 * 2**20  # 64 PNGs of 512x512 noise fit; real generations compress better
    max_side: int = 4096
    max_request_pixels: int = 64 * 512 * 512  # 64 images of 512x512, or 16 of 1024x1024

    def __post_init__(self) -> None:
        for field in ("max_batch", "max_request_bytes", "max_side", "max_request_pixels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")

    def to_info(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "max_request_bytes": self.max_request_bytes,
                "max_side": self.max_side, "max_request_pixels": self.max_request_pixels}


# ----------------------------------------------------------------------------------------------------------
# images <-> base64 PNG


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


def png_header(text: Any, index: int) -> tuple[int, int, str]:
    """(width, height, mode) of base64 PNG text, read from its first 44 characters without decoding pixels."""
    if not isinstance(text, str):
        raise PayloadError(f"image {index}: expected a base64 string of PNG bytes, got {type(text).__name__}")
    try:
        head = base64.b64decode(text[:_PNG_HEADER_B64], validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"image {index}: not valid base64 ({e})") from e
    if not head.startswith(PNG_SIGNATURE):
        raise PayloadError(f"image {index}: not a PNG (the bytes do not start with the PNG signature)")
    if len(head) < _PNG_HEADER_BYTES or head[12:16] != b"IHDR":
        raise PayloadError(f"image {index}: corrupt PNG (no IHDR header after the signature)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    mode = _PNG_MODES.get(colour, f"colour type {colour}") + ("" if depth == 8 else f";{depth}")
    return width, height, mode


def _check_image(width: int, height: int, mode: str, index: int, limits: Limits) -> None:
    if mode != "RGB":
        raise PayloadError(f"image {index}: expected an 8-bit RGB PNG, got mode {mode!r}; send (N, 3, H, W) images")
    if width == 0 or height == 0:
        raise PayloadError(f"image {index}: corrupt PNG (its header says {width}x{height})")
    if width > limits.max_side or height > limits.max_side:
        raise PayloadError(f"image {index}: {width}x{height} exceeds the server's max_side={limits.max_side}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def check_headers(images: list[Any], limits: Limits) -> None:
    """Every image's size and mode from its PNG header, against ``limits`` (no pixel is decoded)."""
    total, first = 0, None
    for i, text in enumerate(images):
        width, height, mode = png_header(text, i)
        _check_image(width, height, mode, i, limits)
        if first is None:
            first = (width, height)
        elif (width, height) != first:
            raise PayloadError(f"all images in one request must share one size, got {first[0]}x{first[1]} "
                               f"(image 0) and {width}x{height} (image {i})")
        total += width * height
        if total > limits.max_request_pixels:
            raise PayloadError(f"images 0..{i} hold {total} pixels, over the server's max_request_pixels="
                               f"{limits.max_request_pixels}; send fewer or smaller images (RemoteScorer splits "
                               "for you)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def decode_png(text: Any, index: int, limits: Limits | None = None) -> np.ndarray:
    """base64 PNG text -> (H, W, 3) uint8; a clear ``PayloadError`` naming image ``index`` otherwise.

    The header is checked against ``limits`` (default :class:`Limits`) before the pixels are decoded.
    """
    limits = limits or Limits()
    width, height, mode = png_header(text, index)
    _check_image(width, height, mode, index, limits)
    if width * height > limits.max_request_pixels:
        raise PayloadError(f"image {index}: {width}x{height} is over the server's max_request_pixels="
                           f"{limits.max_request_pixels}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"image {index}: not valid base64 ({e})") from e
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.mode != "RGB" or img.size != (width, height):
                raise PayloadError(f"image {index}: corrupt PNG (decodes as {img.mode} {img.size[0]}x{img.size[1]}"
                                   f", its header says RGB {width}x{height})")
            arr = np.asarray(img, dtype=np.uint8)
    except PayloadError:
        raise
    except Exception as e:  # PIL raises many types on corrupt data; all mean "bad payload"
        raise PayloadError(f"image {index}: corrupt PNG ({type(e).__name__}: {e})") from e
    if arr.shape != (height, width, 3):
        raise PayloadError(f"image {index}: corrupt PNG (decoded to shape {arr.shape})")
    return arr


# ----------------------------------------------------------------------------------------------------------
# scores <-> JSON


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
    raise TypeError(f"{where}: detail values must be JSON scalars (str, float, int, bool, None), got {value!r}")


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


def parse_score_request(
    body: Any, limits: Limits
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Validate a decoded ``/score`` JSON body; return (images (N, 3, H, W) float32, prompts, metadata).

    Types, counts and every PNG header are checked against ``limits`` before the first image is decoded. The
    body's ``images`` list is consumed (each base64 text is dropped once decoded), so the JSON text and the
    decoded pixels are not held in memory together.
    """
    if not isinstance(body, dict):
        raise PayloadError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise PayloadError(f"unknown key(s) {unknown} in the request body; expected {list(REQUEST_KEYS)}")
    images, prompts, metadata = body.get("images"), body.get("prompts"), body.get("metadata")
    if not isinstance(images, list) or not images:
        raise PayloadError("'images' must be a non-empty list of base64 PNG strings")
    n = len(images)
    if n > limits.max_batch:
        raise PayloadError(
            f"batch of {n} images exceeds the server's max_batch={limits.max_batch}; split it "
            "(RemoteScorer does this for you)",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    if not isinstance(prompts, list) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise PayloadError(f"'prompts' must be a list of {n} strings, one per image")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if not isinstance(metadata, list) or len(metadata) != n or not all(isinstance(m, dict) for m in metadata):
        raise PayloadError(f"'metadata' must be a list of {n} JSON objects, one per image")
    check_headers(images, limits)
    width, height, _ = png_header(images[0], 0)
    pixels = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        pixels[i] = decode_png(images[i], i, limits)
        images[i] = None
    return uint8_to_float(pixels), prompts, metadata
