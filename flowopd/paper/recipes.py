"""The training recipes behind the paper's rows: each a list of ``python -m flowopd.train ...`` commands
(``recipe.<preset>`` of a row in ``reports/tables/*.toml``), run in this process."""

from __future__ import annotations

import logging
import shlex
from typing import Any

from flowopd.paper.checkpoints import checkpoint_available
from flowopd.train.__main__ import main as train_main

logger = logging.getLogger(__name__)


def run_recipe(command: str, prefix: str) -> None:
    """Run one recipe step ``python -m flowopd.train COMMAND`` in this process (logged after ``prefix``);
    raise if it fails."""
    logger.info("%s: python -m flowopd.train %s", prefix, command)
    code = train_main(shlex.split(command))
    if code:
        raise RuntimeError(f"recipe `python -m flowopd.train {command}` failed with exit code {code}")


def retrain(table: dict[str, Any], preset: str, force: bool = False) -> None:
    """Run the recipe of every row whose checkpoint is missing (all rows with ``force``), in table order."""
    for row in table["rows"]:
        checkpoint = row["run"][preset]
        if checkpoint_available(checkpoint) and not force:
            continue
        for command in row.get("recipe", {}).get(preset, []):
            run_recipe(command, f"[{table['name']}] {row['label']}")
