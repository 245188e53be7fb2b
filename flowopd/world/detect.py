"""Exact detectors of the mini world: palette segmentation, shape detection and a glyph reader.

Pixels are explained as a blend of the white background and one reference colour (the four palette colours
and black ink): for colour c, ``alpha = <x - w, c - w> / |c - w|^2`` and the residual is
``|x - w - alpha (c - w)|``. The colour with the smallest residual explains the pixel; the pixel belongs to it
when ``alpha >= 0.5`` (at least half-way from white) and the residual is within a tolerance. A blend of red
and white at an anti-aliased or blurred edge is therefore red or background, never the nearest other colour.
Connected components (8-connectivity) below a minimum area are specks, not objects. Each object's shape is the
ideal shape (circle, square, upright triangle; blurred or not) that best fits its soft alpha map by soft IoU,
with the box given by the object's centroid and second moments; that fit, reduced for elongated boxes, maps to
a confidence so that GenEval's thresholds keep their meaning (0.3 drops blobs, 0.9 keeps clean shapes). Glyphs
are read by segmenting ink columns and matching 3x5 cells to the font's templates. See docs/mini_world.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from flowopd.scorers.geneval_rules import Detection
from flowopd.world import grammar
from flowopd.world.font import GLYPH_HEIGHT, GLYPH_WIDTH, GLYPHS

#: Colours the detectors know: the palette plus black ink (GenEval colour names).
REFERENCE_COLORS: dict[str, tuple[int, int, int]] = {**grammar.PALETTE, "black": grammar.INK}
COLOR_NAMES: tuple[str, ...] = tuple(REFERENCE_COLORS)
MIN_ALPHA = 0.5
TOLERANCE = 0.35  # max residual (RGB in [0, 1]) of a pixel assigned to a colour
MIN_AREA = 6  # px on a 32x32 image; scaled with the image area
#: Piecewise-linear map from template fit (soft IoU) to detection confidence. Renderer shapes fit >= 0.96
#: (>= 0.9 with noise of std 0.05), random blobs of noise images 0.5-0.75, merged or torn shapes ~0.7-0.85.
CONFIDENCE_KNOTS: tuple[tuple[float, ...], tuple[float, ...]] = ((0.6, 0.8, 0.9, 1.0), (0.0, 0.3, 0.9, 1.0))
MAX_EXTENT = 0.9  # a component spanning this much of the image's width or height is a backdrop, not an object
ELONGATION_FREE = 0.8  # box aspect ratios (short/long side) above this carry no confidence penalty
_MARGIN = 2  # px around an object's mask where its blurred fringe is collected
GLYPH_MIN_CORRELATION = 0.6  # Pearson correlation with the best template below which a glyph reads "?"
UNKNOWN = -2  # label of a pixel that is far from white but matches no reference colour
BACKGROUND = -1

_WHITE = np.asarray(grammar.BACKGROUND, dtype=np.float64) / 255.0
_REFS = np.stack([np.asarray(c, dtype=np.float64) / 255.0 for c in REFERENCE_COLORS.values()]) - _WHITE
_EIGHT = np.ones((3, 3), dtype=bool)


def as_float_image(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float [0, 1] -> float64 [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else np.clip(arr.astype(np.float64), 0, 1)


@dataclass(frozen=True)
class PixelMap:
    """Per-pixel explanation of an image: ``label`` (colour index, BACKGROUND or UNKNOWN) and each alpha."""

    label: np.ndarray  # (H, W) int
    alpha: np.ndarray  # (K, H, W) float, the blend weight of each reference colour
    residual: np.ndarray  # (K, H, W) float


def classify_pixels(image: np.ndarray) -> PixelMap:
    """Assign every pixel to a reference colour, the background, or UNKNOWN (see the module docstring)."""
    x = as_float_image(image) - _WHITE  # (H, W, 3), white = 0
    alpha = np.einsum("hwc,kc->khw", x, _REFS) / (_REFS**2).sum(1)[:, None, None]
    residual = np.linalg.norm(x[None] - alpha[..., None] * _REFS[:, None, None, :], axis=-1)
    # The best explanation is the colour whose blend with white fits best (a grey pixel is faint black,
    # never pale green); the pixel is that colour's if the blend is at least half-way and fits well enough.
    fits = np.where(alpha > 0, residual, np.inf)
    best = fits.argmin(0)
    best_res = np.take_along_axis(fits, best[None], 0)[0]
    best_alpha = np.take_along_axis(alpha, best[None], 0)[0]
    label = np.where((best_alpha >= MIN_ALPHA) & (best_res <= TOLERANCE), best, BACKGROUND)
    # Far from white (half-way to the nearest reference colour) yet explained by no blend: unknown colour.
    far = np.linalg.norm(x, axis=-1) >= MIN_ALPHA * np.linalg.norm(_REFS, axis=1).min()
    label = np.where((best_res > TOLERANCE) & far, UNKNOWN, label)
    return PixelMap(label=label, alpha=alpha, residual=residual)


def min_area(height: int, width: int) -> int:
    """Smallest component that counts as an object (6 px at 32x32, scaled by area)."""
    return max(3, round(MIN_AREA * height * width / grammar.IMAGE_SIZE**2))


@dataclass(frozen=True)
class Component:
    """A connected region of one colour: its mask, box (x1, y1, x2, y2 exclusive) and area."""

    color: str
    mask: np.ndarray
    box: tuple[int, int, int, int]
    area: int


def components(pixels: PixelMap, colors: tuple[str, ...] = COLOR_NAMES) -> list[Component]:
    """Every 8-connected component of every colour in ``colors`` (specks included), in a fixed order."""
    out: list[Component] = []
    for k, name in enumerate(COLOR_NAMES):
        if name not in colors:
            continue
        labelled, _ = ndimage.label(pixels.label == k, structure=_EIGHT)
        for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
            mask = labelled == i
            ys, xs = sl
            out.append(Component(name, mask, (xs.start, ys.start, xs.stop, ys.stop), int(mask[sl].sum())))
    return out


_SHAPE_SS = 4  # supersampling of the ideal templates, as the renderer's
# px; templates are matched at each blur, so soft (blurred) images still fit their shape
_BLURS = (0.0, 0.4, 0.7, 1.0, 1.4)
_FLOOR = 0.1  # alpha below this is treated as background when comparing with a template
_SMOOTH = 0.8  # px; noise of std 0.05 then costs ~0.02 IoU instead of ~0.06
_NOISE_FLOOR = 0.05  # alpha below this is background noise, not the object's blurred fringe


@lru_cache(maxsize=256)
def _subpixel_centres(n: int) -> np.ndarray:
    """Centres of the ``n * _SHAPE_SS`` subpixels along an axis of ``n`` pixels (read-only, shared)."""
    centres = (np.arange(n * _SHAPE_SS) + 0.5) / _SHAPE_SS
    centres.flags.writeable = False
    return centres


def _coverage(cls: str, height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Soft coverage of ``cls`` inscribed in the continuous box (x0, y0, w, h) on a height x width grid."""
    x0, y0, bw, bh = box
    y = (_subpixel_centres(height) - y0)[:, None] / bh  # box-relative coordinates
    x = (_subpixel_centres(width) - x0)[None, :] / bw
    if cls == "circle":
        inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    else:
        inside = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
        if cls == "triangle":
            inside &= np.abs(x - 0.5) <= y / 2
    # a count of subpixels over their number: exact, the same as a float mean, and faster
    return inside.reshape(height, _SHAPE_SS, width, _SHAPE_SS).sum(axis=(1, 3)) / _SHAPE_SS**2


@lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian blur with zero padding (as ``gaussian_filter(mode="constant")``)."""
    if sigma == 0:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    radius = int(4 * sigma + 0.5)  # scipy's default truncation
    kernel = np.where(np.abs(d) <= radius, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
    full = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
    return kernel / full


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a small 2-D map by matrix products (cached kernels; fast on tiny crops)."""
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def _fit_box(cls: str, cy: float, cx: float, var_y: float, var_x: float) -> tuple[float, float, float, float]:
    """The box (x0, y0, w, h) of ``cls`` with the given centroid and second moments (uniform density)."""
    if cls == "square":  # var = side^2 / 12
        w, h = np.sqrt(12 * var_x), np.sqrt(12 * var_y)
        return cx - w / 2, cy - h / 2, w, h
    if cls == "circle":  # var = diameter^2 / 16
        w, h = 4 * np.sqrt(var_x), 4 * np.sqrt(var_y)
        return cx - w / 2, cy - h / 2, w, h
    # upright triangle: centroid 2/3 of the height below the apex, var_y = h^2 / 18, var_x = w^2 / 24
    w, h = np.sqrt(24 * var_x), np.sqrt(18 * var_y)
    return cx - w / 2, cy - 2 * h / 3, w, h


def classify_shape(alpha: np.ndarray) -> tuple[str, float, dict[str, float]]:
    """(best class, confidence, score per class) of one object's soft alpha map (crop with a margin).

    For each class and each assumed blur, the ideal shape whose box has the object's centroid and (blur-
    corrected) second moments is drawn, blurred, and compared by soft IoU (sum of minima / sum of maxima).
    A class's score is its best IoU over blurs. The best class's score, reduced for elongated boxes (aspect
    ratio below ELONGATION_FREE; the world's shapes have square boxes), is mapped to a confidence through
    CONFIDENCE_KNOTS, so that blobs (fit <= 0.8) fall below GenEval's 0.3 and only clean shapes reach 0.9.
    """
    raw = np.clip(alpha, 0, 1)
    raw = np.where(raw >= _NOISE_FLOOR, raw, 0.0)  # moments: untruncated fringes, without background noise
    a = np.clip((raw - _FLOOR) / (1 - _FLOOR), 0, 1)
    mass = raw.sum()
    height, width = a.shape
    if a.sum() <= 0:
        return grammar.SHAPES[0], 0.0, dict.fromkeys(grammar.SHAPES, 0.0)
    yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    cy, cx = (raw * yy).sum() / mass, (raw * xx).sum() / mass
    var_y, var_x = (raw * (yy - cy) ** 2).sum() / mass, (raw * (xx - cx) ** 2).sum() / mass
    a_smooth = _blur(a, _SMOOTH)
    scores: dict[str, float] = {}
    aspects: dict[str, float] = {}
    for cls in grammar.SHAPES:
        best = 0.0
        for sigma in _BLURS:
            vy, vx = var_y - sigma**2, var_x - sigma**2
            if min(vy, vx) <= 0.25:  # the blur would explain the whole object: not this hypothesis
                continue
            box = _fit_box(cls, cy, cx, vy, vx)
            tmpl = _coverage(cls, height, width, box)
            tmpl = np.clip((_blur(tmpl, sigma) - _FLOOR) / (1 - _FLOOR), 0, 1)
            tmpl = _blur(tmpl, _SMOOTH)
            iou = float(np.minimum(a_smooth, tmpl).sum() / np.maximum(a_smooth, tmpl).sum())
            if iou > best:
                best, aspects[cls] = iou, min(box[2], box[3]) / max(box[2], box[3])
        scores[cls] = best
    cls = max(grammar.SHAPES, key=lambda c: scores[c])  # ties: the grammar's order, deterministically
    fit = scores[cls] * min(1.0, aspects.get(cls, 1.0) / ELONGATION_FREE)
    return cls, float(np.interp(fit, *CONFIDENCE_KNOTS)), scores


