"""The OCR accuracy rule of Flow-GRPO as pure functions (METHOD.md section 5, OCR accuracy row).

Follows ``flow_grpo/ocr.py`` of yifan123/flow_grpo: the target is the text between the prompt's first pair
of double quotes; target and recognition are both lowercased with spaces removed; the distance is 0 when
the target occurs in the recognition, else the Levenshtein distance clipped at the target's length; the
score is 1 - distance / len(target), in [0, 1]. The OCR engine itself lives in the scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

MIN_CONFIDENCE = 0.0


def target_text(prompt: str) -> str:
    """The text inside the first pair of double quotes of ``prompt``, as written (not normalised).

    Raises ValueError naming the prompt when it has no quoted text or the quoted text is empty once
    normalised (the score would divide by zero).
    """
    parts = prompt.split('"')
    # official takes split('"')[1], i.e. the rest of the prompt after a lone quote; we demand a closing quote
    if len(parts) < 3:
        raise ValueError(f'OCR prompt has no text between a pair of double quotes ("..."): {prompt!r}')
    target = parts[1]
    if not normalise_text(target):
        raise ValueError(f"OCR prompt has empty quoted text: {prompt!r}")
    return target


def normalise_text(text: str) -> str:
    """Lowercase and remove space characters (only ' ', as flow_grpo; tabs and newlines are kept)."""
    return text.replace(" ", "").lower()


def ocr_accuracy(
    prompt: str,
    recognised: str | Sequence[str],
    confidences: Sequence[float] | None = None,
) -> float:
    """OCR accuracy in [0, 1] of the recognised text against the prompt's quoted target.

    ``recognised`` is one string or the OCR engine's pieces (lines/boxes), concatenated without separator.
    With ``confidences`` (one per piece), only pieces with confidence > MIN_CONFIDENCE are kept, as flow_grpo
    drops PaddleOCR pieces whose confidence is not positive.
    """
    pieces = [recognised] if isinstance(recognised, str) else list(recognised)
    if confidences is not None:
        if len(confidences) != len(pieces):
            raise ValueError(f"ocr_accuracy: {len(confidences)} confidences for {len(pieces)} recognised pieces")
        pieces = [p for p, c in zip(pieces, confidences) if c > MIN_CONFIDENCE]
    target = normalise_text(target_text(prompt))
    text = normalise_text("".join(pieces))  # normalisation applies to both sides, as flow_grpo
    dist = 0 if target in text else min(Levenshtein.distance(text, target), len(target))
    return 1.0 - dist / len(target)
