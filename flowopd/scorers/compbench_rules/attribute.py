"""Attribute binding (color, shape, texture): the BLIP-VQA rules of ``BLIPvqa_eval/BLIP_vqa.py``."""

from __future__ import annotations

import re
from collections.abc import Sequence

BLIP_SKIPPED_CHUNKS = ("top", "the side", "the left", "the right")  # BLIP_vqa.py drops these noun chunks
BLIP_MAX_QUESTIONS = 8  # BLIP_vqa.py --np_num default


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's ``pre_question``: lower-case, drop ``.!"()*#:;~``, strip trailing spaces, keep 50 words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def blip_questions(noun_phrases: Sequence[str], max_questions: int = BLIP_MAX_QUESTIONS) -> list[str]:
    """The BLIP-VQA questions of a prompt: ``pre_question(phrase + "?")`` for its first ``max_questions``.

    ``noun_phrases`` are spaCy noun chunks (or :func:`fallback_noun_phrases`); the skipped chunks are removed
    here as in ``BLIP_vqa.py``.
    """
    kept = [p for p in noun_phrases if p not in BLIP_SKIPPED_CHUNKS]
    return [pre_question(f"{p}?") for p in kept[:max_questions]]


def blip_score(yes_probabilities: Sequence[float]) -> float:
    """Product of the per-question P(yes), each rounded to 4 decimals as the official JSON has it; 1 if none.

    The product is rounded to 4 decimals too (``'{:.4f}'`` in ``BLIP_vqa.py``).
    """
    product = 1.0
    for p in yes_probabilities:
        product *= float(f"{p:.4f}")
    return float(f"{product:.4f}")
