"""Which engine made a score: the label ``results.json`` keeps for every benchmark (docs/scorers/parity.md).

A scorer states its engine inside its ``version`` string, as ``key=value`` fields separated by ``;``::

    ...;engine=image-reward;engine_version=1.5;checkpoint=THUDM/ImageReward:ImageReward.pt;precision=fp32;official=1

so that the label travels wherever the version does (the scorer server's ``/info``, the per-sample rows, the
score cache key) and a scorer served from another environment is labelled by the environment that ran it.
``official=1`` means the score was computed by the benchmark's official code (its package at the official
version) on its official checkpoint; a port, a substitute engine, or an injected (test) model is ``official=0``.
The mini world's exact scorers define their own benchmarks, so they are their own official engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from typing import Any

ENGINE_KEYS = ("engine", "engine_version", "checkpoint", "precision", "official")
MINI_ENGINE = "flowopd-mini-world"


def package_version(name: str) -> str:
    """The installed version of a distribution, or ``"not-installed"``."""
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "not-installed"


def engine_fields(engine: str, engine_version: str, checkpoint: str, precision: str, official: bool) -> str:
    """The ``;``-separated fields a scorer appends to its version string (values must not contain ``;``)."""
    values = (engine, engine_version, checkpoint, precision, "1" if official else "0")
    for key, value in zip(ENGINE_KEYS, values):
        if ";" in str(value):
            raise ValueError(f"engine field {key}={value!r} contains ';', which separates version fields")
    return ";".join(f"{k}={v}" for k, v in zip(ENGINE_KEYS, values))


def version_fields(version: str) -> dict[str, str]:
    """``key=value`` fields of a version string (fields without ``=`` are skipped; the last value wins)."""
    out = {}
    for part in str(version).split(";"):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def engine_record(scorer: Any, rows: Any = None) -> dict[str, Any]:
    """The engine label of a scorer: engine, its version, checkpoint id, precision and ``official``.

    ``rows`` (the per-sample rows, a DataFrame) adds ``parse_failures`` where the scorer reports a
    ``parse_ok`` detail (the Qwen-VL judge), so that the count is recorded whatever the failure policy.
    A scorer whose version carries no engine fields gets ``official: None`` (unknown).
    """
    name = str(getattr(scorer, "name", ""))
    version = str(getattr(scorer, "version", ""))
    fields = version_fields(version)
    if "engine" in fields:
        record: dict[str, Any] = {key: fields.get(key, "unknown") for key in ENGINE_KEYS}
        record["official"] = fields.get("official") == "1"
    elif name.startswith("mini-"):
        record = {"engine": MINI_ENGINE, "engine_version": version, "checkpoint": "none (exact scorer)",
                  "precision": "exact", "official": True}
    else:
        record = {"engine": "unknown", "engine_version": version, "checkpoint": "unknown",
                  "precision": "unknown", "official": None}
    if rows is not None and "parse_ok" in getattr(rows, "columns", ()):
        record["parse_failures"] = int((~rows["parse_ok"].fillna(True).astype(bool)).sum())
    return record


def is_official(entry: Mapping[str, Any]) -> bool | None:
    """A results.json benchmark entry's ``engine.official`` (None when the entry predates engine labels)."""
    engine = entry.get("engine")
    if not isinstance(engine, Mapping):
        return None
    return engine.get("official")
