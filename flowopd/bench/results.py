"""``results.json``: one typed record of a run - metrics with intervals, scorer versions, package
versions, the git revision and the generation settings. ``check`` and ``report`` read only this."""

from __future__ import annotations

import json
import os
import platform
import subprocess
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


def git_revision() -> str | None:
    """The project's git revision (with ``-dirty`` when the tree has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
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


def new_results(checkpoint: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "checkpoint": checkpoint,
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
