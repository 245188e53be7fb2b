"""Benchmark specs: declarative TOML files in ``benchmarks/`` (one per benchmark), versioned.

A spec names a prompt set (pinned origin + sha256, or a Python loader for generated sets), a scorer
with its options, the generation settings of the official protocol, the aggregation rule and the
scorer's native scale. METHOD.md s.5 is the source of every default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flowopd.registry import UnknownNameError

AGGREGATIONS = ("mean", "mean_of_tag_means", "per_category")


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


@dataclass(frozen=True)
class GenerationSpec:
    images_per_prompt: int = 1
    seed: int = 0
    height: int = 512
    width: int = 512
    steps: int = 40
    guidance_scale: float = 4.5


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    version: str
    description: str
    scorer: str
    prompts: PromptSetSpec
    generation: GenerationSpec = GenerationSpec()
    scorer_options: dict[str, Any] = field(default_factory=dict)
    aggregation: str = "mean"
    group_by: str = ""  # the detail column of per-tag / per-category aggregation
    scale: tuple[float, float] = (0.0, 1.0)
    higher_is_better: bool = True
    extra: str = ""  # the pip extra the scorer needs
    weights: tuple[str, ...] = ()  # official model ids the scorer loads
    scale_name: str = "mini"  # "mini" or "sd35m": which world the benchmark belongs to
    images_from: str = ""  # reuse another benchmark's images (same prompts and generation settings)
    source: str = ""  # the file the spec was read from

    @property
    def headline(self) -> str:
        return f"{self.name}/mean"


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__name__}")
    return cls(**data)


def parse_spec(data: dict[str, Any], source: str = "<memory>") -> BenchmarkSpec:
    data = dict(data)
    try:
        data["prompts"] = _build(PromptSetSpec, data["prompts"], f"{source} [prompts]")
        data["generation"] = _build(GenerationSpec, data.get("generation", {}), f"{source} [generation]")
        if "scale" in data:
            data["scale"] = tuple(float(x) for x in data["scale"])
        if "weights" in data:
            data["weights"] = tuple(data["weights"])
        spec = _build(BenchmarkSpec, {**data, "source": source}, source)
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
    except TypeError as e:
        raise ValueError(f"{source}: {e}") from None
    if spec.aggregation not in AGGREGATIONS:
        raise ValueError(f"{source}: aggregation {spec.aggregation!r} not in {AGGREGATIONS}")
    return spec


def load_spec_file(path: str | Path) -> BenchmarkSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    return parse_spec(data, str(path))


def spec_dirs() -> list[Path]:
    """Where specs are looked up: $FLOWOPD_BENCHMARKS_DIR, then the installed copy, then the repo's."""
    dirs = []
    if os.environ.get("FLOWOPD_BENCHMARKS_DIR"):
        dirs.append(Path(os.environ["FLOWOPD_BENCHMARKS_DIR"]))
    pkg = Path(__file__).resolve().parents[1]
    dirs += [pkg / "_data" / "benchmarks", pkg.parent / "benchmarks"]
    return [d for d in dirs if d.is_dir()]


def all_specs() -> dict[str, BenchmarkSpec]:
    specs: dict[str, BenchmarkSpec] = {}
    for d in spec_dirs():
        for path in sorted(d.glob("*.toml")):
            if path.name == "thresholds.toml":
                continue
            spec = load_spec_file(path)
            specs.setdefault(spec.name, spec)
    return specs


def get_spec(name: str) -> BenchmarkSpec:
    specs = all_specs()
    if name not in specs:
        import difflib

        close = difflib.get_close_matches(name, specs, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown benchmark {name!r}{hint} (run `python -m flowopd.bench list`)")
    return specs[name]
