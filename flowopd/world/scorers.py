"""The mini world's exact scorers: GenEval and OCR rules on exact detections, quality and preference analogues.

Every scorer quantises images to uint8 first (as the image cache stores PNGs), so a score is the same whether
an image comes from memory or from the cache, and every image is scored alone (batch == one by one).
Definitions and scales: docs/mini_world.md.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from flowopd.scorers.base import Scale, ScoreBatch, to_uint8_hwc
from flowopd.scorers.geneval_rules import TAGS as GENEVAL_TAGS
from flowopd.scorers.geneval_rules import Detection, evaluate_geneval, filter_detections
from flowopd.scorers.ocr_rules import ocr_accuracy
from flowopd.world import detect


def _check_batch(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> np.ndarray:
    arr = to_uint8_hwc(images)
    if len(prompts) != len(arr) or len(metadata) != len(arr):
        raise ValueError(
            f"got {len(arr)} images, {len(prompts)} prompts and {len(metadata)} metadata records"
        )
    return arr


# ---------------------------------------------------------------- GenEval and CompBench analogues


def clause_credit(
    metadata: Mapping[str, Any], detections: Mapping[str, Sequence[Detection]]
) -> tuple[int, int]:
    """(satisfied, total) clauses of a GenEval record on already-filtered detections.

    An include clause is judged by the rule engine on its own (with its position target clause, if any,
    which must then hold too); an exclude clause holds when fewer than ``count`` objects of its class are
    present (GenEval's exclude rule).
    """
    include = list(metadata["include"])
    satisfied = 0
    for clause in include:
        if "position" in clause:
            rel, target = clause["position"]
            sub = [include[target], {**clause, "position": [rel, 0]}]
        else:
            sub = [clause]
        satisfied += evaluate_geneval({"tag": metadata["tag"], "include": sub}, detections).correct
    exclude = list(metadata.get("exclude", []))
    satisfied += sum(len(detections.get(c["class"], [])) < c["count"] for c in exclude)
    return satisfied, len(include) + len(exclude)


def _geneval_row(
    image: np.ndarray, meta: Mapping[str, Any], threshold: float, counting_threshold: float
) -> dict[str, Any]:
    raw = detect.detect_objects(image)
    kept = filter_detections(raw, meta["tag"], threshold=threshold, counting_threshold=counting_threshold)
    result = evaluate_geneval(meta, kept)
    satisfied, total = clause_credit(meta, kept)
    return {
        "correct": bool(result.correct),
        "reason": result.reason,
        "partial": satisfied / total,
        "detected": detect.summarise(raw),
    }


class MiniGenEvalScorer:
    """GenEval's rule engine (flowopd.scorers.geneval_rules) on the mini world's exact detections.

    Score 1/0 per image (correct or not); details: tag, correct, reason, partial (fraction of include and
    exclude clauses satisfied, a denser reward), detected (what the detector saw). Records whose tag is not
    one of GenEval's six (e.g. text prompts) score NaN (not applicable).
    """

    name = "mini-geneval"
    version = "1"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def __init__(self, *, threshold: float = 0.3, counting_threshold: float = 0.9) -> None:
        self.threshold = float(threshold)
        self.counting_threshold = float(counting_threshold)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        arr = _check_batch(images, prompts, metadata)
        scores: list[float] = []
        details: dict[str, list[Any]] = {k: [] for k in ("tag", "correct", "reason", "partial", "detected")}
        for image, meta in zip(arr, metadata):
            tag = meta.get("tag")
            if tag not in GENEVAL_TAGS:
                row = {
                    "correct": None,
                    "reason": f"not a GenEval prompt (tag {tag!r})",
                    "partial": math.nan,
                    "detected": "",
                }
                scores.append(math.nan)
            else:
                row = _geneval_row(image, meta, self.threshold, self.counting_threshold)
                scores.append(float(row["correct"]))
            details["tag"].append(tag)
            for key in ("correct", "reason", "partial", "detected"):
                details[key].append(row[key])
        return ScoreBatch(np.asarray(scores), details)


class MiniCompBenchScorer:
    """T2I-CompBench analogue on the held-out split: the GenEval rule with partial credit, per category.

    Score = fraction of the prompt's include/exclude clauses satisfied (in [0, 1]; T2I-CompBench's own
    scores are continuous too); details: category (color, shape, spatial, numeracy), tag, correct (all
    clauses), partial, reason. Records without a "category" score NaN.
    """

    name = "mini-compbench"
    version = "1"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def __init__(self, *, threshold: float = 0.3, counting_threshold: float = 0.9) -> None:
        self.threshold = float(threshold)
        self.counting_threshold = float(counting_threshold)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        arr = _check_batch(images, prompts, metadata)
        scores: list[float] = []
        details: dict[str, list[Any]] = {k: [] for k in ("category", "tag", "correct", "partial", "reason")}
        for image, meta in zip(arr, metadata):
            if "category" not in meta or meta.get("tag") not in GENEVAL_TAGS:
                row = {"correct": None, "partial": math.nan, "reason": "not a mini-compbench prompt"}
            else:
                row = _geneval_row(image, meta, self.threshold, self.counting_threshold)
            scores.append(float(row["partial"]))
            details["category"].append(meta.get("category"))
            details["tag"].append(meta.get("tag"))
            for key in ("correct", "partial", "reason"):
                details[key].append(row[key])
        return ScoreBatch(np.asarray(scores), details)


# ---------------------------------------------------------------- OCR analogue


class MiniOCRScorer:
    """The OCR accuracy rule (flowopd.scorers.ocr_rules) on the exact glyph reader; details: text read.

    Prompts without quoted text score NaN.
    """

    name = "mini-ocr"
    version = "1"
    higher_is_better = True
    scale = Scale(0.0, 1.0)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        arr = _check_batch(images, prompts, metadata)
        scores: list[float] = []
        texts: list[str | None] = []
        for image, prompt in zip(arr, prompts):
            if prompt.count('"') < 2:
                scores.append(math.nan)
                texts.append(None)
                continue
            text, _ = detect.read_glyphs(image)
            scores.append(ocr_accuracy(prompt, text))
            texts.append(text)
        return ScoreBatch(np.asarray(scores), {"text": texts})


# ---------------------------------------------------------------- image measurements (quality, preference)

MAX_FOREGROUND = 0.6  # more of the image than this far from white: no background, a degenerate image
MAX_NOISE = 0.25  # estimated noise std above this: the image is noise, degenerate
BLOTCH = 0.25  # a background pixel whose darkest channel is this far from white is a blotch
_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


@dataclass(frozen=True)
class Measurements:
    """Defects and properties of one image that the quality and preference analogues are built from."""

    degenerate: str  # "" or why the image is degenerate (nothing drawn, no background, pure noise)
    noise: float  # estimated per-channel noise std (Immerkaer's Laplacian, median-based), [0, 1] units
    softness: float  # soft edge pixels per boundary pixel of the objects, above the renderer's anti-aliasing
    dirt: float  # background away from objects: median tint (worst channel) + fraction of blotch pixels
    specks: int  # foreground components too small to be objects (unassigned colours included)
    shape_error: float  # mean (1 - confidence) of the coloured objects' shapes
    vividness: float  # mean alpha x fit of the object pixels to their colour, [0, 1]
    centring: float  # exp(-(distance of the objects' centroid from the centre / (size / 4))^2)
    sizing: float  # mean over objects of exp(-((box side / image side - 0.375) / 0.15)^2)


def estimate_noise(image: np.ndarray) -> float:
    """Noise std of a float image: 1.4826 x median |Laplacian| / 6 per channel, averaged (robust to edges)."""
    out = []
    for c in range(image.shape[2]):
        lap = ndimage.convolve(image[..., c], _LAPLACE, mode="reflect")[1:-1, 1:-1]
        out.append(1.4826 * float(np.median(np.abs(lap))) / 6.0)  # the mask's L2 norm is 6
    return float(np.mean(out))


# Soft edge pixels per boundary pixel that anti-aliasing alone produces (renderer images: <= 0.7).
SOFT_EDGE_FREE = 0.8


def measure(image: np.ndarray) -> Measurements:
    """All measurements of one (H, W, 3) uint8 image."""
    x = detect.as_float_image(image)
    height, width = x.shape[:2]
    pixels = detect.classify_pixels(x)
    comps = detect.components(pixels)
    smallest = detect.min_area(height, width)
    objects = [c for c in comps if c.area >= smallest]
    _, n_unknown = ndimage.label(pixels.label == detect.UNKNOWN, structure=np.ones((3, 3)))
    specks = sum(c.area < smallest for c in comps) + n_unknown
    foreground = float((pixels.label != detect.BACKGROUND).mean())
    noise = estimate_noise(x)
    empty = Measurements("", noise, 0.0, 0.0, specks, 1.0, 0.0, 0.0, 0.0)
    if not objects:
        return replace(empty, degenerate="nothing drawn")
    if foreground > MAX_FOREGROUND:
        return replace(empty, degenerate=f"no background ({foreground:.0%} foreground)")
    if noise > MAX_NOISE:
        return replace(empty, degenerate=f"noise (std {noise:.2f})")
    eight = np.ones((3, 3), dtype=bool)
    near = np.zeros((height, width), dtype=bool)
    soft, boundary, vivid, vivid_n = 0, 0, 0.0, 0
    shape_errors, sizes = [], []
    mass_y = mass_x = mass = 0.0
    for comp in objects:
        k = detect.COLOR_NAMES.index(comp.color)
        ring = ndimage.binary_dilation(comp.mask, structure=eight, iterations=2)
        near |= ring
        alpha = pixels.alpha[k]
        soft += int(((alpha > 0.1) & (alpha < 0.9) & ring).sum())
        boundary += int((comp.mask & ~ndimage.binary_erosion(comp.mask, structure=eight)).sum())
        fit = np.clip(alpha, 0, 1) * (1 - np.minimum(1, pixels.residual[k] / detect.TOLERANCE))
        vivid += float(fit[comp.mask].sum())
        vivid_n += comp.area
        x1, y1, x2, y2 = comp.box
        if comp.color != "black":  # glyphs are not shapes
            sl = (slice(max(0, y1 - 2), y2 + 2), slice(max(0, x1 - 2), x2 + 2))
            _, confidence, _ = detect.classify_shape((alpha * ring)[sl])
            shape_errors.append(1.0 - confidence)
        side = max(x2 - x1, y2 - y1) / max(height, width)
        sizes.append(math.exp(-(((side - 0.375) / 0.15) ** 2)))
        ys, xs = np.nonzero(comp.mask)
        mass_y, mass_x, mass = (
            mass_y + ys.sum() + 0.5 * len(ys),
            mass_x + xs.sum() + 0.5 * len(xs),
            mass + len(ys),
        )
    background = (pixels.label == detect.BACKGROUND) & ~near
    if background.any():
        # A tint (median, per channel: zero-mean pixel noise is the noise term's business) plus blotches.
        tint = float(np.max(np.median(1.0 - x[background], axis=0)))
        blotches = float((1.0 - x.min(axis=2))[background].__gt__(BLOTCH).mean())
        dirt = tint + blotches
    else:
        dirt = 1.0
    dist = math.hypot(mass_y / mass - height / 2, mass_x / mass - width / 2)
    return Measurements(
        degenerate="",
        noise=noise,
        softness=max(0.0, soft / max(boundary, 1) - SOFT_EDGE_FREE),
        dirt=dirt,
        specks=specks,
        shape_error=float(np.mean(shape_errors)) if shape_errors else 0.0,
        vividness=vivid / max(vivid_n, 1),
        centring=math.exp(-((dist / (max(height, width) / 4)) ** 2)),
        sizing=float(np.mean(sizes)),
    )


# Penalty weights of the quality analogue (docs/mini_world.md): quality = 1 + 4 exp(-penalty).
QUALITY_WEIGHTS: dict[str, float] = {
    "noise": 12.0,
    "softness": 0.6,
    "dirt": 8.0,
    "specks": 0.1,
    "shape_error": 2.0,
}
# Weights of the preference analogue: pick = 10 x weighted mean of four terms in [0, 1].
PICK_WEIGHTS: dict[str, float] = {"vividness": 0.35, "centring": 0.25, "sizing": 0.25, "clean": 0.15}


def quality_penalty(m: Measurements) -> float:
    """The quality analogue's penalty (0 for a perfect image); infinite for a degenerate one."""
    if m.degenerate:
        return math.inf
    return sum(w * float(getattr(m, key)) for key, w in QUALITY_WEIGHTS.items())


