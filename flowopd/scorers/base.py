"""The Scorer Protocol and ScoreBatch: what every benchmark column, GRPO reward and OPD router uses.

Images are float tensors in [0, 1] of shape (N, 3, H, W). Scores are on the scorer's *native* scale
(GenEval 0-1, DeQA 1-5, PickScore ~18-24); reward normalisation lives in flowopd.rewards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class Scale:
    """The native range of a score (for documentation, plots and normalisation)."""

    low: float
    high: float

    def normalise(self, x: float) -> float:
        return (x - self.low) / (self.high - self.low)


@dataclass
class ScoreBatch:
    """Per-sample scores and named per-sample details.

    ``scores`` has one float per image; NaN means "not applicable" (excluded from means).
    ``details`` maps a name (e.g. ``"tag"``, ``"correct"``, ``"text"``) to one value per image;
    values must be JSON-serialisable scalars (str, float, int, bool, None).
    """

    scores: np.ndarray
    details: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        for key, values in self.details.items():
            if len(values) != len(self.scores):
                raise ValueError(f"detail {key!r} has {len(values)} values for {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def concat(batches: Sequence[ScoreBatch]) -> ScoreBatch:
        if not batches:
            return ScoreBatch(np.zeros(0))
        keys = list(dict.fromkeys(k for b in batches for k in b.details))
        details = {k: [v for b in batches for v in b.details.get(k, [None] * len(b))] for k in keys}
        return ScoreBatch(np.concatenate([b.scores for b in batches]), details)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"score": float(s), **{k: v[i] for k, v in self.details.items()}} for i, s in enumerate(self.scores)
        ]


@runtime_checkable
class Scorer(Protocol):
    """What a benchmark needs from a scorer. Constructors take a model id / local path *or* a factory."""

    name: str
    version: str
    higher_is_better: bool
    scale: Scale

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch: ...


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate the (N, 3, H, W) float [0, 1] contract; raise a clear error otherwise."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (N, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
    return images


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float [0, 1] -> (N, H, W, 3) uint8 RGB, rounding as PIL's ToPILImage does."""
    arr = (check_images(images).detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan
