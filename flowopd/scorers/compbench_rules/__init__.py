"""T2I-CompBench rules as pure functions: prompt parsing, the UniDet spatial / numeracy / 3-D rules, 3-in-1.

Every rule restates the official code of Karine-Huang/T2I-CompBench at commit 1b70949 (MIT licence), quirks
included, because the benchmark's numbers are defined by that code (METHOD.md s.5):

- ``BLIPvqa_eval/BLIP_vqa.py``: one question ``"<noun chunk>?"`` per spaCy noun chunk (at most 8, a few
  chunks dropped), each answered with P(yes) / (P(yes) + P(no)), rounded to 4 decimals, multiplied;
- ``UniDet_eval/2D_spatial_eval.py``: first / last NOUN (or the objects around a preposition for the complex
  category), exact label match, ``0.25 * s1 + 0.25 * s2 + position / 2`` and scores below 0.5 set to 0;
- ``UniDet_eval/3D_spatial_eval.py``: substring label match, depth means over *transposed* box slices;
- ``UniDet_eval/numeracy_eval.py``: number word + object from ``new_objects.txt``, duplicates merged by an
  IoU / containment test, 0.5 for presence + 0.5 for the exact count, averaged over objects;
- ``3_in_1_eval/3_in_1.py``: (attribute + spatial) / 2, (attribute + CLIP) / 2 or the mean of all three.

One module per category family - ``attribute`` (BLIP-VQA), ``spatial`` (2-D and 3-D), ``numeracy``,
``complex`` (3-in-1) - over two shared ones: ``text`` (tokens, noun phrases, :class:`PromptParser`: spaCy
``en_core_web_sm`` or the documented fallback) and ``detection`` (the object vocabulary, the UniDet label
space, :class:`Detection`). This package holds their public names, so ``compbench_rules.<name>`` reads as one
rule book.
"""

from __future__ import annotations

from flowopd.scorers.compbench_rules.attribute import (
    BLIP_MAX_QUESTIONS,
    BLIP_SKIPPED_CHUNKS,
    blip_questions,
    blip_score,
    pre_question,
)
from flowopd.scorers.compbench_rules.complex import (
    COMPLEX_PREPOSITIONS,
    complex_kind,
    complex_spatial_objects,
    three_in_one,
    without_adjectives,
)
from flowopd.scorers.compbench_rules.detection import (
    OBJECTS_PLURAL,
    OBJECTS_SINGULAR,
    PERSON_WORDS,
    UNIDET_LABELS,
    Box,
    Detection,
    label_query_texts,
    nms_per_label,
    rule_frame_size,
    to_detector_name,
    unidet_labels_for,
)
from flowopd.scorers.compbench_rules.numeracy import (
    NUMBER_WORDS,
    numeracy_detector_name,
    numeracy_score,
    numeracy_targets,
    same_instance,
)
from flowopd.scorers.compbench_rules.spatial import (
    SPATIAL_2D_WORDS,
    SPATIAL_3D_WORDS,
    determine_position,
    spatial_iou,
    spatial_score_2d,
    spatial_score_3d,
)
from flowopd.scorers.compbench_rules.text import (
    PromptParser,
    Token,
    fallback_noun_phrases,
    fallback_spatial_objects,
    fallback_tokens,
    first_locality,
    simple_spatial_objects,
    span_text,
)

__all__ = [
    "BLIP_MAX_QUESTIONS",
    "BLIP_SKIPPED_CHUNKS",
    "Box",
    "COMPLEX_PREPOSITIONS",
    "Detection",
    "NUMBER_WORDS",
    "OBJECTS_PLURAL",
    "OBJECTS_SINGULAR",
    "PERSON_WORDS",
    "PromptParser",
    "SPATIAL_2D_WORDS",
    "SPATIAL_3D_WORDS",
    "Token",
    "UNIDET_LABELS",
    "blip_questions",
    "blip_score",
    "complex_kind",
    "complex_spatial_objects",
    "determine_position",
    "fallback_noun_phrases",
    "fallback_spatial_objects",
    "fallback_tokens",
    "first_locality",
    "label_query_texts",
    "nms_per_label",
    "numeracy_detector_name",
    "numeracy_score",
    "numeracy_targets",
    "pre_question",
    "rule_frame_size",
    "same_instance",
    "simple_spatial_objects",
    "span_text",
    "spatial_iou",
    "spatial_score_2d",
    "spatial_score_3d",
    "three_in_one",
    "to_detector_name",
    "unidet_labels_for",
    "without_adjectives",
]
