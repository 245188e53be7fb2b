"""The complex category: the objects of its spatial relation, its CLIP text, and the 3-in-1 score of
``3_in_1_eval/3_in_1.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from flowopd.scorers.compbench_rules.text import Token, span_text

COMPLEX_PREPOSITIONS = (
    "on top of",
    "on bottom of",
    "on the left",
    "on the right",
    "next to",
    "on side of",
    "near",
)


def complex_spatial_objects(tokens: Sequence[Token]) -> tuple[str | None, str | None]:
    """The two objects of a complex prompt's spatial relation (``2D_spatial_eval.py --complex``).

    For each preposition of :data:`COMPLEX_PREPOSITIONS` (matched on 3-, 2- or 1-token spans), the nearest
    NOUN or PROPN before it and the first NOUN after it (or, failing that, a PROPN not followed by a PROPN).
    The pair counts only when exactly two objects were found.
    """
    objects: list[str] = []
    n = len(tokens)
    for i in range(n):
        spans = [span_text(tokens[i : i + k]) for k in (3, 2, 1)]
        if not any(s in COMPLEX_PREPOSITIONS for s in spans):
            continue
        k = next(k for k, s in zip((3, 2, 1), spans) if s in COMPLEX_PREPOSITIONS)
        for j in range(i - 1, -1, -1):
            if tokens[j].pos in ("NOUN", "PROPN"):
                objects.append(tokens[j].text)
                break
        reached_end = False
        for j in range(i + k, n):
            if tokens[j].pos == "NOUN":
                objects.append(tokens[j].text)
                break
            if j == n - 1:
                reached_end = True
        if reached_end:
            for j in range(i + k, n):
                if j + 1 < n and tokens[j].pos == "PROPN" and tokens[j + 1].pos != "PROPN":
                    objects.append(tokens[j].text)
                    break
    return (objects[0], objects[1]) if len(objects) == 2 else (None, None)


def without_adjectives(tokens: Sequence[Token]) -> str:
    """The complex category's CLIP text: the tokens that are not ADJ, joined by single spaces."""
    return " ".join(t.text for t in tokens if t.pos != "ADJ")


def complex_kind(prompt: str, spatial_prompts: Sequence[str], action_prompts: Sequence[str]) -> str:
    """ "spatial", "action" or "spatial_action", as ``3_in_1.py`` decides on ``s.split('.')[0].lower()``."""

    def key(s: str) -> str:
        return s.strip("\n").split(".")[0].lower()

    k = key(prompt)
    if k in {key(p) for p in spatial_prompts}:
        return "spatial"
    if k in {key(p) for p in action_prompts}:
        return "action"
    return "spatial_action"


def three_in_one(kind: str, attribute: float, spatial: float | None, clip: float | None) -> float:
    """``3_in_1.py``: (attribute + spatial) / 2, (attribute + CLIP) / 2, or the mean of the three."""
    if kind == "spatial":
        return (spatial + attribute) * 0.5
    if kind == "action":
        return (clip + attribute) * 0.5
    if kind == "spatial_action":
        return (attribute + spatial + clip) / 3
    raise ValueError(f"complex kind must be 'spatial', 'action' or 'spatial_action', got {kind!r}")
