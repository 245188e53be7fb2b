"""The mini world's exact scorers: renderer images pass, broken images fail as the rules say, degenerate ones lose."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from flowopd.scorers import Scorer, build_scorer
from flowopd.world import detect, grammar
from flowopd.world.render import render, render_batch
from flowopd.world.scorers import (
    MiniCompBenchScorer,
    MiniGenEvalScorer,
    MiniOCRScorer,
    MiniPickScorer,
    MiniQualityScorer,
)

SEEDS = (0, 1, 2)


def score(scorer, metas, images):
    return scorer.score(images, [m["prompt"] for m in metas], metas)


def rendered(metas, seed=0):
    return render_batch(metas, np.random.default_rng(seed))


def tag_means(batch) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for s, tag in zip(batch.scores, batch.details["tag"]):
        out.setdefault(tag, []).append(s)
    return {k: float(np.mean(v)) for k, v in out.items()}


def noisy(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + std * noise).clamp(0, 1)


def test_registry_builds_every_mini_scorer():
    for name in ("mini-geneval", "mini-ocr", "mini-quality", "mini-pick", "mini-compbench"):
        scorer = build_scorer(name)
        assert isinstance(scorer, Scorer) and scorer.name == name and scorer.higher_is_better


# ---------------------------------------------------------------- acceptance on renderer images


def test_renderer_images_pass_mini_geneval():
    metas = grammar.prompt_set("geneval", "test")
    scorer = MiniGenEvalScorer()
    for seed in SEEDS:
        batch = score(scorer, metas, rendered(metas, seed))
        means = tag_means(batch)
        assert set(means) == set(grammar.GENEVAL_TAGS)
        assert np.mean(list(means.values())) >= 0.98, means
        assert min(batch.details["partial"]) >= 0.5


def test_renderer_images_pass_mini_ocr():
    metas = grammar.prompt_set("ocr", "test")
    scorer = MiniOCRScorer()
    for seed in SEEDS:
        batch = score(scorer, metas, rendered(metas, seed))
        assert batch.scores.mean() >= 0.98
        assert sum(t == m["text"] for t, m in zip(batch.details["text"], metas)) >= 0.95 * len(metas)


def test_renderer_images_pass_mini_compbench_in_every_category():
    metas = grammar.prompt_set("compbench", "heldout")
    batch = score(MiniCompBenchScorer(), metas, rendered(metas, 5))
    assert batch.scores.mean() >= 0.98
    cats = {
        c: np.mean([s for s, k in zip(batch.scores, batch.details["category"]) if k == c])
        for c in grammar.COMPBENCH_CATEGORIES
    }
    assert min(cats.values()) >= 0.95, cats


def test_small_noise_keeps_detection_and_reading_robust():
    """The model's images are slightly noisy (std ~0.05): the exact scorers must not collapse there."""
    gen = grammar.prompt_set("geneval", "test")
    batch = score(MiniGenEvalScorer(), gen, noisy(rendered(gen, 7), 0.05))
    assert np.mean(list(tag_means(batch).values())) >= 0.95
    ocr = grammar.prompt_set("ocr", "test")
    assert score(MiniOCRScorer(), ocr, noisy(rendered(ocr, 7), 0.05)).scores.mean() >= 0.98


# ---------------------------------------------------------------- broken images fail as the rules say


def broken(meta: dict, **changes) -> dict:
    out = copy.deepcopy(meta)
    for index, updates in changes.items():
        out["include"][int(index[1:])].update(updates)
    return out


def check(meta: dict, drawn: dict, seed: int = 0):
    image = render_batch([drawn], np.random.default_rng(seed))
    return score(MiniGenEvalScorer(), [meta], image)


def test_wrong_colour_fails():
    meta = {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "red"}],
        "prompt": "a photo of a red square",
    }
    for seed in SEEDS:
        batch = check(meta, broken(meta, c0={"color": "green"}), seed)
        assert batch.scores[0] == 0 and "expected red square>=1, found 0 red" in batch.details["reason"][0]
        assert check(meta, meta, seed).scores[0] == 1


