"""A training run's directory told truthfully (issue 19, point 6): which checkpoint a run resumes from, whether
the config it resumes with may differ from the checkpoint's, what changed (``resume_log.jsonl``), one row per
iteration in ``metrics.jsonl``, and a stop - not a silent NaN - when training diverges.

- **Resume** (:func:`prepare_resume`): ``resume = "latest"`` takes the newest checkpoint that is whole; a newer one
  that is not (a truncated safetensors file, a torn zip, unparsable JSON) is set aside as
  ``iteration-N.corrupt`` with a warning. The checkpoint's recorded config is compared with the new one: a
  changed field is refused unless it is one of :data:`RESUME_CHANGEABLE` - the run's length, checkpoint and
  evaluation cadence, logging, threads, where the outputs go - which the resumed run then applies and
  ``resume_log.jsonl`` records (``num_iterations`` only under an lr schedule that does not depend on the run's
  length). ``metrics.jsonl`` keeps the rows up to the resumed iteration, so that the rows the interrupted run
  wrote after its checkpoint are not duplicated. A fresh start (``resume = ""``) refuses a directory that holds
  checkpoints: it would leave another run's newer checkpoints beside its own.
- **Divergence** (:func:`check_health`): after each iteration, before its checkpoint, a non-finite
  ``train/loss`` or adapter (or EMA) weight stops the run with :class:`TrainingDivergedError`; the last good
  checkpoint stays the newest. Under fp16's gradient scaler an overflowing gradient is the skipped step the scaler
  intends; :data:`MAX_SKIPPED_STEPS` of them in a row (:class:`SkippedSteps`) stop the run too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import weakref
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowopd.errors import UserError
from flowopd.train.config import ConfigError, resume_changes

logger = logging.getLogger(__name__)

#: Fields that may differ between a run and its resume. None of them changes the model, the optimizer or the
#: draws that the checkpoint restores; the resumed run applies them as given and ``resume_log.jsonl`` records them.
RESUME_CHANGEABLE = (
    "num_iterations",  # the run's length (the mini teachers went from 36 to 84 iterations so)
    "save_every", "eval_every", "eval_benchmarks", "eval_limit", "eval_batch_size",  # checkpoints, evaluation
    "tensorboard", "progress", "grad_cosine_every", "grad_cosine_prompts",  # logging and diagnostics
    "monitor_probe_every", "monitor_probe_prompts",  # the hacking monitor's probe set (samples, never trains)
    "threads", "reward_workers", "reward.servers",  # how the same computation runs
    "output_dir", "resume",  # where the outputs go and where the run comes from
)
#: lr schedules whose value does not depend on the run's length: only under these may num_iterations change
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
#: optimizer steps in a row that fp16's gradient scaler may skip before the run is stopped
MAX_SKIPPED_STEPS = 20

METRICS_FILE, RESUME_LOG = "metrics.jsonl", "resume_log.jsonl"
_CHECKPOINT_NAME = re.compile(r"iteration-(\d+)")


class CheckpointError(UserError):
    """A checkpoint that cannot be read back (missing, truncated or malformed files)."""


class TrainingDivergedError(UserError):
    """A non-finite loss or weight, or too many skipped fp16 steps in a row: the run stopped."""


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's checkpoint directories ``checkpoints/iteration-N``, oldest first."""
    found = [p for p in (out_dir / "checkpoints").glob("iteration-*") if _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_problem(path: Path, checkpoint_format: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when every file is whole. Cheap: JSON is
    parsed, safetensors headers are checked against the file sizes, zip archives (torch.save) are CRC-checked."""
    state = path / "state"
    try:
        trainer = json.loads((state / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        return f"state/trainer.json: {_reason(e)}"
    if not isinstance(trainer, dict) or trainer.get("format") != checkpoint_format:
        return f"state/trainer.json: not a {checkpoint_format!r} checkpoint"
    missing = [k for k in ("iteration", "optimizer_step", "sampler_rng", "config") if k not in trainer]
    if missing:
        return f"state/trainer.json: no {', '.join(missing)}"
    names = ["state/adapter_live.safetensors", "state/optimizer.pt", "state/scheduler.pt", "state/rng_0.safetensors",
             "state/rng_0.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    if trainer["config"].get("ema"):
        names.append("state/ema.safetensors")
    names += [f"state/{p.name}" for p in state.glob("scaler.pt")]
    for name in names:
        problem = file_problem(path / name)
        if problem:
            return f"{name}: {problem}"
    return None


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file is unreadable (missing, truncated, malformed), by its kind; None when it is whole."""
    if not path.is_file():
        return "missing"
    try:
        if path.suffix == ".safetensors":
            return _safetensors_problem(path)
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad:
                return f"member {bad} fails its CRC check"
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return _reason(e)
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"truncated ({size} bytes, the header alone needs {8 + n})"
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header describes {expected} (truncated or appended to)"
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def prepare_resume(config: Any, out_dir: Path, checkpoint_format: str) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), after the checks of the module docstring; the main
    process sets corrupt checkpoints aside, records the resume and trims ``metrics.jsonl``. Every process of a
    distributed run calls it (it waits for the others)."""
    from accelerate import PartialState

    state = PartialState()
    found = checkpoints(out_dir)
    set_aside: list[tuple[Path, str]] = []
    if not config.resume:
        if found:
            raise ConfigError(
                f"output_dir {out_dir} already holds a run (newest checkpoint {found[-1].name}) and resume = '': "
                f"resume=latest continues it; to start over, delete {out_dir / 'checkpoints'} or choose another "
                f"output_dir"
            )
        path = None
    elif config.resume == "latest":
        path = None
        for candidate in reversed(found):
            problem = checkpoint_problem(candidate, checkpoint_format)
            if problem is None:
                path = candidate
                break
            set_aside.append((candidate, problem))
        if set_aside and path is None:
            raise CheckpointError(
                f"resume = 'latest': no readable checkpoint in {out_dir / 'checkpoints'} "
                f"({'; '.join(f'{p.name}: {why}' for p, why in set_aside)})"
            )
    else:
        path = Path(config.resume)
        if not (path / "state" / "trainer.json").is_file():
            raise FileNotFoundError(f"resume = {config.resume!r}: no training checkpoint there (expected "
                                    f"state/trainer.json)")
        problem = checkpoint_problem(path, checkpoint_format)
        if problem:
            raise CheckpointError(f"resume = {config.resume!r}: the checkpoint cannot be read: {problem}")
    if path is None:
        state.wait_for_everyone()
        if state.is_main_process:
            _trim_metrics(out_dir, None)
        state.wait_for_everyone()
        return None

    trainer = json.loads((path / "state" / "trainer.json").read_text())
    iteration = int(trainer["iteration"])
    changed, added = resume_changes(trainer["config"], config, RESUME_CHANGEABLE, str(path))
    changed.pop("resume", None)  # how this run got here, not a change of the run
    schedule = getattr(config, "lr_scheduler", "constant")
    if "num_iterations" in changed and schedule not in LENGTH_FREE_SCHEDULES:
        raise ConfigError(
            f"resume: num_iterations {changed['num_iterations'][0]} -> {changed['num_iterations'][1]} would reshape "
            f"lr_scheduler = {schedule!r}, whose learning rate depends on the run's length; only "
            f"{', '.join(LENGTH_FREE_SCHEDULES)} schedules may be extended"
        )
    newer = [p.name for p in found if int(p.name.split("-")[1]) > iteration and p not in dict(set_aside)]
    if newer:
        raise ConfigError(
            f"resume = {config.resume!r}: output_dir {out_dir} holds checkpoints after iteration {iteration} "
            f"({', '.join(newer)}), which would mix with the resumed run's: move them away or resume into another "
            f"output_dir"
        )
    state.wait_for_everyone()
    if state.is_main_process:
        record_resume(out_dir, path, iteration, changed, added, set_aside)
        _trim_metrics(out_dir, iteration)
    state.wait_for_everyone()
    return path


def record_resume(
    out_dir: Path,
    path: Path,
    iteration: int,
    changed: Mapping[str, tuple[Any, Any]],
    added: Sequence[str],
    set_aside: Sequence[tuple[Path, str]] = (),
) -> None:
    """Set the unreadable checkpoints ``set_aside`` aside (renamed ``*.corrupt``), warn about them and about every
    changed or added field, and append the resume to ``<out_dir>/resume_log.jsonl`` (main process only)."""
    for corrupt, problem in set_aside:
        aside = _unused(corrupt.with_name(corrupt.name + ".corrupt"))
        corrupt.rename(aside)
        logger.warning("resume: %s cannot be read (%s); set aside as %s, resuming from %s",
                       corrupt, problem, aside.name, path.name)
    for key, (old, new) in changed.items():
        logger.warning("resume: %s = %r (the checkpoint had %r)", key, new, old)
    if added:
        logger.warning("resume: %s not recorded by %s (added to the recipe since): the values given now apply",
                       ", ".join(added), path)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(path), "iteration": iteration,
              "changed": {k: list(v) for k, v in changed.items()}, "added": list(added),
              "set_aside": {str(p): why for p, why in set_aside}}
    with open(out_dir / RESUME_LOG, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _unused(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _trim_metrics(out_dir: Path, iteration: int | None) -> None:
    """Keep the ``metrics.jsonl`` rows up to ``iteration`` (None: a fresh start keeps none); lines torn by a crash
    are dropped."""
    path = out_dir / METRICS_FILE
    if not path.is_file():
        return
    keep = []
    if iteration is not None:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(row, dict) and isinstance(row.get("iteration"), int | float)
                and row["iteration"] <= iteration
            ):
                keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


class SkippedSteps:
    """Optimizer steps in a row skipped by fp16's gradient scaler, counted in whole iterations.

    The scaler multiplies its scale by ``backoff_factor`` (< 1) at every skipped step and grows it only after
    ``growth_interval`` clean steps in a row, so an iteration of ``n`` optimizer steps skipped them all exactly when
    the scale fell by ``backoff_factor ** n``; any clean step in it restarts the count.
    """

    def __init__(self, scale: float, step: int) -> None:
        self.scale, self.step, self.in_a_row = scale, step, 0

    def update(self, scale: float, step: int, backoff_factor: float) -> int:
        """The count after the iteration that ended at optimizer step ``step`` with the scaler at ``scale``."""
        n = step - self.step
        if n > 0:
            all_skipped = scale <= self.scale * backoff_factor**n * (1 + 1e-6)
            self.in_a_row = self.in_a_row + n if all_skipped else 0
        self.scale, self.step = scale, step
        return self.in_a_row


_SKIPS: weakref.WeakKeyDictionary[Any, SkippedSteps] = weakref.WeakKeyDictionary()


def watch_scaler(scaler: Any, step: int) -> None:
    """Start counting skipped steps of ``scaler`` (accelerate's GradScaler, or None) from optimizer step ``step``
    (at a resume: after the scaler's state was loaded)."""
    if scaler is not None:
        _SKIPS[scaler] = SkippedSteps(scaler.get_scale(), step)


def check_health(
    metrics: Mapping[str, Any],
    named: Sequence[tuple[str, torch.Tensor]],
    ema: Any,
    scaler: Any,
    step: int,
) -> str | None:
    """What went wrong in the iteration just trained (None when nothing did): a non-finite ``train/loss``, adapter
    or EMA weight, or :data:`MAX_SKIPPED_STEPS` fp16 steps in a row skipped by ``scaler`` (None without fp16)."""
    problems = []
    loss = metrics.get("train/loss")
    if loss is not None and not math.isfinite(float(loss)):
        problems.append(f"train/loss = {float(loss)}")
    with torch.no_grad():
        bad = [n for n, p in named if not torch.isfinite(p).all()]
        if bad:
            problems.append(f"{len(bad)} of {len(named)} adapter tensors non-finite (e.g. {bad[0]})")
        if ema is not None and not bad:
            bad_ema = [n for n, t in ema.state_dict().items() if not torch.isfinite(t).all()]
            if bad_ema:
                problems.append(f"{len(bad_ema)} EMA tensors non-finite (e.g. {bad_ema[0]})")
    if scaler is not None:
        counter = _SKIPS.setdefault(scaler, SkippedSteps(getattr(scaler, "_init_scale", scaler.get_scale()), 0))
        skipped = counter.update(scaler.get_scale(), step, scaler.get_backoff_factor())
        if skipped >= MAX_SKIPPED_STEPS:
            problems.append(f"fp16's gradient scaler skipped the last {skipped} optimizer steps (non-finite gradients; "
                            f"scale now {scaler.get_scale():g})")
    return "; ".join(problems) or None


def divergence_error(problem: str, iteration: int | None, out_dir: Path) -> TrainingDivergedError:
    """The error that stops a run (at ``iteration`` when known), naming the newest checkpoint it kept."""
    kept = checkpoints(out_dir)
    last = f"the newest checkpoint kept is {kept[-1]}" if kept else "no checkpoint was written"
    at = f"iteration {iteration}: " if iteration is not None else ""
    return TrainingDivergedError(
        f"{at}training diverged: {problem}. Stopped before checkpointing it; {last} (a lower learning_rate or "
        f"max_grad_norm may help)"
    )
