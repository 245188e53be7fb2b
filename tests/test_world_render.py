"""The mini world's renderer and bitmap font: correct-by-construction images, deterministic, within the rules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flowopd.scorers.geneval_rules import Detection, relative_position
from flowopd.world import font, grammar
from flowopd.world.render import layout, render, render_batch, shape_coverage


def test_font_glyphs_span_their_box_and_are_far_apart():
    assert set(font.FONT_CHARS) == set(grammar.ALPHABET)
    for ch in font.FONT_CHARS:
        g = font.glyph(ch)
        assert g.shape == (5, 3) and g.any(0).all() and g.any(1).all()
    distances = [
        (font.GLYPHS[a] ^ font.GLYPHS[b]).sum() for a, b in itertools.combinations(font.FONT_CHARS, 2)
    ]
    assert min(distances) >= 4
    with pytest.raises(KeyError, match="not in the mini world's font"):
        font.glyph("a")


def test_text_mask_layout():
    mask = font.text_mask("B7", scale=2)
    assert mask.shape == (10, font.text_width(2, 2)) == (10, 14)
    assert not mask[:, 6:8].any()  # one font pixel (2 px) of gap between glyphs
    assert (mask[::2, 0:6:2] == font.GLYPHS["B"]).all()


def test_shape_coverage_areas():
    side = 16
    assert shape_coverage("square", side).sum() == side * side
    assert shape_coverage("circle", side).sum() == pytest.approx(np.pi * side * side / 4, rel=0.02)
    assert shape_coverage("triangle", side).sum() == pytest.approx(side * side / 2, rel=0.02)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_coverage("star", 8)


def test_render_contract_and_determinism():
    meta = grammar.prompt_set("geneval", "test")[0]
    a = render(meta, np.random.default_rng(3))
    b = render(meta, np.random.default_rng(3))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert (a[0] == 255).all() and (a[:, 0] == 255).all()  # a 1 px white margin
    metas = grammar.prompt_set("geneval", "test")[:5]
    batch = render_batch(metas, np.random.default_rng(4))
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    rng = np.random.default_rng(4)
    one_by_one = np.stack([render(m, rng) for m in metas])
    assert torch.equal(batch, torch.from_numpy(one_by_one).permute(0, 3, 1, 2).float() / 255)
    assert render(metas[0], np.random.default_rng(0), size=64).shape == (64, 64, 3)


def test_render_uses_only_white_and_palette_blends():
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue"},
        ],
        "prompt": "x",
    }
    img = render(meta, np.random.default_rng(0)).astype(float)
    white = np.array(grammar.BACKGROUND, float)
    for name in ("red", "blue"):
        c = np.array(grammar.PALETTE[name], float)
        assert (np.abs(img - c).max(-1) <= 1).any(), name  # the exact colour is present
    # every pixel is a blend of white with red or with blue (anti-aliasing), up to rounding
    residual = np.min(
        [
            np.linalg.norm(
                img
                - white
                - np.clip(((img - white) @ (c - white)) / ((c - white) @ (c - white)), 0, 1)[..., None]
                * (c - white),
                axis=-1,
            )
            for c in (np.array(grammar.PALETTE["red"], float), np.array(grammar.PALETTE["blue"], float))
        ],
        axis=0,
    )
    assert residual.max() < 2.0


def test_layouts_obey_counts_gaps_relations_and_free_colours():
    rng = np.random.default_rng(11)
    metas = grammar.prompt_set("geneval", "test") + grammar.prompt_set("compbench", "heldout")
    for meta in metas:
        for _ in range(3):
            objs = layout(meta, rng)
            assert len(objs) == sum(c["count"] for c in meta["include"])
            for a, b in itertools.combinations(objs, 2):
                gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
                gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
                assert max(gap_x, gap_y) >= 2
            for o in objs:
                assert 1 <= o.box[0] and o.box[2] <= 31 and 1 <= o.box[1] and o.box[3] <= 31
            k = 0
            for clause in meta["include"]:
                group = objs[k : k + clause["count"]]
                k += clause["count"]
                assert all(o.cls == clause["class"] for o in group)
                if "color" in clause:
                    assert all(o.color == clause["color"] for o in group)
                else:  # free colours never show a held-out colour-shape pair
                    assert all((o.color, o.cls) not in grammar.HELDOUT_COLOR_SHAPE for o in group)
                if "position" in clause:
                    rel, target = clause["position"]
                    ref = objs[sum(c["count"] for c in meta["include"][:target])]
                    for o in group:  # GenEval's own relation rule (inclusive pixel boxes)
                        box = (o.box[0], o.box[1], o.box[2] - 1, o.box[3] - 1)
                        rbox = (ref.box[0], ref.box[1], ref.box[2] - 1, ref.box[3] - 1)
                        assert relative_position(Detection(box, 1.0), Detection(rbox, 1.0)) == {rel}


def test_text_render_is_the_font_in_black():
    meta = grammar.text_meta("ZB4")
    img = render(meta, np.random.default_rng(5))
    ink = (img == 0).all(-1)
    assert ((img == 0).all(-1) | (img == 255).all(-1)).all()
    ys, xs = np.nonzero(ink)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scale = crop.shape[0] // 5
    assert np.array_equal(crop, font.text_mask("ZB4", scale))


def test_render_rejects_bad_prompts():
    with pytest.raises(ValueError, match="no 'include'"):
        render({"tag": "single_object", "include": [], "prompt": "a photo of"}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown shape"):
        render(
            {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
            np.random.default_rng(0),
        )
