"""The mini world's renderer: a correct 32x32 image for any prompt of :mod:`flowopd.world.grammar`.

Shapes are drawn anti-aliased (4x4 supersampled coverage) in their exact palette colour on white, with random
sizes and placements; boxes never touch (a gap of at least 2 px), so exact detection separates them.
Relations are drawn so that GenEval's rule (METHOD.md s.5: centre offset reduced by 0.1 x the summed box sizes,
normalised, > 0.5 on an axis) holds with a margin: the subject's box lies wholly on the named side of the
reference's box and the off-axis centre offset is at most a quarter of the on-axis one (ratio >= 0.77).
Colours left free by a prompt never form a held-out colour-shape pair. Text is black 3x5 glyphs at scale 2-3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowopd.world import grammar
from flowopd.world.font import GLYPH_HEIGHT, text_mask, text_width

_SUPERSAMPLE = 4
_GAP = 2  # px between any two boxes (Chebyshev), so components never merge
_MARGIN = 1  # px between a box and the image border
_OFF_AXIS = 0.25  # max |off-axis offset| / |on-axis offset| for a drawn relation
_TEXT_SCALES = (2, 3)
#: Side of a shape in px on a 32 px canvas, by the number of objects in the image.
_SIDES = {1: (9, 16), 2: (8, 13), 3: (7, 11), 4: (7, 9)}


@dataclass(frozen=True)
class Placed:
    """One drawn object: class, colour name and its box (x1, y1, x2, y2) in px, x2/y2 exclusive."""

    cls: str
    color: str
    box: tuple[int, int, int, int]


def shape_coverage(cls: str, side: int, supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """(side, side) float coverage in [0, 1] of ``cls`` drawn in a side x side box (upright triangle)."""
    n = side * supersample
    c = (np.arange(n) + 0.5) / supersample  # subsample centres, in px from the box corner
    y, x = np.meshgrid(c, c, indexing="ij")
    half = side / 2
    if cls == "circle":
        inside = (x - half) ** 2 + (y - half) ** 2 <= half**2
    elif cls == "square":
        inside = np.ones_like(x, dtype=bool)
    elif cls == "triangle":
        inside = np.abs(x - half) <= y / 2  # apex at the top centre, base on the bottom edge
    else:
        raise ValueError(f"unknown shape class {cls!r}; the mini world draws {grammar.SHAPES}")
    return inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = _GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _relation_holds(rel: str, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Subject box ``a`` is ``rel`` reference box ``b`` with the margin described in the module docstring."""
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    if rel == "left of":
        return a[2] + _GAP <= b[0] and abs(dy) <= _OFF_AXIS * abs(dx)
    if rel == "right of":
        return b[2] + _GAP <= a[0] and abs(dy) <= _OFF_AXIS * abs(dx)
    if rel == "above":
        return a[3] + _GAP <= b[1] and abs(dx) <= _OFF_AXIS * abs(dy)
    if rel == "below":
        return b[3] + _GAP <= a[1] and abs(dx) <= _OFF_AXIS * abs(dy)
    raise ValueError(f"unknown relation {rel!r}; expected one of {grammar.RELATIONS}")


def _free_color(cls: str, rng: np.random.Generator) -> str:
    allowed = [c for c in grammar.COLORS if (c, cls) not in grammar.HELDOUT_COLOR_SHAPE]
    return allowed[int(rng.integers(len(allowed)))]


def layout(meta: Mapping[str, Any], rng: np.random.Generator, size: int = grammar.IMAGE_SIZE) -> list[Placed]:
    """Random boxes and colours for every object the prompt's ``include`` clauses ask for."""
    clauses = list(meta.get("include", []))
    if not clauses:
        raise ValueError(f"prompt {meta.get('prompt')!r} has no 'include' clauses and no 'text' to render")
    objects: list[tuple[int, str, str]] = []  # (clause index, class, colour)
    for k, clause in enumerate(clauses):
        for _ in range(int(clause["count"])):
            color = clause.get("color") or _free_color(clause["class"], rng)
            objects.append((k, clause["class"], color))
    lo, hi = _SIDES[min(len(objects), 4)]
    scale = size / grammar.IMAGE_SIZE
    for attempt in range(200):
        shrink = attempt // 40  # smaller objects if a layout keeps failing
        low = max(4, lo - shrink)
        high = max(low, hi - 2 * shrink)
        sides = [max(4, round(int(rng.integers(low, high + 1)) * scale)) for _ in objects]
        placed: list[Placed] = []
        first_of_clause: dict[int, tuple[int, int, int, int]] = {}
        for (k, cls, color), side in zip(objects, sides):
            position = clauses[k].get("position")
            for _ in range(300):
                x = int(rng.integers(_MARGIN, size - _MARGIN - side + 1))
                y = int(rng.integers(_MARGIN, size - _MARGIN - side + 1))
                box = (x, y, x + side, y + side)
                if not all(_separated(box, p.box) for p in placed):
                    continue
                if position is not None and not _relation_holds(
                    position[0], box, first_of_clause[position[1]]
                ):
                    continue
                break
            else:
                break
            placed.append(Placed(cls, color, box))
            first_of_clause.setdefault(k, box)
        if len(placed) == len(objects):
            return placed
    raise RuntimeError(f"could not lay out {len(objects)} objects for {meta.get('prompt')!r} on {size} px")


def _paint(canvas: np.ndarray, coverage: np.ndarray, x: int, y: int, rgb: Sequence[int]) -> None:
    h, w = coverage.shape
    region = canvas[y : y + h, x : x + w]
    region += coverage[..., None] * (np.asarray(rgb, dtype=np.float64) - region)


def render(meta: Mapping[str, Any], rng: np.random.Generator, size: int = grammar.IMAGE_SIZE) -> np.ndarray:
    """A correct (size, size, 3) uint8 image for the prompt ``meta`` (GenEval, compbench or text)."""
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = grammar.BACKGROUND
    if "text" in meta:
        text = str(meta["text"])
        scales = [s for s in _TEXT_SCALES if text_width(len(text), s) <= size - 2 * _MARGIN]
        if not scales or GLYPH_HEIGHT * scales[0] > size - 2 * _MARGIN:
            raise ValueError(f"text {text!r} does not fit a {size} px image at scale >= {_TEXT_SCALES[0]}")
        scale = scales[int(rng.integers(len(scales)))]
        mask = text_mask(text, scale)
        x = int(rng.integers(_MARGIN, size - _MARGIN - mask.shape[1] + 1))
        y = int(rng.integers(_MARGIN, size - _MARGIN - mask.shape[0] + 1))
        _paint(canvas, mask.astype(np.float64), x, y, grammar.INK)
    else:
        for obj in layout(meta, rng, size):
            x1, y1, x2, _ = obj.box
            _paint(canvas, shape_coverage(obj.cls, x2 - x1), x1, y1, grammar.PALETTE[obj.color])
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_batch(
    metas: Sequence[Mapping[str, Any]], rng: np.random.Generator, size: int = grammar.IMAGE_SIZE
) -> torch.Tensor:
    """(N, 3, size, size) float images in [0, 1], one :func:`render` per prompt, drawn in order from ``rng``."""
    if not metas:
        return torch.zeros(0, 3, size, size)
    arr = np.stack([render(m, rng, size) for m in metas])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)
