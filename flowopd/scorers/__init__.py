"""Scorer registry. Each entry is imported on first use; third parties register via ``flowopd.scorers``."""

from __future__ import annotations

from typing import Any

from flowopd.registry import Registry
from flowopd.scorers.base import Scale, ScoreBatch, Scorer

SCORERS = Registry("scorer", entry_point_group="flowopd.scorers")

for _name, _target in {
    # official scorers (issues 4 and 5)
    "geneval": "flowopd.scorers.geneval:GenEvalScorer",
    "ocr": "flowopd.scorers.ocr:OCRScorer",
    "compbench": "flowopd.scorers.compbench:CompBenchScorer",
    "pickscore": "flowopd.scorers.pickscore:PickScoreScorer",
    "imagereward": "flowopd.scorers.imagereward:ImageRewardScorer",
    "aesthetic": "flowopd.scorers.aesthetic:AestheticScorer",
    "hps": "flowopd.scorers.hps:HPSScorer",
    "deqa": "flowopd.scorers.deqa:DeQAScorer",
    "qwenvl": "flowopd.scorers.qwenvl:QwenVLJudge",
    # the mini world's exact scorers (issue 3)
    "mini-geneval": "flowopd.world.scorers:MiniGenEvalScorer",
    "mini-ocr": "flowopd.world.scorers:MiniOCRScorer",
    "mini-quality": "flowopd.world.scorers:MiniQualityScorer",
    "mini-pick": "flowopd.world.scorers:MiniPickScorer",
    "mini-compbench": "flowopd.world.scorers:MiniCompBenchScorer",
}.items():
    SCORERS.register(_name, _target)


def build_scorer(name: str, **options: Any) -> Scorer:
    """Instantiate a registered scorer with its options (model id, local path, factory, device...)."""
    return SCORERS.get(name)(**options)


__all__ = ["SCORERS", "Scale", "ScoreBatch", "Scorer", "build_scorer"]
