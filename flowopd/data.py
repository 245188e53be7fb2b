"""Prompt sets: download from the pinned public origin, verify sha256, cache; or read a local copy.

Lookup order for a file ``spec.path`` (the path column of ``../shared/data/MANIFEST.tsv``):
1. ``$FLOWOPD_DATA_DIR/<path>`` when the variable is set (tests and CI point it at ``../shared/data``);
2. the user cache (``$FLOWOPD_CACHE_DIR`` or the platform cache dir) ``/data/<path>``;
3. a download from ``spec.url`` (a raw file pinned to a commit), verified, then written atomically to the cache.
Every copy is checked against ``spec.sha256``; a mismatch is an error, never silently accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flowopd.bench.spec import PromptSetSpec
from flowopd.registry import import_string


class PromptFileError(ValueError):
    """A prompt file that cannot be used: its message names the file (and line) at fault."""


def cache_root() -> Path:
    if os.environ.get("FLOWOPD_CACHE_DIR"):
        return Path(os.environ["FLOWOPD_CACHE_DIR"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("flowopd"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, sha256: str) -> Path:
    if sha256:
        actual = sha256_file(path)
        if actual != sha256:
            raise PromptFileError(
                f"{path}: sha256 mismatch (expected {sha256}, got {actual}); the file is not the pinned version"
            )
    return path


def fetch_prompt_file(spec: PromptSetSpec) -> Path:
    """The verified local path of a pinned prompt file, downloading it into the cache if needed."""
    if not spec.path:
        raise PromptFileError(f"prompt set of format {spec.format!r} has no path")
    local_dir = os.environ.get("FLOWOPD_DATA_DIR")
    if local_dir:
        candidate = Path(local_dir) / spec.path
        if candidate.is_file():
            return _verified(candidate, spec.sha256)
    cached = cache_root() / "data" / spec.path
    if cached.is_file():
        return _verified(cached, spec.sha256)
    if not spec.url:
        raise PromptFileError(f"{spec.path}: not found locally and no url to download it from")
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        where = f"$FLOWOPD_DATA_DIR ({local_dir})" if local_dir else "a directory named by $FLOWOPD_DATA_DIR"
        raise PromptFileError(
            f"{spec.path}: could not download {spec.url} ({e}); put a copy at <dir>/{spec.path} "
            f"in {where}, e.g. FLOWOPD_DATA_DIR=../shared/data"
        ) from None
    actual = hashlib.sha256(payload).hexdigest()
    if spec.sha256 and actual != spec.sha256:
        raise PromptFileError(f"{spec.url}: sha256 mismatch (expected {spec.sha256}, got {actual})")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, cached)
    return cached


def parse_prompt_file(path: Path, spec: PromptSetSpec) -> list[dict[str, Any]]:
    """Parse a prompt file into metadata dicts that each carry ``"prompt"``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e})") from None
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if spec.format == "jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get(spec.prompt_field), str):
                raise PromptFileError(f"{path}:{lineno}: expected an object with a string {spec.prompt_field!r}")
            row = {**row, "prompt": row[spec.prompt_field]}
        elif spec.format == "lines":
            row = {"prompt": line.strip()}
        else:
            raise PromptFileError(f"{path}: unknown prompt format {spec.format!r} (jsonl, lines, python)")
        if spec.category:
            row.setdefault("category", spec.category)
        rows.append(row)
    if not rows:
        raise PromptFileError(f"{path}: no prompts")
    return rows


def load_prompts(spec: PromptSetSpec) -> list[dict[str, Any]]:
    """The prompt set of a benchmark as a list of metadata dicts (each with ``"prompt"``)."""
    if spec.format == "python":
        rows = list(import_string(spec.loader)(**spec.args))
        for i, row in enumerate(rows):
            if not isinstance(row.get("prompt"), str):
                raise PromptFileError(f"{spec.loader}: item {i} has no string 'prompt'")
        return rows
    return parse_prompt_file(fetch_prompt_file(spec), spec)
