"""Reward-hacking monitor: model-free statistics of a batch of generated images (issue 23).

A run that hacks its reward often collapses its images: to blank or near-constant pictures, or to one picture per
prompt whatever the noise. Three numbers, computed from the images themselves at any scale, show it while the run
trains (the GRPO and OPD loops log them every iteration as ``monitor/blank_rate``, ``monitor/group_diversity`` and
``monitor/image_std``; ``python -m flowopd.train.diagnostics monitor RUN ... --out FILE.png`` plots them beside
the reward curve):

- the image std of one image: the standard deviation of all its values (channels x pixels, in [0, 1]);
- the blank rate: the share of images whose image std is below :data:`BLANK_STD` (0.02, about 5 of 255 grey
  levels: an image that is one colour up to faint noise);
- the group diversity: for every group (the images of one prompt, GRPO's group layout), the per-pixel standard
  deviation across the group's images (population std), averaged over the pixels; then averaged over the groups
  with at least two images. Identical images in a group give 0.

Nothing here draws random numbers or changes what is trained.

On the mini world the monitor also watches the other rewards: the probe set (:mod:`flowopd.train.probe`,
``monitor_probe_every``) has the policy sample a small fixed set of train-split prompts every N iterations and logs
the four Table-1 mini scorers' means as ``monitor/probe/<benchmark>``, drawn by the same plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

BLANK_STD = 0.02
"""Image std (values in [0, 1]) below which an image counts as blank / near-constant."""
MONITOR_SIZE = 64
"""The in-loop monitor area-downsamples larger images to at most this many pixels a side for the group diversity
(the per-group sums it keeps are then small at any resolution); image std and blank rate use the full images."""


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a float tensor (N, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images")


def _check_groups(images: torch.Tensor, group_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(group_ids)
    if ids.ndim != 1 or len(ids) != images.shape[0]:
        raise ValueError(f"group_ids: expected one group id per image ({images.shape[0]}), got shape {ids.shape}")
    return ids


def image_std(images: torch.Tensor) -> torch.Tensor:
    """(N,) float64: the standard deviation (population) of each image's values over channels and pixels."""
    _check_images(images)
    return images.detach().flatten(1).double().std(dim=1, unbiased=False)


def blank_rate(images: torch.Tensor, threshold: float = BLANK_STD) -> float:
    """The share of images whose :func:`image_std` is below ``threshold`` (default :data:`BLANK_STD`)."""
    return float((image_std(images) < threshold).double().mean())


def group_diversity(images: torch.Tensor, group_ids: Sequence[int] | np.ndarray) -> float:
    """Mean over groups (with >= 2 images) of the mean per-pixel std across the group's images; NaN when no group
    has two images. ``group_ids[i]`` is the group (prompt) of image ``i``."""
    _check_images(images)
    ids = _check_groups(images, group_ids)
    values = []
    x = images.detach().double()
    for g in np.unique(ids):
        members = np.flatnonzero(ids == g)
        if len(members) >= 2:
            values.append(float(x[torch.as_tensor(members)].std(dim=0, unbiased=False).mean()))
    return float(np.mean(values)) if values else math.nan


def monitor_metrics(images: torch.Tensor, group_ids: Sequence[int] | np.ndarray,
                    threshold: float = BLANK_STD) -> dict[str, float]:
    """``{"monitor/blank_rate", "monitor/group_diversity", "monitor/image_std"}`` of one batch of images."""
    stds = image_std(images)
    return {
        "monitor/blank_rate": float((stds < threshold).double().mean()),
        "monitor/group_diversity": group_diversity(images, group_ids),
        "monitor/image_std": float(stds.mean()),
    }


class ImageMonitor:
    """The monitor of one rollout, fed batch by batch and summed over processes (so no process keeps the images).

    Keeps per group the count, the sum and the sum of squares of every pixel (images downsampled to at most
    :data:`MONITOR_SIZE` a side), which give the per-pixel population std of :func:`group_diversity`.

    Args:
        group_ids: the group of every sample of the iteration (all processes), e.g. ``IterationPlan.group_ids``.
    """

    def __init__(self, group_ids: Sequence[int] | np.ndarray, threshold: float = BLANK_STD) -> None:
        ids = np.asarray(group_ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"group_ids: expected a non-empty 1-d array, got shape {ids.shape}")
        self.groups, self.index = np.unique(ids, return_inverse=True)
        self.threshold = threshold
        self.head: torch.Tensor | None = None  # images, sum of image std, blank images
        self.sums: torch.Tensor | None = None  # (3, G, P): count (broadcast), sum, sum of squares

    def add(self, images: torch.Tensor, indices: Sequence[int] | np.ndarray) -> None:
        """Adds the images of samples ``indices`` (positions in ``group_ids``)."""
        _check_images(images)
        idx = np.asarray(indices)
        if idx.ndim != 1 or len(idx) != images.shape[0]:
            raise ValueError(f"indices: expected one sample index per image ({images.shape[0]}), got {idx.shape}")
        stds = image_std(images)
        x = images.detach().float()
        if max(x.shape[-2:]) > MONITOR_SIZE:
            x = F.adaptive_avg_pool2d(x, MONITOR_SIZE)
        x = x.flatten(1).double()
        if self.head is None or self.sums is None:  # on the images' device, for a reduce over processes
            self.head = torch.zeros(3, dtype=torch.float64, device=x.device)
            self.sums = torch.zeros(3, len(self.groups), x.shape[1], dtype=torch.float64, device=x.device)
        blank = (stds < self.threshold).double().sum()
        self.head += torch.stack([stds.new_tensor(float(len(stds))), stds.sum(), blank])
        g = torch.as_tensor(self.index[idx], dtype=torch.long, device=x.device)
        self.sums[0].index_add_(0, g, torch.ones_like(x))
        self.sums[1].index_add_(0, g, x)
        self.sums[2].index_add_(0, g, x * x)

    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The :func:`monitor_metrics` of every image added (on every process when ``reduce`` sums a tensor over
        processes, e.g. ``accelerate.utils.reduce(t, reduction="sum")``)."""
        if self.head is None or self.sums is None:
            raise ValueError("ImageMonitor: no images added")
        flat = torch.cat([self.head, self.sums.reshape(-1)])
        if reduce is not None:
            flat = reduce(flat)
        head, sums = flat[:3], flat[3:].reshape(self.sums.shape)
        n, s, s2 = sums[0], sums[1], sums[2]
        full = n[:, 0] >= 2
        diversity = math.nan
        if full.any():
            mean = s[full] / n[full]
            var = (s2[full] / n[full] - mean * mean).clamp_min(0)
            diversity = float(var.sqrt().mean(dim=1).mean())
        return {
            "monitor/blank_rate": float(head[2] / head[0]),
            "monitor/group_diversity": diversity,
            "monitor/image_std": float(head[1] / head[0]),
        }
