"""2-D and 3-D spatial relations: the position rules of ``UniDet_eval/2D_spatial_eval.py`` and
``UniDet_eval/3D_spatial_eval.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from flowopd.scorers.compbench_rules.detection import Box, Detection, to_detector_name

SPATIAL_2D_WORDS = (  # 2D_spatial_eval.py vocab_spatial, first match in this order ("on top of" scores 0)
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
SPATIAL_3D_WORDS = ("in front of", "behind", "hidden")  # 3D_spatial_eval.py vocab_spatial_3d


def spatial_iou(box1: Box, box2: Box) -> float:
    """IoU as ``determine_position`` computes it (continuous coordinates; 0 for an empty union)."""
    x_overlap = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    y_overlap = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    intersection = x_overlap * y_overlap
    union = (
        (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - intersection
    )
    return intersection / union if union > 0 else 0.0


def _mean_depth(depth: np.ndarray, box: Box) -> float:
    # official quirk: rows are indexed by x and columns by y (depth_map[x_min:x_max, y_min:y_max])
    part = depth[int(box[0]) : int(box[2]), int(box[1]) : int(box[3])]
    return float(part.mean()) if part.size else math.nan


def determine_position(
    locality: str | None,
    box1: Box,
    box2: Box,
    depth: np.ndarray | None = None,
    iou_threshold: float = 0.1,
    distance_threshold: float = 150.0,
    iou_threshold_3d: float = 0.5,
) -> float:
    """The official soft position score of object 1 relative to object 2, in [0, 1].

    2-D (pixels of the 479-px rule frame): "next to" / "near" / "on side of" is 1 when the centres are closer
    than 150 px on either axis, else 150 / max distance; left / right / top / bottom need the centre offset
    on the right side and dominant on that axis, then 1 if IoU < 0.1 else 0.1 / IoU. 3-D (``depth`` =
    inverse depth in [0, 1], larger = nearer): "in front of" needs mean depth 1 > mean depth 2, "behind" /
    "hidden" the opposite; 1 when IoU > 0.5, IoU / 0.5 when 0 < IoU < 0.5, else 0. Any other locality (even
    "on top of") is 0.
    """
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    iou = spatial_iou(box1, box2)
    if locality in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    axis_ok = {
        "on the right of": dx < 0 and abs(dx) > abs(dy),
        "on the left of": dx > 0 and abs(dx) > abs(dy),
        "on the bottom of": dy < 0 and abs(dy) > abs(dx),
        "on the top of": dy > 0 and abs(dy) > abs(dx),
    }
    if locality in axis_ok:
        if not axis_ok[locality]:
            return 0.0
        return 1.0 if iou < iou_threshold else iou_threshold / iou
    if locality in ("in front of", "behind", "hidden"):
        if depth is None:
            raise ValueError(f"determine_position: locality {locality!r} needs a depth map")
        diff = _mean_depth(depth, box1) - _mean_depth(depth, box2)
        ordered = diff > 0 if locality == "in front of" else diff < 0  # NaN (empty slice) compares False
        if iou > iou_threshold_3d:
            return 1.0 if ordered else 0.0
        if 0 < iou < iou_threshold_3d:
            return iou / iou_threshold_3d if ordered else 0.0
        return 0.0
    return 0.0


def spatial_score_2d(
    obj1: str | None, obj2: str | None, locality: str | None, detections: Sequence[Detection]
) -> float:
    """``2D_spatial_eval.py``: exact label match on the score-sorted detections, then the 0.5 cut-off."""
    obj1, obj2 = to_detector_name(obj1), to_detector_name(obj2)
    labels = [d.label for d in detections]
    if obj1 in labels and obj2 in labels:
        d1, d2 = detections[labels.index(obj1)], detections[labels.index(obj2)]
        score = 0.25 * d1.score + 0.25 * d2.score + determine_position(locality, d1.box, d2.box) / 2
    elif obj1 in labels:
        score = 0.25 * detections[labels.index(obj1)].score
    elif obj2 in labels:
        score = 0.25 * detections[labels.index(obj2)].score
    else:
        score = 0.0
    return 0.0 if score < 0.5 else score


def spatial_score_3d(
    obj1: str | None,
    obj2: str | None,
    locality: str | None,
    detections: Sequence[Detection],
    depth: np.ndarray,
) -> float:
    """``3D_spatial_eval.py``: substring label match (its position loop included), depth rule, no cut-off."""
    obj1, obj2 = to_detector_name(obj1), to_detector_name(obj2)
    labels = [d.label for d in detections]
    if obj1 is None or obj2 is None:
        return 0.0
    pos1 = pos2 = None
    for i, label in enumerate(labels):
        # official loop: both indices are overwritten until both are set, so pos1 may not be the first match
        if obj1 in label:
            pos1 = i
        if obj2 in label:
            pos2 = i
        if pos1 is not None and pos2 is not None:
            break
    if pos1 is not None and pos2 is not None:
        d1, d2 = detections[pos1], detections[pos2]
        return (
            0.25 * d1.score + 0.25 * d2.score + determine_position(locality, d1.box, d2.box, depth=depth) / 2
        )
    first1 = next((i for i, label in enumerate(labels) if obj1 in label), None)
    if first1 is not None:
        return 0.25 * detections[first1].score
    first2 = next((i for i, label in enumerate(labels) if obj2 in label), None)
    return 0.25 * detections[first2].score if first2 is not None else 0.0
