"""A weight-free reward scorer for the GRPO tests, registered through the registry API on import.

``test-redness`` is a real computation on the pixels: the mean of ``R - (G + B) / 2`` per image (-1..1), with
the mean brightness as a detail (``bright``) and NaN ("not applicable") where the metadata says ``skip``.
Recipes reach it with ``imports = ["_grpo_scorers"]`` (the tests directory is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flowopd.scorers import SCORERS
from flowopd.scorers.base import Scale, ScoreBatch, check_images


class RednessScorer:
    name = "test-redness"
    version = "1"
    higher_is_better = True
    scale = Scale(-1.0, 1.0)

    def __init__(self) -> None:
        self.calls: list[list[str]] = []  # the prompts of every call, for routing tests

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        x = check_images(images).double().cpu()
        self.calls.append(list(prompts))
        red = (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean(dim=(1, 2))
        bright = x.mean(dim=(1, 2, 3))
        skip = [bool(m.get("skip")) for m in metadata]
        return ScoreBatch(
            [math.nan if s else float(v) for v, s in zip(red, skip)],
            {"bright": [None if s else float(v) for v, s in zip(bright, skip)]},
        )


SCORERS.register("test-redness", f"{__name__}:RednessScorer")