def test_wrong_count_fails_both_ways():
    meta = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
        "prompt": "a photo of two circles",
    }
    for seed in SEEDS:
        more = check(meta, broken(meta, c0={"count": 3}), seed)
        assert more.scores[0] == 0 and "expected circle<3, found 3" in more.details["reason"][0]
        assert more.details["partial"][0] == 0.5
        fewer = check(meta, broken(meta, c0={"count": 1}), seed)
        assert fewer.scores[0] == 0 and "expected circle>=2, found 1" in fewer.details["reason"][0]
        assert check(meta, meta, seed).scores[0] == 1


def test_swapped_relation_fails():
    meta = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "triangle", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "a photo of a triangle left of a square",
    }
    for seed in SEEDS:
        batch = check(meta, broken(meta, c1={"position": ["right of", 0]}), seed)
        assert batch.scores[0] == 0 and "expected triangle left of target" in batch.details["reason"][0]
        assert batch.details["partial"][0] == 0.5


def test_wrong_shape_and_missing_object_fail():
    meta = {
        "tag": "two_object",
        "include": [{"class": "circle", "count": 1}, {"class": "triangle", "count": 1}],
        "prompt": "a photo of a circle and a triangle",
    }
    for seed in SEEDS:
        batch = check(meta, broken(meta, c1={"class": "square"}), seed)
        assert batch.scores[0] == 0 and batch.details["partial"][0] == 0.5
        assert "expected triangle>=1, found 0" in batch.details["reason"][0]


def test_partial_credit_counts_satisfied_clauses():
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue"},
        ],
        "prompt": "a photo of a red circle and a blue square",
    }
    assert check(meta, broken(meta, c1={"color": "green"})).details["partial"][0] == 0.5
    assert (
        check(meta, broken(meta, c0={"color": "yellow"}, c1={"color": "green"})).details["partial"][0] == 0.0
    )
    good = check(meta, meta)
    assert good.scores[0] == 1 and good.details["partial"][0] == 1.0 and good.details["reason"][0] == ""


def test_wrong_character_costs_one_edit():
    meta = grammar.text_meta("BT7")
    for seed in SEEDS:
        image = rendered([grammar.text_meta("BC7")], seed)
        batch = score(MiniOCRScorer(), [meta], image)
        assert batch.details["text"][0] == "BC7"
        assert batch.scores[0] == pytest.approx(1 - 1 / 3)
    blank = torch.ones(1, 3, 32, 32)
    assert score(MiniOCRScorer(), [meta], blank).scores[0] == 0.0


def test_not_applicable_records_score_nan():
    text = grammar.text_meta("XY")
    image = rendered([text])
    assert math.isnan(score(MiniGenEvalScorer(), [text], image).scores[0])
    assert math.isnan(score(MiniCompBenchScorer(), [text], image).scores[0])
    gen = grammar.prompt_set("geneval", "test")[:1]
    assert math.isnan(score(MiniOCRScorer(), gen, rendered(gen)).scores[0])


# ---------------------------------------------------------------- quality and preference analogues


def degenerate_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.stack(
        [
            torch.ones(3, 32, 32),  # blank
            torch.full((3, 32, 32), 0.5),  # grey
            torch.full((3, 32, 32), 0.75),  # light grey
            torch.zeros(3, 32, 32),  # black
            torch.rand(3, 32, 32, generator=g),  # uniform noise
            (0.5 + 0.25 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1),  # grey noise
            torch.tensor([230, 30, 30])
            .div(255)
            .view(3, 1, 1)
            .expand(3, 32, 32),  # the whole image one colour
        ]
    )


def test_degenerate_images_get_the_minimum_quality_and_low_pick():
    images = degenerate_images()
    metas = [grammar.prompt_set("geneval", "test")[16]] * len(images)  # a two_object prompt
    quality = score(MiniQualityScorer(), metas, images)
    assert (quality.scores == 1.0).all(), quality.details["degenerate"]
    assert all(quality.details["degenerate"])
    assert (score(MiniPickScorer(), metas, images).scores <= 1.0).all()
    assert (score(MiniGenEvalScorer(), metas, images).scores == 0).all()


