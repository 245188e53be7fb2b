"""``check``: compare a run's metrics with floors; a model team's CI gate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def load_thresholds(path: str | Path, section: str | None, checkpoint: str) -> dict[str, float]:
    """Floors for one checkpoint: ``[floors."<checkpoint>"]`` if present, else ``[floors.default]``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: thresholds file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    floors = data.get("floors", {})
    name = section or (checkpoint if checkpoint in floors else "default")
    if name not in floors:
        raise KeyError(f"{path}: no [floors.{name!r}] section (sections: {', '.join(floors) or 'none'})")
    if not isinstance(floors[name], dict):
        raise ValueError(f"{path}: [floors.{name!r}] must be a table of \"benchmark/metric\" = number")
    bad = [k for k, v in floors[name].items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{path}: [floors.{name!r}] {bad[0]!r} must be a finite number, got {floors[name][bad[0]]!r}")
    return {k: float(v) for k, v in floors[name].items()}


def check_floors(results: dict[str, Any], floors: dict[str, float]) -> list[str]:
    """One message per metric under its floor (or missing); empty when all pass."""
    failures = []
    metrics = results["metrics"]
    for metric, floor in sorted(floors.items()):
        value = metrics.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            failures.append(f"{metric}: missing from {results.get('_path', 'results')} (floor {floor:g})")
        elif value < floor:
            failures.append(f"{metric}: {value:.4f} is below its floor {floor:.4f}")
    return failures