_MEASURED: OrderedDict[tuple[tuple[int, ...], bytes], Measurements] = OrderedDict()
_MEASURED_MAX = 1024  # images remembered (an evaluation's pick and quality share 192)
_MEASURED_LOCK = threading.Lock()  # GRPO scores rewards on a worker thread


def _measure_remembered(image: np.ndarray) -> Measurements:
    """:func:`measure`, remembered by the image's pixels: the quality and preference analogues measure the same
    images (in an evaluation, mini-pick and mini-quality both score mini-geneval's)."""
    key = (image.shape, image.tobytes())
    with _MEASURED_LOCK:
        if key in _MEASURED:
            _MEASURED.move_to_end(key)
            return _MEASURED[key]
    m = measure(image)  # the array itself, not a copy from the key: same memory layout, same float sums
    with _MEASURED_LOCK:
        _MEASURED[key] = m
        while len(_MEASURED) > _MEASURED_MAX:
            _MEASURED.popitem(last=False)
    return m


def _per_image(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> list[Measurements]:
    return [_measure_remembered(image) for image in _check_batch(images, prompts, metadata)]


class MiniQualityScorer:
    """DeQA analogue, 1-5: ``1 + 4 exp(-penalty)`` from measurable defects of the drawn objects.

    penalty = 12 noise + 0.6 softness + 8 dirt + 0.1 specks + 2 shape_error (see :class:`Measurements`);
    degenerate images (nothing drawn, no background, pure noise) score exactly 1. Details: each measurement.
    """

    name = "mini-quality"
    version = "1"
    higher_is_better = True
    scale = Scale(1.0, 5.0)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        rows = _per_image(images, prompts, metadata)
        scores = [1.0 + 4.0 * math.exp(-quality_penalty(m)) for m in rows]
        keys = ("degenerate", "noise", "softness", "dirt", "specks", "shape_error")
        return ScoreBatch(np.asarray(scores), {k: [getattr(m, k) for m in rows] for k in keys})


class MiniPickScorer:
    """PickScore analogue, 0-10: a fixed preference for vivid colours, a centred group of well-sized objects
    (box side ~37.5% of the image) and a clean background.

    pick = 10 x (0.35 vividness + 0.25 centring + 0.25 sizing + 0.15 exp(-10 dirt - 0.2 specks));
    degenerate images score 0. Details: the four terms.
    """

    name = "mini-pick"
    version = "1"
    higher_is_better = True
    scale = Scale(0.0, 10.0)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> ScoreBatch:
        rows = _per_image(images, prompts, metadata)
        scores, terms = [], {k: [] for k in PICK_WEIGHTS}
        for m in rows:
            values = {
                "vividness": m.vividness,
                "centring": m.centring,
                "sizing": m.sizing,
                "clean": 0.0 if m.degenerate else math.exp(-10 * m.dirt - 0.2 * m.specks),
            }
            scores.append(0.0 if m.degenerate else 10 * sum(PICK_WEIGHTS[k] * v for k, v in values.items()))
            for k, v in values.items():
                terms[k].append(float(v))
        return ScoreBatch(np.asarray(scores), {"degenerate": [m.degenerate for m in rows], **terms})


__all__ = [
    "Measurements",
    "MiniCompBenchScorer",
    "MiniGenEvalScorer",
    "MiniOCRScorer",
    "MiniPickScorer",
    "MiniQualityScorer",
    "clause_credit",
    "measure",
]
