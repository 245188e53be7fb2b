"""GenEval's rule engine as pure functions (METHOD.md section 5, GenEval row).

Follows ``evaluation/evaluate_images.py`` of djghosh13/geneval: per-class filtering of detector output
(confidence threshold, top-k cap, optional NMS), then the include / exclude clauses of a prompt's metadata
(object counts, colours of the most confident detections, relative positions). Detector and colour
classifier are injected, so the same rules serve the official scorer (Mask2Former + CLIP) and the mini
world's exact detections. The headline (mean of the six tag means) is computed by the scorer's aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

_INCLUDE_KEYS = frozenset({"class", "count", "color", "position"})
_EXCLUDE_KEYS = frozenset({"class", "count"})


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in pixels, confidence, optional (H, W) bool mask and colour.

    ``color`` is set by exact detectors (the mini world); ``None`` means "ask the colour classifier".
    """

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        if len(self.box) != 4:
            raise ValueError(f"Detection.box must be (x1, y1, x2, y2), got {self.box!r}")
        if self.mask is not None and np.ndim(self.mask) != 2:
            raise ValueError(f"Detection.mask must be a (H, W) array, got shape {np.shape(self.mask)}")


@dataclass(frozen=True)
class GenEvalResult:
    """Correctness of one image for its prompt; ``reason`` lists the failed clauses ("" when correct)."""

    correct: bool
    reason: str


ColorClassifier = Callable[[str, Sequence[Detection]], list[str]]


def compute_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes with GenEval's inclusive-pixel (+1) areas; 0 when the union is empty."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return float(inter / union) if union else 0.0