def detect_objects(image: np.ndarray, pixels: PixelMap | None = None) -> dict[str, list[Detection]]:
    """GenEval-style raw detections per shape class, most confident first, with exact colours and masks."""
    pixels = classify_pixels(image) if pixels is None else pixels
    height, width = pixels.label.shape
    smallest = min_area(height, width)
    found: dict[str, list[Detection]] = {}
    comps = [
        c
        for c in components(pixels)
        if c.area >= smallest
        and c.box[2] - c.box[0] < MAX_EXTENT * width
        and c.box[3] - c.box[1] < MAX_EXTENT * height
    ]
    taken = np.zeros((height, width), dtype=bool)
    for comp in comps:
        taken |= comp.mask
    for comp in comps:
        x1, y1, x2, y2 = comp.box
        # The object's soft alpha around it (blurred fringes included), other objects' pixels excluded.
        region = ndimage.binary_dilation(comp.mask, structure=_EIGHT, iterations=_MARGIN) & ~(
            taken & ~comp.mask
        )
        k = COLOR_NAMES.index(comp.color)
        sl = (slice(max(0, y1 - _MARGIN), y2 + _MARGIN), slice(max(0, x1 - _MARGIN), x2 + _MARGIN))
        cls, confidence, _ = classify_shape((pixels.alpha[k] * region)[sl])
        # GenEval boxes are (x1, y1, x2, y2) with inclusive pixel ends (its IoU adds 1 to widths).
        det = Detection(
            box=(float(x1), float(y1), float(x2 - 1), float(y2 - 1)),
            score=confidence,
            mask=comp.mask,
            color=comp.color,
        )
        found.setdefault(cls, []).append(det)
    for dets in found.values():
        dets.sort(key=lambda d: -d.score)  # stable: ties keep the component order
    return found


