"""``python -m flowopd.train publish RUN_OR_CHECKPOINT NAME``: install a trained model under a checkpoint name.

The table recipes (reports/tables/*.toml, ``recipe.mini``) train into ``runs/`` and then publish the result
as ``mini:NAME`` (flowopd/assets/mini/NAME/), the name the tables and the downstream recipes (teachers of
OPD, the merge) refer to. The source is

- a training run directory (GRPO, OPD, SFT): the adapter of its newest ``checkpoints/iteration-N``;
- a checkpoint or adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``);
- a mini model directory written by pretraining (``config.json`` + ``model.safetensors``).

The copy is atomic (a temporary directory renamed over the old one); files that do not belong to a model
(README.md, train_log.csv) in an existing destination are kept. The source's files are checked whole (a torn
safetensors file is refused, not published), and the destination must be a new directory or a published model:
``mini:NAME`` is one plain name, and a directory holding anything else (subdirectories, other files only) is
refused rather than replaced.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MINI_FILES = ("config.json", "model.safetensors")
_MINI_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def model_files(source: Path) -> list[Path]:
    """The files to publish from ``source`` (see the module docstring); raises FileNotFoundError."""
    from flowopd.models.loading import model_dir

    source = model_dir(str(source))  # a run's newest checkpoint, a checkpoint's adapter/
    from flowopd.train.runs import CheckpointError, file_problem

    for names in (ADAPTER_FILES, MINI_FILES):
        if all((source / n).is_file() for n in names):
            for n in names:
                problem = file_problem(source / n)
                if problem:
                    raise CheckpointError(f"{source / n}: {problem}; nothing published")
            return [source / n for n in names]
    raise FileNotFoundError(
        f"{source}: nothing to publish; expected a run directory with checkpoints/, an adapter directory "
        f"({', '.join(ADAPTER_FILES)}) or a mini model directory ({', '.join(MINI_FILES)})"
    )


def publish(source: str | Path, name: str | Path) -> Path:
    """Copy the model of ``source`` to where ``name`` (``mini:NAME`` or a directory) resolves; returns it."""
    from flowopd.models.loading import checkpoint_dir

    name = str(name)
    if name.startswith("mini:") and not _MINI_NAME.fullmatch(name.removeprefix("mini:")):
        raise ValueError(f"publish: {name!r} is not a checkpoint name (mini:NAME with NAME made of letters, digits, "
                         f"'.', '_' and '-')")
    files = model_files(Path(source))
    dest = checkpoint_dir(name)
    if dest.exists():
        others = [p.name for p in dest.iterdir() if p.is_dir()] if dest.is_dir() else [dest.name]
        if not others and dest.is_dir() and any(dest.iterdir()) and not any(
            (dest / n).is_file() for n in ADAPTER_FILES + MINI_FILES
        ):
            others = sorted(p.name for p in dest.iterdir())
        if others:
            raise ValueError(f"publish: {dest} exists and is not a published model (it holds {', '.join(others[:3])}); "
                             f"choose a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        if dest.is_dir():
            for old in dest.iterdir():  # keep the documentation and logs that sit beside the model
                if old.is_file() and old.name not in ADAPTER_FILES + MINI_FILES:
                    shutil.copy2(old, tmp / old.name)
        for f in files:
            shutil.copy2(f, tmp / f.name)
        if files[0].name == ADAPTER_FILES[0]:
            json.loads((tmp / ADAPTER_FILES[0]).read_text())  # a torn copy fails here, not in a later load
        old_dir = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            if old_dir.exists():
                shutil.rmtree(old_dir)
            dest.rename(old_dir)
        tmp.rename(dest)
        if old_dir.exists():
            shutil.rmtree(old_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """``publish RUN_OR_CHECKPOINT NAME`` (the arguments after the subcommand)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print("usage: python -m flowopd.train publish RUN_OR_CHECKPOINT_DIR NAME  (NAME: mini:NAME or a directory)")
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    dest = publish(args[0], args[1])  # errors end at python -m flowopd.train's boundary
    print(f"published {args[0]} as {args[1]} ({dest})")
    return 0
