"""Which checkpoint stands in each row: the SD3.5-M checkpoint list and the availability of a checkpoint.

The list (``reports/sd35m_checkpoints.toml``, edited by the user) names, for the sd35m preset, each table row's
checkpoint (``[checkpoints]``) and the GRPO run directories of the seesaw (``[seesaw]``). It is found, in order:
the ``--config`` flag, the ``FLOWOPD_SD35M_CHECKPOINTS`` environment variable, the project's own
``reports/sd35m_checkpoints.toml`` - never through the working directory. An installed wheel has no project
directory: it carries the template (``flowopd/_data/sd35m_checkpoints.toml``), which the error then names, to be
copied and given by the flag or the variable.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flowopd.bench.weights import weights_cached
from flowopd.errors import UserError
from flowopd.models.loading import checkpoint_dir

ENV = "FLOWOPD_SD35M_CHECKPOINTS"
FILENAME = "sd35m_checkpoints.toml"
PACKAGE = Path(__file__).resolve().parents[1]


class MissingCheckpointsError(FileNotFoundError):
    """Rows of a table whose checkpoints are not available; the message lists them all."""


def project_root() -> Path | None:
    """The project directory flowopd runs from (a checkout: pyproject.toml beside the package), or None when it
    is installed as a wheel."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "reports").is_dir() else None


def template() -> Path:
    """The committed template of the list: the project's own file, or the wheel's copy of it."""
    root = project_root()
    return root / "reports" / FILENAME if root is not None else PACKAGE / "_data" / FILENAME


def checkpoint_list_path(config: Path | None = None) -> tuple[Path, str]:
    """(path of the list, where it was named: ``--config``, the environment variable, or '' for the project's)."""
    if config is not None:
        return Path(config), "--config"
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser(), ENV
    root = project_root()
    if root is None:
        raise MissingCheckpointsError(
            f"no SD3.5-M checkpoint list: flowopd is installed without its project directory; copy {template()}, "
            f"fill in your checkpoints and name it with --config FILE or {ENV}=FILE"
        )
    return root / "reports" / FILENAME, ""


def read_checkpoint_list(config: Path | None, section: str, todo: str) -> tuple[Path, dict[str, str]]:
    """(path, ``{label: path or hub id}``) of one table of the list (``checkpoints`` or ``seesaw``); ``todo``
    finishes the message when the file is missing (what to fill in)."""
    path, origin = checkpoint_list_path(config)
    if not path.is_file():
        named = f"{origin} {path}" if origin == "--config" else f"{origin}={path}" if origin else str(path)
        raise MissingCheckpointsError(f"{named}: no such file; copy reports/{FILENAME} and {todo}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise UserError(f"{path}: [{section}] must be a table of \"label\" = \"path\" lines, got {table!r}")
    for label, value in table.items():
        if not isinstance(value, str):
            raise UserError(f"{path}: [{section}] {label!r} must be a path or hub id in quotes, got {value!r}")
    return path, table


def checkpoint_available(checkpoint: str) -> bool:
    """Whether a row's checkpoint can be evaluated here: a directory, a mini checkpoint, or a hub id in the local
    cache (nothing is downloaded)."""
    if not checkpoint:
        return False
    if checkpoint_dir(checkpoint).is_dir():
        return True
    if checkpoint.startswith("mini:") or checkpoint.startswith((".", "/")):
        return False
    return weights_cached(f"{checkpoint}:model_index.json")
