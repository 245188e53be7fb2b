"""flowopd.rewards: native-scale normalisation, weighted sums with NaN = not applicable, task routing, details."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _grpo_scorers import RednessScorer
from hypothesis import given, settings
from hypothesis import strategies as st

from flowopd.rewards import NATIVE_SCALES, Reward, make_terms, parse_key, weighted_sum
from flowopd.scorers.base import Scale, ScoreBatch, check_images


class BlueScorer:
    """Mean blue channel x 5 (a 0-5 score, like DeQA), NaN for prompts without the word 'blue'."""

    name = "test-blue"
    version = "1"
    higher_is_better = True
    scale = Scale(0.0, 5.0)

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, images, prompts, metadata):
        self.calls.append(list(prompts))
        blue = 5 * check_images(images).double()[:, 2].mean(dim=(1, 2))
        return ScoreBatch([float(b) if "blue" in p else math.nan for b, p in zip(blue, prompts)])


def _images() -> torch.Tensor:
    """Four 4x4 images with known channel means."""
    means = torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.4, 0.8], [0.5, 0.5, 0.5], [0.1, 0.3, 0.6]])
    return means[:, :, None, None].expand(4, 3, 4, 4).clone()


def _redness(images: torch.Tensor) -> np.ndarray:
    x = images.double()
    return (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean(dim=(1, 2)).numpy()


def test_native_scales_follow_method_and_can_be_overridden():
    terms = {t.key: t for t in make_terms({"deqa": 1, "pickscore": 1, "geneval": 1, "mini-quality": 1,
                                            "mini-pick": 1, "mini-geneval.partial": 1})}
    assert terms["deqa"].scale == 5.0 and terms["pickscore"].scale == 26.0  # METHOD.md s.4: DeQA/5, PickScore/26
    assert terms["mini-quality"].scale == 5.0 and terms["mini-pick"].scale == 10.0
    assert terms["geneval"].scale == 1.0 and terms["mini-geneval.partial"].scale == 1.0
    assert terms["mini-geneval.partial"].scorer == "mini-geneval" and terms["mini-geneval.partial"].detail == "partial"
    assert make_terms({"pickscore": 1}, scales={"pickscore": 24.0})[0].scale == 24.0
    assert NATIVE_SCALES["deqa"] == 5.0
    with pytest.raises(ValueError, match="weight must be a number"):
        make_terms({"geneval": "heavy"})
    with pytest.raises(ValueError, match="scale"):
        make_terms({"geneval": 1}, scales={"geneval": 0})
    for bad in ("", ".partial", "geneval."):
        with pytest.raises(ValueError):
            parse_key(bad)


def test_weighted_sum_rescales_over_applicable_terms():
    values = {"a": np.array([1.0, 1.0, np.nan, np.nan]), "b": np.array([0.5, np.nan, 0.5, np.nan])}
    out = weighted_sum(values, {"a": 0.8, "b": 0.2})
    assert out[0] == pytest.approx(0.8 * 1.0 + 0.2 * 0.5)  # all applicable: the plain weighted sum
    assert out[1] == pytest.approx(1.0) and out[2] == pytest.approx(0.5)  # one term: its value, full scale
    assert math.isnan(out[3])
    assert weighted_sum({"a": np.array([2.0])}, {"a": 3.0})[0] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="differ"):
        weighted_sum({"a": np.ones(1)}, {"b": 1.0})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=3, max_size=3), st.lists(st.floats(0.1, 5), min_size=3, max_size=3))
def test_weighted_sum_equals_the_plain_sum_when_every_term_applies(vals, weights):
    keys = ["x", "y", "z"]
    out = weighted_sum({k: np.array([v]) for k, v in zip(keys, vals)}, dict(zip(keys, weights)))
    assert out[0] == pytest.approx(sum(w * v for w, v in zip(weights, vals)), rel=1e-9, abs=1e-9)


def test_reward_of_one_scorer_is_its_normalised_score():
    images = _images()
    reward = Reward({"test-blue": 1.0}, scorers={"test-blue": BlueScorer()})
    out = reward(images, ["blue sky", "a blue cup", "grey", "blue"], [{}, {}, {}, {}])
    blue = images[:, 2].double().mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(out.total[[0, 1, 3]], 5 * blue[[0, 1, 3]] / 1.0)  # unknown scorer: divided by 1
    assert math.isnan(out.total[2]) and out.tasks == ["*"] * 4
    scaled = Reward({"test-blue": 1.0}, scales={"test-blue": 5.0}, scorers={"test-blue": BlueScorer()})
    np.testing.assert_allclose(scaled(images, ["blue"] * 4, [{}] * 4).total, blue)


def test_task_routing_runs_each_scorer_on_its_samples_only():
    images = _images()
    red, blue = RednessScorer(), BlueScorer()
    reward = Reward(
        {"geneval": {"test-redness": 0.8, "test-blue": 0.2}, "ocr": {"test-blue": 1.0}},
        scales={"test-blue": 5.0},
        scorers={"test-redness": red, "test-blue": blue},
    )
    prompts = ["a blue ball", "blue text", "a blue cat", "grey text"]
    metas = [{"task": "geneval"}, {"task": "ocr"}, {"task": "geneval"}, {"task": "ocr"}]
    out = reward(images, prompts, metas)
    assert red.calls == [["a blue ball", "a blue cat"]]  # the ocr samples never reach the redness scorer
    assert blue.calls == [prompts]
    r, b = _redness(images), images[:, 2].double().mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(out.total[[0, 2]], 0.8 * r[[0, 2]] + 0.2 * b[[0, 2]])
    assert out.total[1] == pytest.approx(b[1]) and math.isnan(out.total[3])  # "grey text": blue not applicable
    assert math.isnan(out.terms["test-redness"][1])  # not a term of the ocr task
    with pytest.raises(KeyError, match="no terms for task 'pickscore'"):
        reward(images[:1], ["x"], [{"task": "pickscore"}])


def test_wildcard_task_and_details_through_the_registry():
    images = _images()
    # built through the registry (tests/_grpo_scorers.py registers test-redness), detail instead of score
    reward = Reward({"ocr": {"test-redness.bright": 1.0}, "*": {"test-redness": 2.0}})
    metas = [{"task": "ocr"}, {"task": "geneval"}, {}, {"task": "ocr", "skip": True}]
    out = reward(images, ["a", "b", "c", "d"], metas)
    assert isinstance(reward.scorers["test-redness"], RednessScorer)
    bright, r = images.double().mean(dim=(1, 2, 3)).numpy(), _redness(images)
    assert out.total[0] == pytest.approx(bright[0])
    np.testing.assert_allclose(out.total[1:3], 2 * r[1:3])
    assert math.isnan(out.total[3])  # the scorer said "not applicable" (None detail)
    with pytest.raises(KeyError, match="no detail 'partial'"):
        Reward({"test-redness.partial": 1.0})(images, ["a"] * 4, [{}] * 4)