# ---------------------------------------------------------------- glyph reader

_GLYPH_CHARS = tuple(GLYPHS)
_GLYPH_STACK = np.stack([GLYPHS[c].astype(np.float64).ravel() for c in _GLYPH_CHARS])  # (C, 15)
_GLYPH_Z = (_GLYPH_STACK - _GLYPH_STACK.mean(1, keepdims=True)) / _GLYPH_STACK.std(1, keepdims=True)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True values."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _area_weights(start: float, stop: float, cells: int, length: int) -> np.ndarray:
    """(cells, length) weights of each pixel's overlap with each of ``cells`` equal cells of [start, stop)."""
    bounds = np.linspace(start, stop, cells + 1)
    lo = np.arange(length)[None, :]
    overlap = np.clip(np.minimum(lo + 1, bounds[1:, None]) - np.maximum(lo, bounds[:-1, None]), 0, None)
    return overlap / overlap.sum(1, keepdims=True)


def read_glyphs(image: np.ndarray, pixels: PixelMap | None = None) -> tuple[str, list[float]]:
    """Read the single line of dark 3x5 glyphs; ("", []) when the image has no ink.

    Ink = pixels assigned to black; specks below 3 px are ignored. The text line is the tallest band of ink
    rows; its height gives the font scale s (glyph 3s wide, gap s), so a run of ink columns wider than one
    glyph is split into round((width + s) / 4s) glyphs. Each glyph is averaged into 3x5 cells of darkness and
    matched to the template of highest Pearson correlation (insensitive to the contrast lost to blur);
    below GLYPH_MIN_CORRELATION it reads as "?". Returns (text, best correlation per glyph).
    """
    pixels = classify_pixels(image) if pixels is None else pixels
    k = COLOR_NAMES.index("black")
    ink = pixels.label == k
    labelled, _ = ndimage.label(ink, structure=_EIGHT)
    sizes = np.bincount(labelled.ravel())
    ink &= sizes[labelled] >= 3
    bands = _runs(ink.any(1))
    if not bands:
        return "", []
    top, bottom = max(bands, key=lambda b: (b[1] - b[0], -b[0]))
    scale = (bottom - top) / GLYPH_HEIGHT
    darkness = np.clip(pixels.alpha[k], 0, 1) * ink_region(ink)
    band = ink[top:bottom]
    text, matches = [], []
    for x0, x1 in _runs(band.any(0)):
        n = max(1, round((x1 - x0 + scale) / ((GLYPH_WIDTH + 1) * scale)))
        pitch = (x1 - x0 + scale) / n
        for i in range(n):
            g0, g1 = x0 + i * pitch, x0 + i * pitch + pitch - scale
            rows = _area_weights(top, bottom, GLYPH_HEIGHT, darkness.shape[0])
            cols = _area_weights(g0, g1, GLYPH_WIDTH, darkness.shape[1])
            cells = (rows @ darkness @ cols.T).ravel()
            spread = cells.std()
            corr = (
                _GLYPH_Z @ ((cells - cells.mean()) / spread) / cells.size
                if spread > 0
                else np.zeros(len(_GLYPH_Z))
            )
            j = int(corr.argmax())
            matches.append(float(corr[j]))
            text.append(_GLYPH_CHARS[j] if corr[j] >= GLYPH_MIN_CORRELATION else "?")
    return "".join(text), matches


def ink_region(ink: np.ndarray) -> np.ndarray:
    """Ink pixels grown by one pixel: darkness outside it (stray dark specks) is ignored."""
    return ndimage.binary_dilation(ink, structure=_EIGHT).astype(np.float64)


def summarise(detections: Mapping[str, list[Detection]]) -> str:
    """A short human-readable list of detections, e.g. 'red circle 0.97; blue square 1.00'."""
    return "; ".join(f"{d.color} {cls} {d.score:.2f}" for cls in sorted(detections) for d in detections[cls])
