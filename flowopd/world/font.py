"""The mini world's 3x5 bitmap font: the renderer draws it, the glyph reader matches against it.

Every glyph spans its full 3x5 box (ink in each of the 3 columns and each of the 5 rows), so a glyph's
bounding box gives its scale, and no glyph has an empty inner column that could split it in two.
The ten characters were chosen among 22 candidates to maximise the smallest pairwise Hamming distance
between templates: every pair differs in at least 4 of the 15 cells.
"""

from __future__ import annotations

import numpy as np

GLYPH_WIDTH = 3
GLYPH_HEIGHT = 5

_ROWS: dict[str, tuple[str, ...]] = {
    "B": ("##.", "#.#", "##.", "#.#", "###"),
    "C": ("###", "#..", "#..", "#..", "###"),
    "P": ("###", "#.#", "###", "#..", "#.."),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"),
    "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."),
    "Z": ("###", "..#", ".#.", "#..", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "7": ("###", "..#", "..#", "..#", "..#"),
}

#: The characters the font can draw, in a fixed order (also the OCR task's alphabet).
FONT_CHARS: str = "".join(_ROWS)

#: char -> (5, 3) bool array, True where the glyph has ink.
GLYPHS: dict[str, np.ndarray] = {
    ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for ch, rows in _ROWS.items()
}


def glyph(ch: str) -> np.ndarray:
    """The (5, 3) bool template of ``ch``; KeyError names the font's characters."""
    try:
        return GLYPHS[ch]
    except KeyError:
        raise KeyError(
            f"character {ch!r} is not in the mini world's font (flowopd/world/font.py): {FONT_CHARS!r}"
        ) from None


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """Bool ink mask of ``text`` drawn at integer ``scale``: glyphs 3s x 5s, one font pixel (s px) apart."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if not text:
        return np.zeros((GLYPH_HEIGHT * scale, 0), dtype=bool)
    parts: list[np.ndarray] = []
    for i, ch in enumerate(text):
        if i:
            parts.append(np.zeros((GLYPH_HEIGHT, 1), dtype=bool))
        parts.append(glyph(ch))
    line = np.concatenate(parts, axis=1)
    return np.kron(line, np.ones((scale, scale), dtype=bool)).astype(bool)


def text_width(n_chars: int, scale: int) -> int:
    """Width in pixels of ``n_chars`` glyphs at ``scale`` (glyph 3s, gap s)."""
    return max(0, n_chars * (GLYPH_WIDTH + 1) - 1) * scale