def filter_detections(
    raw: Mapping[str, Sequence[Detection]],
    tag: str,
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """Keep, per class, the confident detections GenEval evaluates, most confident first.

    score > threshold (``counting_threshold`` for the counting tag), sorted by score descending, at most
    ``max_objects``, then greedy NMS dropping boxes with IoU >= ``nms_threshold`` against a kept box (1.0
    disables NMS, the official default). Classes left empty are dropped. The keyword options mirror the
    official ``--options`` (threshold, counting_threshold, max_objects, max_overlap). Tied scores keep their
    input order (the official ``argsort()[::-1]`` leaves ties in an order set by numpy's sort algorithm), so
    exact detectors decide which tied objects count first. Scores are compared in float64 (the official
    compares mmdet's float32 scores in float32; they differ only for a score within float32 rounding of 0.3
    or 0.9).
    """
    cutoff = counting_threshold if tag == "counting" else threshold
    kept: dict[str, list[Detection]] = {}
    for classname, dets in raw.items():
        ordering = sorted((d for d in dets if d.score > cutoff), key=lambda d: -d.score)[:max_objects]
        chosen: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            chosen.append(best)
            if nms_threshold != 1:  # official: NMS_THRESHOLD == 1 switches suppression off entirely
                ordering = [d for d in ordering if compute_iou(best.box, d.box) < nms_threshold]
        if chosen:
            kept[classname] = chosen
    return kept


def relative_position(a: Detection, b: Detection, *, margin: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of ``a`` relative to ``b`` ("left of", "right of", "above", "below"; image y points down).

    The centre offset is shrunk on each axis by ``margin`` x (sum of the two boxes' sizes) (zero if it would
    cross 0), divided by the norm of the raw offset; an axis whose component exceeds 0.5 in magnitude gives
    a relation. Offsets below 1e-3 on both axes after shrinking give no relation. Computed in float64.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in a.box)
    bx1, by1, bx2, by2 = (float(v) for v in b.box)
    offset = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)
    sizes = (abs(ax2 - ax1) + abs(bx2 - bx1), abs(ay2 - ay1) + abs(by2 - by1))
    revised = [math.copysign(max(abs(o) - margin * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first problem in a GenEval metadata record (tag, include, exclude clauses)."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"GenEval metadata: expected a mapping, got {type(metadata).__name__}")
    where = f"GenEval metadata for prompt {metadata.get('prompt', '<no prompt>')!r}"
    if metadata.get("tag") not in TAGS:
        raise ValueError(f"{where}: 'tag' is {metadata.get('tag')!r}; expected one of {TAGS}")
    include = metadata.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list of clauses, got {include!r}")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, Sequence) or isinstance(exclude, str):
        raise ValueError(f"{where}: 'exclude' must be a list of clauses, got {exclude!r}")
    for kind, clauses, allowed in (("include", include, _INCLUDE_KEYS), ("exclude", exclude, _EXCLUDE_KEYS)):
        for i, clause in enumerate(clauses):
            at = f"{where}: {kind}[{i}]"
            if not isinstance(clause, Mapping):
                raise ValueError(f"{at} must be a mapping, got {clause!r}")
            unknown = set(clause) - allowed
            if unknown:  # a typo such as "colour" would otherwise silently skip a check
                raise ValueError(f"{at} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            if not isinstance(clause.get("class"), str) or not clause["class"]:
                raise ValueError(f"{at}: 'class' must be a non-empty string, got {clause.get('class')!r}")
            count = clause.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{at}: 'count' must be an integer >= 1, got {count!r}")
            if "color" in clause and clause["color"] not in COLORS:
                raise ValueError(f"{at}: 'color' is {clause['color']!r}; expected one of {COLORS}")
            if "position" in clause:
                position = clause["position"]
                if not isinstance(position, Sequence) or isinstance(position, str) or len(position) != 2:
                    raise ValueError(f"{at}: 'position' must be [relation, target index], got {position!r}")
                relation, target = position
                if relation not in RELATIONS:
                    raise ValueError(f"{at}: position relation {relation!r} is not one of {RELATIONS}")
                # only earlier include clauses have a matched group when this clause is evaluated
                if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < i:
                    raise ValueError(
                        f"{at}: position target index {target!r} out of range; it must name an earlier "
                        f"include clause (index < {i})"
                    )


def _colors_of(classname: str, found: Sequence[Detection], classify_colors: ColorClassifier | None) -> list[str]:
    """Colours of ``found``: the detections' own when all have one, else the classifier's."""
    if all(d.color is not None for d in found):
        return [str(d.color) for d in found]
    if classify_colors is None:
        raise ValueError(
            f"GenEval colour clause for class {classname!r}: detections carry no colour and no "
            "classify_colors callable was given; pass one (e.g. the CLIP colour classifier)"
        )
    colors = list(classify_colors(classname, found))
    if len(colors) != len(found):
        raise ValueError(
            f"classify_colors returned {len(colors)} colours for {len(found)} {classname!r} detections"
        )
    return colors


def evaluate_geneval(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Sequence[Detection]],
    classify_colors: ColorClassifier | None = None,
) -> GenEvalResult:
    """Apply a prompt's include (ANDed) and exclude clauses to already-filtered, score-sorted detections.

    Include: the top ``count`` detections of the class must exist; if a colour is asked, all of them must
    have it; if a position is asked, every one of them must stand in that relation to every object of the
    target clause's matched group (a failed target clause fails this one). Exclude: fails when at least
    ``count`` objects of the class are present.
    """
    validate_metadata(metadata)
    correct = True
    reasons: list[str] = []
    matched_groups: list[Sequence[Detection] | None] = []
    for req in metadata["include"]:
        classname, count = req["class"], req["count"]
        found = list(detections.get(classname, []))[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors_of(classname, found, classify_colors)
                wanted = req["color"]
                if colors.count(wanted) < count:
                    matched = False
                    tally = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(
                        f"expected {wanted} {classname}>={count}, found {colors.count(wanted)} {wanted}; and {tally}"
                    )
            if "position" in req and matched:
                expected_rel, target_index = req["position"]
                targets = matched_groups[target_index]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {classname} to be {expected_rel}")
                else:
                    matched, failure = _check_position(classname, expected_rel, found, targets)
                    if not matched:
                        reasons.append(failure)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        present = len(detections.get(req["class"], []))
        if present >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {present}")
    return GenEvalResult(correct=correct, reason="\n".join(reasons))


def _check_position(
    classname: str, expected_rel: str, found: Sequence[Detection], targets: Sequence[Detection]
) -> tuple[bool, str]:
    """Every found object must be ``expected_rel`` of every target; report the first pair that is not."""
    for obj in found:
        for target in targets:
            relations = relative_position(obj, target)
            if expected_rel not in relations:
                # sorted: the official joins a set, whose order varies between runs
                found = " and ".join(sorted(relations))
                return False, f"expected {classname} {expected_rel} target, found {found} target"
    return True, ""


def score_geneval(
    metadata: Mapping[str, Any],
    raw_detections: Mapping[str, Sequence[Detection]],
    classify_colors: ColorClassifier | None = None,
) -> GenEvalResult:
    """Filter raw detector output for the prompt's tag, then evaluate the prompt's clauses."""
    validate_metadata(metadata)
    return evaluate_geneval(metadata, filter_detections(raw_detections, metadata["tag"]), classify_colors)
