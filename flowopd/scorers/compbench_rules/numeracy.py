"""Numeracy: the counting rules of ``UniDet_eval/numeracy_eval.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from flowopd.scorers.compbench_rules.detection import (
    OBJECTS_PLURAL,
    OBJECTS_SINGULAR,
    PERSON_WORDS,
    Box,
    Detection,
)
from flowopd.scorers.compbench_rules.text import Token

NUMBER_WORDS = ("a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight")
_WORD_TO_NUM = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
_NUMERACY_ALIASES = {"ship": "boat", "telivision": "tv", "goldfish": "fish", "painting": "picture"}


def numeracy_targets(tokens: Sequence[Token]) -> tuple[list[str], list[int]]:
    """``numeracy_eval.py``'s parse: (objects, counts) from number words followed by a known object.

    Two-word objects are tried first; plural objects map to their singular. As in the official code a count
    that ``word_to_num`` cannot read ("a"/"an" before a plural) is skipped, so the lists can differ in length.
    """
    words = [t.text for t in tokens]
    objects: list[str] = []
    counts: list[int] = []
    n = len(words)
    for i, word in enumerate(words):
        if word not in NUMBER_WORDS or i + 1 >= n:
            continue
        two = f"{words[i + 1]} {words[i + 2]}" if i < n - 2 else None
        if two is not None and (two in OBJECTS_SINGULAR or two in OBJECTS_PLURAL):
            if two in OBJECTS_PLURAL and word not in ("a", "an", "one"):
                objects.append(OBJECTS_SINGULAR[OBJECTS_PLURAL.index(two)])
                if word in _WORD_TO_NUM:
                    counts.append(_WORD_TO_NUM[word])
            else:
                counts.append(1)
                objects.append(two)
        elif words[i + 1] in OBJECTS_SINGULAR or words[i + 1] in OBJECTS_PLURAL:
            nxt = words[i + 1]
            if nxt in OBJECTS_SINGULAR and word in ("a", "an", "one"):
                counts.append(1)
                objects.append(nxt)
            elif nxt in OBJECTS_PLURAL:
                objects.append(OBJECTS_SINGULAR[OBJECTS_PLURAL.index(nxt)])
                if word in _WORD_TO_NUM:
                    counts.append(_WORD_TO_NUM[word])
            # official: a singular after a number > 1 ("two dog") raises in object_p.index; skipped here
    return objects, counts


def numeracy_detector_name(word: str) -> str:
    """numeracy_eval.py's renames before label matching: girl -> person, ship -> boat, painting -> picture."""
    return "person" if word in PERSON_WORDS else _NUMERACY_ALIASES.get(word, word)


def same_instance(box1: Box, box2: Box) -> bool:
    """``numeracy_eval.calculate_iou``: IoU > 0.9 or either box > 90 % covered (integer-pixel areas, +1)."""
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2, iy2 = min(box1[2], box2[2]), min(box1[3], box2[3])
    inter = max(0.0, ix2 - ix1 + 1) * max(0.0, iy2 - iy1 + 1)
    area1 = (box1[2] - box1[0] + 1) * (box1[3] - box1[1] + 1)
    area2 = (box2[2] - box2[0] + 1) * (box2[3] - box2[1] + 1)
    iou = inter / float(area1 + area2 - inter)
    return iou > 0.9 or inter / float(area1) > 0.9 or inter / float(area2) > 0.9


def numeracy_score(objects: Sequence[str], counts: Sequence[int], detections: Sequence[Detection]) -> float:
    """``numeracy_eval.py``: per object 0.5 if detected + 0.5 if the de-duplicated count is exact, averaged.

    Detections of the same label that :func:`same_instance` pairs are merged first; an object missing from the
    labels takes over every label that contains it as a substring ("mouse" renames "mouse2, mouse").
    Returns NaN when the prompt names no countable object (the official script divides by zero there).
    """
    if not objects:
        return math.nan
    kept: list[Detection] = []
    for det in detections:
        if not any(det.label == k.label and same_instance(det.box, k.box) for k in kept):
            kept.append(det)
    labels = [d.label for d in kept]
    weight = 1.0 / len(objects)
    score = 0.0
    for i, obj in enumerate(objects):
        obj = numeracy_detector_name(obj)
        if obj not in labels:
            labels = [obj if obj in label else label for label in labels]
        if obj in labels:
            score += 0.5 * weight
            if i < len(counts) and labels.count(obj) == counts[i]:
                score += 0.5 * weight
    return score
