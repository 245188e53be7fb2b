"""Sharding ``evaluate`` over processes and nodes: ``torchrun``, ``accelerate launch`` or Slurm + ``torchrun``.

The unit of work is a *batch of a fresh single-process run*: every sample of an image set (every image to
score) is cut into the batches that one process makes with the same ``--batch-size``; the batches that hold a
missing sample (an unscored image) are made whole and dealt round-robin, batch ``j`` to process
``j % world_size``, and only their missing members are written. Every image is therefore made in the same batch,
from the same per-sample seeds, as in one uninterrupted process, so the images and the per-sample rows depend
neither on the process count nor on where an earlier run was killed (a batch's floating-point results depend on
its size and members: on CPU the mini model moved a few pixels by 1/255 between batch sizes, and also between 1
and 2 threads, so compare runs at equal threads per process). A killed run costs at most the batches each
process had begun.

Rank 0 alone decides (which samples are missing, whether the cached rows are complete), writes the shared files
(``generation.json``, prompt metadata, the merged row table, ``results.json``) and broadcasts its decision, or
its error, so that every process stops with the same one-line message. Each process writes only its own
images (one atomic file each) and its own row file, so a run killed at any point resumes with any process count.

The launchers set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``); the
process group is gloo on CPU, NCCL on GPU (process ``LOCAL_RANK`` of a node uses ``cuda:LOCAL_RANK``), with a
gloo group for the small control messages, which are Python objects. ``--out`` must be on a file system that
every node sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

#: how long a process waits for the others at a barrier: the slowest process may still be loading a scorer
TIMEOUT = timedelta(hours=2)

#: errors re-raised with the same type on every process (the CLI turns these into one-line messages)
_FORWARDED = (ValueError, KeyError, FileNotFoundError, OSError, ImportError)


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world_size`` processes; ``Shard()`` is the single-process run."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed group of the control messages (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and return its result on every process; its error is raised on every process."""
        if self.world_size == 1:
            return fn()
        outcome: tuple[str, Any] | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except _FORWARDED as e:
                error, outcome = e, ("error", (type(e).__name__, str(e).strip("'\"")))
            except BaseException as e:  # noqa: BLE001 - the others must not wait for an answer that never comes
                error, outcome = e, ("error", ("RuntimeError", f"rank 0 failed: {type(e).__name__}: {e}"))
        kind, value = self.broadcast(outcome)
        if error is not None:
            raise error
        if kind == "error":
            name, message = value
            raise next((t for t in _FORWARDED if t.__name__ == name), RuntimeError)(message)
        return value

    def share(self, batches: Sequence[T]) -> list[T]:
        """This process's share of ``batches``, dealt round-robin: batch ``j`` goes to rank ``j % world_size``."""
        return list(batches[self.rank :: self.world_size])


SINGLE = Shard()


def pending_batches(items: Sequence[T], size: int, pending: Collection[T]) -> list[Sequence[T]]:
    """The batches of ``size`` that a fresh single-process run cuts from ``items``, those that hold a ``pending``
    item. A batch is always made whole, so that its items come out as in a fresh run whatever was done before (a
    batch's numbers depend on its size and members); only its pending items are kept."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    cut = (items[start : start + size] for start in range(0, len(items), size))
    return [batch for batch in cut if any(item in pending for item in batch)]


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (torchrun and accelerate launch set it)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def process_device(device: str, local_rank: int, world_size: int) -> str:
    """The device of one process: ``cuda`` becomes ``cuda:LOCAL_RANK`` when there are several processes."""
    kind, _, index = device.partition(":")
    if world_size == 1:
        return device
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "cuda" and not index:
        return f"cuda:{local_rank}"
    if kind == "cuda":
        raise ValueError(f"--device {device} with WORLD_SIZE={world_size}: pass --device cuda, and each process "
                         f"uses cuda:LOCAL_RANK")
    raise ValueError(f"--device {device} with WORLD_SIZE={world_size}: several processes need --device cpu or cuda")


def shard_from_env(device: str) -> tuple[Shard, str]:
    """Join the launcher's process group (if ``WORLD_SIZE`` > 1); returns this process's shard and device."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world_size} must be >= 1")
    if world_size == 1:
        return SINGLE, device
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    if local_rank < 0:
        raise ValueError(f"environment variable LOCAL_RANK={local_rank} must be >= 0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"WORLD_SIZE={world_size} but environment variable {name} is not set "
                             f"(start the processes with torchrun or accelerate launch)")
    device = process_device(device, local_rank, world_size)
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
    return Shard(rank=dist.get_rank(), world_size=dist.get_world_size(), group=group), device


@contextmanager
def launched(device: str) -> Iterator[tuple[Shard, str]]:
    """:func:`shard_from_env` for the length of a command; leaves the process group it joined when it ends."""
    import torch.distributed as dist

    joined_before = dist.is_available() and dist.is_initialized()
    shard, device = shard_from_env(device)
    try:
        yield shard, device
    finally:
        if shard.world_size > 1 and not joined_before and dist.is_initialized():
            dist.destroy_process_group()
