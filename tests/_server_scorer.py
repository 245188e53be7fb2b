"""A deterministic scorer with no weights, served by tests/test_scorer_server.py through ``--register``.

Its score is a real computation on the pixels (mean brightness per image, plus an ``offset`` option) so that
served and in-process scores can be compared exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flowopd.scorers.base import Scale, ScoreBatch, check_images


class BrightnessScorer:
    """Mean pixel value per image (0-1) + ``offset``; NaN (score and ``red`` detail) where metadata says ``skip``;
    raises where it says ``fail``."""

    name = "test-brightness"
    version = "1"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = float(offset)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        images = check_images(images)
        if any(m.get("fail") for m in metadata):
            raise ValueError("metadata asked this scorer to fail")
        means = images.double().mean(dim=(1, 2, 3)).numpy() + self.offset
        scores = [math.nan if m.get("skip") else float(v) for v, m in zip(means, metadata)]
        red = [
            math.nan if m.get("skip") else float(r)
            for r, m in zip(images[:, 0].double().mean(dim=(1, 2)), metadata)
        ]
        return ScoreBatch(
            scores,
            {
                "summary": [f"{p}: brightness {v:.6f}" for p, v in zip(prompts, means)],
                "red": red,
                "bright": [bool(v > 0.5) for v in means],
            },
        )
