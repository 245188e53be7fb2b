"""Spec types that the data layer and the scorers need, below both (bench's specs build on them).

A ``PromptSetSpec`` names where a prompt set comes from; ``flowopd.data`` loads it and a scorer may pin a file
of its own with one (T2I-CompBench's lists of complex prompts). Benchmark specs (``flowopd.bench.spec``) hold
one under ``[prompts]`` and check it when a spec file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptSetSpec:
    """Where prompts come from. ``path`` is relative to the data directory (MANIFEST.tsv's path)."""

    format: str  # "jsonl" (GenEval metadata), "lines" (one prompt a line) or "python" (a generator)
    path: str = ""
    url: str = ""
    sha256: str = ""
    prompt_field: str = "prompt"
    loader: str = ""  # "module:function" for format = "python"
    args: dict[str, Any] = field(default_factory=dict)
    category: str = ""  # a constant category for every prompt (T2I-CompBench files are one category each)
