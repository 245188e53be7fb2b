"""``results.json``: one typed record of a run - metrics with intervals, scorer versions, package
versions, the git revision and the generation settings. ``check`` and ``report`` read only this.

Schema 1 grew without breaking older records: ``identity`` (the checkpoint's, flowopd.models.loading.
Checkpoint.identity) and, per benchmark, ``n_prompts_total`` (the prompts the benchmark has), ``prompts_sha256``,
``prompts_pinned`` and ``image_matching``. Records written before them still load; :func:`coverage` then calls a
benchmark partial when it was run with a ``limit``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
PACKAGES = ("flowopd", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pillow", "pandas")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


#: the committed golden records live here: their changes never make a record's revision dirty
RECORDS_DIR = "reports"


def git_revision(root: str | Path | None = None) -> str | None:
    """The git revision of the project (or of the checkout at ``root``), or None outside a checkout.

    ``-dirty`` is appended only when tracked files outside ``reports/`` differ from it: a record regenerated there
    does not taint the next one, while any change to code, specs or configs does (untracked files never count).
    """
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                f":(top,exclude){RECORDS_DIR}"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json (or a run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run `python -m flowopd.bench evaluate` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: results schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
    data["_path"] = str(path)
    return data


def new_results(checkpoint: str, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "checkpoint": checkpoint,
        "identity": dict(identity) if identity is not None else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "benchmarks": {},
        "metrics": {},
    }


def save_results(results: dict[str, Any], run_dir: Path) -> Path:
    """Write atomically; ``metrics`` is rebuilt as the flat ``{"bench/metric": value}`` view."""
    results = {k: v for k, v in results.items() if not k.startswith("_")}
    results["metrics"] = {
        f"{bench}/{name}": m["value"]
        for bench, entry in sorted(results["benchmarks"].items())
        for name, m in entry["metrics"].items()
    }
    path = run_dir / "results.json"
    tmp = path.with_name("results.json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return path


def coverage(entry: Mapping[str, Any]) -> tuple[int, int | None]:
    """(prompts scored, prompts the benchmark has) of one benchmark entry of results.json; the total is None in
    records written before it was recorded."""
    return int(entry.get("n_prompts", 0)), entry.get("n_prompts_total")


def is_partial(entry: Mapping[str, Any]) -> bool:
    """Whether a benchmark entry covers fewer prompts than the benchmark has (older records: run with a limit)."""
    scored, total = coverage(entry)
    return scored < total if total is not None else entry.get("limit") is not None


def partial_note(entry: Mapping[str, Any]) -> str:
    """``partial: 3 of 96 prompts`` for a partial entry (``partial: --limit 3`` for older records); else ''."""
    if not is_partial(entry):
        return ""
    scored, total = coverage(entry)
    return f"partial: {scored} of {total} prompts" if total is not None else f"partial: --limit {entry['limit']}"


def partial_benchmarks(results: Mapping[str, Any]) -> dict[str, str]:
    """Benchmark name -> :func:`partial_note` for every partial benchmark of a results record."""
    return {name: partial_note(e) for name, e in sorted(results.get("benchmarks", {}).items()) if is_partial(e)}
