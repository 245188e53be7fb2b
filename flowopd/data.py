"""Prompt sets: download from the pinned public origin, verify sha256, cache; or read a local copy.

Lookup order for a file ``spec.path`` (the path column of ``../shared/data/MANIFEST.tsv``):
1. ``$FLOWOPD_DATA_DIR/<path>`` when the variable is set (tests and CI point it at ``../shared/data``);
2. the user cache (``$FLOWOPD_CACHE_DIR`` or the platform cache dir) ``/data/<path>``;
3. a download from ``spec.url`` (a raw file pinned to a commit), verified, then written atomically to the cache.
Every copy is checked against ``spec.sha256``; a mismatch is an error, never silently accepted. A set without
a pinned sha256 (a public file that could not be obtained when its spec was written) is hashed when first fetched:
the hash is kept beside the cached copy and checked on every later load, :func:`prompt_set_sha256` goes into the
results of every run, and an :class:`UnpinnedPromptSetWarning` names the set each time it is loaded.

Generated sets (``format = "python"``) name a loader registered in ``flowopd.registry.PROMPT_LOADERS``; nothing
else is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowopd.registry import PROMPT_LOADERS, UnknownNameError
from flowopd.specs import PromptSetSpec


class PromptFileError(ValueError):
    """A prompt file that cannot be used: its message names the file (and line) at fault."""


class UnpinnedPromptSetWarning(UserWarning):
    """A prompt file whose spec pins no sha256: the hash it had when first fetched is used and recorded."""


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


def _warn_unpinned(spec: PromptSetSpec, path: Path, digest: str) -> None:
    warnings.warn(UnpinnedPromptSetWarning(
        f"prompt set {spec.path} is unpinned (its spec has no sha256): using {path}, sha256 {digest} "
        f"(recorded in results.json); pin it with sha256 = \"{digest}\""), stacklevel=3)


def _first_fetch_hash(spec: PromptSetSpec, cached: Path) -> Path:
    """An unpinned cached file against the hash recorded when it was first fetched (``<file>.sha256``)."""
    record = cached.with_name(cached.name + ".sha256")
    actual = sha256_file(cached)
    if record.is_file() and record.read_text().strip() != actual:
        raise PromptFileError(f"{cached}: changed since it was first fetched (sha256 {record.read_text().strip()}, "
                              f"now {actual}); delete it and its .sha256 to fetch it again")
    if not record.is_file():
        record.write_text(actual + "\n")
    _warn_unpinned(spec, cached, actual)
    return cached


def fetch_prompt_file(spec: PromptSetSpec) -> Path:
    """The verified local path of a prompt file, downloading it into the cache if needed."""
    if not spec.path:
        raise PromptFileError(f"prompt set of format {spec.format!r} has no path")
    local_dir = os.environ.get("FLOWOPD_DATA_DIR")
    if local_dir:
        candidate = Path(local_dir) / spec.path
        if candidate.is_file():
            if not spec.sha256:
                _warn_unpinned(spec, candidate, sha256_file(candidate))
            return _verified(candidate, spec.sha256)
    cached = cache_root() / "data" / spec.path
    if cached.is_file():
        return _verified(cached, spec.sha256) if spec.sha256 else _first_fetch_hash(spec, cached)
    if not spec.url:
        raise PromptFileError(f"{spec.path}: not found in {_where(local_dir)} nor in the cache {cache_root()}, and "
                              f"no url to download it from; {DATA_HINT}")
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise PromptFileError(
            f"{spec.path}: could not download {spec.url} ({e}); put a copy at <dir>/{spec.path} "
            f"in {_where(local_dir)}, e.g. FLOWOPD_DATA_DIR=../shared/data ({DATA_HINT})"
        ) from None
    actual = hashlib.sha256(payload).hexdigest()
    if spec.sha256 and actual != spec.sha256:
        raise PromptFileError(f"{spec.url}: sha256 mismatch (expected {spec.sha256}, got {actual})")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, cached)
    return cached if spec.sha256 else _first_fetch_hash(spec, cached)


def _where(local_dir: str | None) -> str:
    return f"$FLOWOPD_DATA_DIR ({local_dir})" if local_dir else "a directory named by $FLOWOPD_DATA_DIR (not set)"


#: how to obtain the prompt files offline (README.md, "Data")
DATA_HINT = ("the README's Data section says how to get a copy of every prompt file (each benchmarks/*.toml pins its "
             "url and sha256)")


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
        try:
            loader = PROMPT_LOADERS.get(PROMPT_LOADERS.name_of(spec.loader))
        except UnknownNameError as e:
            raise PromptFileError(f"prompt set loader: {e}") from None
        try:
            rows = list(loader(**spec.args))
        except TypeError as e:
            raise PromptFileError(f"prompt set loader {spec.loader!r}: bad args {spec.args!r} ({e})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping) or not isinstance(row.get("prompt"), str):
                raise PromptFileError(f"{spec.loader}: item {i} has no string 'prompt'")
        return rows
    return parse_prompt_file(fetch_prompt_file(spec), spec)


def prompt_set_sha256(prompts: Sequence[Mapping[str, Any]]) -> str:
    """The sha256 of a loaded prompt set (every row's metadata, canonical JSON): what a run was scored on,
    whether the set is a pinned file, an unpinned one or generated."""
    h = hashlib.sha256()
    for row in prompts:
        h.update(json.dumps(dict(row), sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()
