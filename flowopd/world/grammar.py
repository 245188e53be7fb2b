"""The mini world's prompt grammar: vocabulary, GenEval-format metadata, and the fixed splits.

Prompts carry GenEval's metadata format (``{"tag", "include", ["exclude"], "prompt"}``, ``exclude`` only
when non-empty, as in ``evaluation_metadata.jsonl``) so that the real rule engine
(:mod:`flowopd.scorers.geneval_rules`) scores them. Text prompts are ``{"tag": "text", "text", "prompt"}``
with the text in the first pair of double quotes (the OCR rule's convention). Held-out compositions
(``split="heldout"``, the T2I-CompBench analogue) carry an extra ``"category"``.

Splits (all deterministic, see docs/mini_world.md):

- ``train`` / ``test``: every prompt without a held-out combination. Tags whose whole prompt space is
  small (single_object 3, two_object 6, counting 7, colors 10, position 20 prompts) are shared by train
  and test - holding any of them out would make it unseen, which is the heldout split's job; the large
  spaces (color_attr 50 prompts, text 1,100 strings) are split into disjoint train and test prompts.
- ``heldout``: prompts containing a held-out colour-shape pair, (relation, subject shape) pair,
  count-shape pair, or all three shapes at once; none of these ever occurs in train or test.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from flowopd.world.font import FONT_CHARS

IMAGE_SIZE = 32
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ALPHABET: str = FONT_CHARS
TASKS = ("geneval", "ocr", "compbench")
SPLITS = ("train", "test", "heldout")
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
COMPBENCH_CATEGORIES: tuple[str, ...] = ("color", "shape", "spatial", "numeracy")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)

#: Exact RGB of each colour name (uint8); the background is white and text ink is black.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 200, 20),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
INK: tuple[int, int, int] = (0, 0, 0)

#: Combinations that never occur in train/test prompts (and never in renders of colour-free prompts).
HELDOUT_COLOR_SHAPE: frozenset[tuple[str, str]] = frozenset({("yellow", "triangle"), ("blue", "circle")})
#: (relation, subject class): "a photo of a triangle above a ..." is held out.
HELDOUT_RELATION_SHAPE: frozenset[tuple[str, str]] = frozenset({("above", "triangle"), ("left of", "circle")})
HELDOUT_COUNT_SHAPE: frozenset[tuple[int, str]] = frozenset({(4, "triangle"), (3, "circle")})

TEXT_TEMPLATE = 'a sign that says "{text}"'
TEXT_LENGTHS: tuple[int, ...] = (2, 3)
OCR_SHARE = 0.25  # share of text prompts in the task=None mixture (the rest: GenEval tags, uniformly)

_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
_SEED = 20260516  # fixes every split and evaluation set
_TEST_PER_TAG = 16
_TEST_TEXTS = 32
_HELDOUT_PER_CATEGORY = 32
_SPLIT_MIN_SPACE = 48  # tags with at least this many prompts get disjoint train/test prompts


# ---------------------------------------------------------------- prompt construction


def _obj(cls: str, count: int = 1, color: str | None = None, position: tuple[str, int] | None = None) -> dict:
    clause: dict[str, Any] = {"class": cls, "count": count}
    if color is not None:
        clause["color"] = color
    if position is not None:
        clause["position"] = [position[0], position[1]]
    return clause


def _noun(count: int, cls: str, color: str | None = None) -> str:
    """'a red circle', 'three squares', 'four red triangles'."""
    words = ["a" if count == 1 else _NUMBERS[count]]
    if color is not None:
        words.append(color)
    words.append(cls if count == 1 else cls + "s")
    return " ".join(words)


def _meta(
    tag: str, include: list[dict], exclude: list[dict], prompt: str, category: str | None = None
) -> dict:
    meta: dict[str, Any] = {} if category is None else {"category": category}
    meta["tag"] = tag
    meta["include"] = include
    if exclude:
        meta["exclude"] = exclude
    meta["prompt"] = prompt
    return meta


def _counting_meta(parts: list[tuple[int, str, str | None]], category: str | None = None) -> dict:
    """Counting prompt: include each (count, class, colour), exclude count + 1 (GenEval's counting rule)."""
    include = [_obj(cls, n, color) for n, cls, color in parts]
    exclude = [_obj(cls, n + 1) for n, cls, _ in parts]
    prompt = "a photo of " + " and ".join(_noun(n, cls, color) for n, cls, color in parts)
    return _meta("counting", include, exclude, prompt, category)


def text_meta(text: str) -> dict:
    """The metadata of a text-rendering prompt for ``text``."""
    bad = set(text) - set(ALPHABET)
    if bad or not text:
        raise ValueError(f"text {text!r} must be non-empty and use only the alphabet {ALPHABET!r}")
    return {"tag": "text", "text": text, "prompt": TEXT_TEMPLATE.format(text=text)}


def _geneval_space() -> dict[str, list[dict]]:
    """Every prompt of each GenEval tag that the grammar can produce (held-out ones included)."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    space: dict[str, list[dict]] = {
        "single_object": [_meta("single_object", [_obj(s)], [], f"a photo of a {s}") for s in SHAPES],
        "two_object": [
            _meta("two_object", [_obj(a), _obj(b)], [], f"a photo of a {a} and a {b}") for a, b in pairs
        ],
        "counting": [_counting_meta([(n, s, None)]) for s in SHAPES for n in (2, 3, 4)],
        "colors": [
            _meta("colors", [_obj(s, 1, c)], [], f"a photo of a {c} {s}") for s in SHAPES for c in COLORS
        ],
        # GenEval's position template: the subject (clause 1) relative to the reference (clause 0).
        "position": [
            _meta("position", [_obj(b), _obj(a, 1, None, (r, 0))], [], f"a photo of a {a} {r} a {b}")
            for a, b in pairs
            for r in RELATIONS
        ],
        "color_attr": [
            _meta("color_attr", [_obj(a, 1, ca), _obj(b, 1, cb)], [], f"a photo of a {ca} {a} and a {cb} {b}")
            for a, b in pairs
            for ca in COLORS
            for cb in COLORS
            if ca != cb
        ],
    }
    return space


def heldout_reasons(meta: Mapping[str, Any]) -> list[str]:
    """Which held-out combinations a prompt contains (empty for train/test prompts)."""
    reasons: list[str] = []
    include = list(meta.get("include", []))
    for clause in include:
        cls = clause["class"]
        if (clause.get("color"), cls) in HELDOUT_COLOR_SHAPE:
            reasons.append(f"colour-shape {clause['color']} {cls}")
        if "position" in clause and (clause["position"][0], cls) in HELDOUT_RELATION_SHAPE:
            reasons.append(f"relation-shape {cls} {clause['position'][0]}")
        if (clause["count"], cls) in HELDOUT_COUNT_SHAPE:
            reasons.append(f"count-shape {clause['count']} {cls}")
    if len({c["class"] for c in include}) >= 3:
        reasons.append("three shapes")
    return reasons


def is_heldout(meta: Mapping[str, Any]) -> bool:
    """True when the prompt contains any held-out combination."""
    return bool(heldout_reasons(meta))


# ---------------------------------------------------------------- held-out (CompBench analogue) space


def _compbench_space() -> dict[str, list[dict]]:
    """Distinct held-out prompts per category; each contains at least one held-out combination."""
    free_colors = {s: [c for c in COLORS if (c, s) not in HELDOUT_COLOR_SHAPE] for s in SHAPES}
    space = _geneval_space()
    color = [
        _meta(m["tag"], m["include"], [], m["prompt"], "color")
        for tag in ("colors", "color_attr")
        for m in space[tag]
        if is_heldout(m)
    ]
    # Shape: all three shapes in one image, a combination train/test never shows.
    shape: list[dict] = []
    for order in itertools.permutations(SHAPES):
        prompt = "a photo of " + " and ".join(_noun(1, s) for s in order)
        shape.append(_meta("two_object", [_obj(s) for s in order], [], prompt, "shape"))
        for colors in itertools.product(*(free_colors[s] for s in order)):
            if len(set(colors)) == 3:
                prompt = "a photo of " + " and ".join(_noun(1, s, c) for s, c in zip(order, colors))
                include = [_obj(s, 1, c) for s, c in zip(order, colors)]
                shape.append(_meta("color_attr", include, [], prompt, "shape"))
    # Spatial: held-out (relation, subject) pairs, plain and with colours on both objects.
    spatial: list[dict] = []
    for rel, a in sorted(HELDOUT_RELATION_SHAPE):
        for b in SHAPES:
            if b == a:
                continue
            spatial.append(
                _meta(
                    "position",
                    [_obj(b), _obj(a, 1, None, (rel, 0))],
                    [],
                    f"a photo of a {a} {rel} a {b}",
                    "spatial",
                )
            )
            for ca, cb in itertools.product(free_colors[a], free_colors[b]):
                if ca != cb:
                    include = [_obj(b, 1, cb), _obj(a, 1, ca, (rel, 0))]
                    prompt = f"a photo of a {ca} {a} {rel} a {cb} {b}"
                    spatial.append(_meta("position", include, [], prompt, "spatial"))
    # Numeracy: held-out count-shape pairs, alone, coloured, and next to one object of another shape.
    numeracy: list[dict] = []
    for n, s in sorted(HELDOUT_COUNT_SHAPE):
        numeracy.append(_counting_meta([(n, s, None)], "numeracy"))
        numeracy.extend(_counting_meta([(n, s, c)], "numeracy") for c in free_colors[s])
        for other in SHAPES:
            if other != s:
                numeracy.append(_counting_meta([(n, s, None), (1, other, None)], "numeracy"))
                numeracy.append(_counting_meta([(1, other, None), (n, s, None)], "numeracy"))
    return {"color": color, "shape": shape, "spatial": spatial, "numeracy": numeracy}


# ---------------------------------------------------------------- the fixed splits


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _cycle(items: list, n: int) -> list:
    """``n`` items cycling through ``items`` (balances small tags by repeating prompts, never dropping any)."""
    return [items[i % len(items)] for i in range(n)]


@lru_cache(maxsize=1)
def _splits() -> dict[str, Any]:
    rng = np.random.default_rng(_SEED)
    space = _geneval_space()
    train: dict[str, list[dict]] = {}
    test: dict[str, list[dict]] = {}
    heldout_geneval: list[dict] = []
    for tag in GENEVAL_TAGS:
        seen = [m for m in space[tag] if not is_heldout(m)]
        heldout_geneval.extend(m for m in space[tag] if is_heldout(m))
        seen = _shuffled(seen, rng)
        if len(seen) >= _SPLIT_MIN_SPACE:
            test[tag], train[tag] = seen[:_TEST_PER_TAG], seen[_TEST_PER_TAG:]
        else:
            test[tag], train[tag] = _cycle(seen, _TEST_PER_TAG), seen
    texts = ["".join(t) for n in TEXT_LENGTHS for t in itertools.product(ALPHABET, repeat=n)]
    per_len = _TEST_TEXTS // len(TEXT_LENGTHS)
    test_texts: list[str] = []
    for n in TEXT_LENGTHS:
        of_len = [t for t in texts if len(t) == n]
        test_texts.extend(of_len[i] for i in sorted(rng.choice(len(of_len), per_len, replace=False)))
    test_set = set(test_texts)
    train_texts = [t for t in texts if t not in test_set]
    # Colour-free prompts first (a stable sort after the shuffle), so every fixed set contains all of them.
    compbench = {
        cat: sorted(_shuffled(prompts, rng), key=lambda m: any("color" in c for c in m["include"]))
        for cat, prompts in _compbench_space().items()
    }
    return {
        "train": train,
        "test": test,
        "heldout_geneval": heldout_geneval,
        "train_texts": train_texts,
        "test_texts": test_texts,
        "compbench": compbench,
    }


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def prompt_set(task: str, split: str) -> list[dict]:
    """The fixed evaluation set of ``task`` on ``split`` (fresh copies; safe to mutate).

    geneval: train = every train prompt once; test = 16 per tag (96, small tags cycled); heldout = the
    GenEval-template prompts with a held-out combination. ocr: train = 1,068 strings, test = 32 (16 of
    length 2, 16 of length 3). compbench: heldout only, 32 per category (128, small categories cycled).
    """
    _check_task(task)
    _check_split(split)
    s = _splits()
    if task == "geneval":
        if split == "heldout":
            out = s["heldout_geneval"]
        else:
            out = [m for tag in GENEVAL_TAGS for m in s[split][tag]]
    elif task == "ocr":
        if split == "heldout":
            raise ValueError(
                "the ocr task has no heldout split (its alphabet is closed); use 'train' or 'test'"
            )
        out = [text_meta(t) for t in s[f"{split}_texts"]]
    else:
        if split != "heldout":
            raise ValueError(f"the compbench task exists only on split 'heldout', not {split!r}")
        out = [m for cat in COMPBENCH_CATEGORIES for m in _cycle(s["compbench"][cat], _HELDOUT_PER_CATEGORY)]
    return copy.deepcopy(out)


def sample_prompt(rng: np.random.Generator, split: str = "train", task: str | None = None) -> dict:
    """Draw one prompt's metadata from ``split``.

    ``task=None`` is the mixture: on train/test, text with probability 0.25, otherwise a GenEval tag chosen
    uniformly then a prompt of that tag uniformly; on heldout, compbench. ``geneval`` on heldout draws from
    the GenEval-template held-out prompts; ``compbench`` (heldout only) draws a category then a prompt.
    """
    _check_split(split)
    if task is None:
        task = "compbench" if split == "heldout" else ("ocr" if rng.random() < OCR_SHARE else "geneval")
    _check_task(task)
    s = _splits()
    if task == "geneval":
        if split == "heldout":
            pool = s["heldout_geneval"]
        else:
            tag = GENEVAL_TAGS[int(rng.integers(len(GENEVAL_TAGS)))]
            pool = (
                s["train"][tag]
                if split == "train"
                else list({m["prompt"]: m for m in s["test"][tag]}.values())
            )
        return copy.deepcopy(pool[int(rng.integers(len(pool)))])
    if task == "ocr":
        if split == "heldout":
            raise ValueError("the ocr task has no heldout split; use 'train' or 'test'")
        texts = s[f"{split}_texts"]
        if split == "test":
            return text_meta(texts[int(rng.integers(len(texts)))])
        # Uniform over lengths first, then over strings of that length (not over all 1,068 strings).
        n = TEXT_LENGTHS[int(rng.integers(len(TEXT_LENGTHS)))]
        of_len = [t for t in texts if len(t) == n]
        return text_meta(of_len[int(rng.integers(len(of_len)))])
    if split != "heldout":
        raise ValueError(f"the compbench task exists only on split 'heldout', not {split!r}")
    cat = COMPBENCH_CATEGORIES[int(rng.integers(len(COMPBENCH_CATEGORIES)))]
    pool = s["compbench"][cat]
    return copy.deepcopy(pool[int(rng.integers(len(pool)))])


# ---------------------------------------------------------------- tokenisation support

_QUOTED = re.compile(r'"([^"]*)"')


def tokenize(prompt: str) -> list[str]:
    """Split a prompt into vocabulary items: words, and the quoted text as '"', its characters, '"'."""
    tokens: list[str] = []
    pos = 0
    for m in _QUOTED.finditer(prompt):
        tokens.extend(prompt[pos : m.start()].split())
        tokens.extend(['"', *m.group(1), '"'])
        pos = m.end()
    tokens.extend(prompt[pos:].split())
    return tokens


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    s = _splits()
    metas = [m for tag in GENEVAL_TAGS for m in s["train"][tag] + s["test"][tag]]
    metas += s["heldout_geneval"] + [m for cat in COMPBENCH_CATEGORIES for m in s["compbench"][cat]]
    words = {w for m in metas for w in tokenize(m["prompt"])}
    words |= set(tokenize(TEXT_TEMPLATE.format(text=ALPHABET)))
    return tuple(sorted(words))


def vocabulary() -> list[str]:
    """Every token :func:`tokenize` can return for any prompt of any split (sorted, unique)."""
    return list(_vocabulary())