def test_renderer_images_score_near_five_and_pick_well():
    metas = grammar.prompt_set("geneval", "test")[::3] + grammar.prompt_set("ocr", "test")[::4]
    images = rendered(metas, 2)
    quality = score(MiniQualityScorer(), metas, images)
    assert quality.scores.mean() >= 4.9 and quality.scores.min() >= 4.5
    pick = score(MiniPickScorer(), metas[:32], images[:32])
    assert pick.scores.mean() >= 7.0 and not any(pick.details["degenerate"])


def test_quality_falls_monotonically_with_noise_and_blur():
    metas = grammar.prompt_set("geneval", "test")[::6] + grammar.prompt_set("ocr", "test")[::8]
    images = rendered(metas, 4)
    scorer = MiniQualityScorer()
    by_noise = np.stack(
        [score(scorer, metas, noisy(images, s)).scores for s in (0, 0.01, 0.02, 0.05, 0.1, 0.2)]
    )
    assert (np.diff(by_noise.mean(1)) < 0).all(), by_noise.mean(1)
    assert (np.diff(by_noise, axis=0) <= 1e-9).all()  # image by image too
    blurs = (0.0, 0.5, 0.8, 1.2, 2.0)
    by_blur = np.stack(
        [
            score(
                scorer, metas, torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, b, b)))
            ).scores
            for b in blurs
        ]
    )
    assert (np.diff(by_blur.mean(1)) < 0).all(), by_blur.mean(1)
    assert (np.diff(by_blur, axis=0) <= 0.02).all()


def test_pick_prefers_vivid_centred_well_sized_objects():
    def one_square(side: int, x: int, y: int, rgb) -> torch.Tensor:
        img = torch.ones(3, 32, 32)
        img[:, y : y + side, x : x + side] = torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1)
        return img

    red = grammar.PALETTE["red"]
    pale = tuple(255 - (255 - c) * 0.55 for c in red)
    images = torch.stack(
        [
            one_square(12, 10, 10, red),  # centred, well sized, vivid
            one_square(12, 1, 1, red),  # in a corner
            one_square(5, 13, 13, red),  # tiny
            one_square(12, 10, 10, pale),  # washed out
        ]
    )
    meta = {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "red"}],
        "prompt": "a photo of a red square",
    }
    pick = score(MiniPickScorer(), [meta] * 4, images).scores
    assert pick[0] > max(pick[1:]), pick


def test_batch_equals_one_by_one_and_is_deterministic():
    metas = grammar.prompt_set("geneval", "test")[::12] + grammar.prompt_set("ocr", "test")[:3]
    metas += grammar.prompt_set("compbench", "heldout")[::40]
    images = noisy(rendered(metas, 9), 0.03)
    for scorer in (
        MiniGenEvalScorer(),
        MiniOCRScorer(),
        MiniQualityScorer(),
        MiniPickScorer(),
        MiniCompBenchScorer(),
    ):
        batch = score(scorer, metas, images)
        again = score(scorer, metas, images)
        singles = [score(scorer, [m], images[i : i + 1]) for i, m in enumerate(metas)]
        np.testing.assert_array_equal(batch.scores, again.scores)
        np.testing.assert_array_equal(batch.scores, np.concatenate([s.scores for s in singles]))
        for key, values in batch.details.items():
            single_values = [s.details[key][0] for s in singles]
            assert [str(v) for v in values] == [str(v) for v in single_values], (scorer.name, key)


def test_detector_reports_exact_colours_and_confident_clean_shapes():
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "triangle", "count": 1, "color": "green"},
            {"class": "circle", "count": 1, "color": "yellow"},
        ],
        "prompt": "x",
    }
    found = detect.detect_objects(render(meta, np.random.default_rng(1)))
    assert set(found) == {"triangle", "circle"}
    assert found["triangle"][0].color == "green" and found["circle"][0].color == "yellow"
    assert min(d.score for dets in found.values() for d in dets) > 0.9
    assert found["triangle"][0].mask.shape == (32, 32)


def test_mismatched_batch_lengths_raise():
    metas = grammar.prompt_set("geneval", "test")[:2]
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        MiniGenEvalScorer().score(rendered(metas), [metas[0]["prompt"]], metas)
