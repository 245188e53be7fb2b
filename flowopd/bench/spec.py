"""Benchmark specs: declarative TOML files in ``benchmarks/`` (one per benchmark), versioned.

A spec names a prompt set (pinned origin + sha256, or a Python loader for generated sets), a scorer
with its options, the generation settings of the official protocol, the aggregation rule and the
scorer's native scale. METHOD.md s.5 is the source of every default.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flowopd.registry import PROMPT_LOADERS, UnknownNameError
from flowopd.specs import PromptSetSpec

AGGREGATIONS = ("mean", "mean_of_tag_means", "per_category")


@dataclass(frozen=True)
class GenerationSpec:
    images_per_prompt: int = 1
    seed: int = 0
    height: int = 512
    width: int = 512
    steps: int = 40
    guidance_scale: float = 4.5
    #: T5 prompt length of SD3 policies (Flow-GRPO / Flow-OPD encode at 128, diffusers' default is 256);
    #: None keeps the policy's own (the mini world's tokenizer has a fixed length and takes none).
    max_sequence_length: int | None = None

    def record(self) -> dict[str, Any]:
        """The settings as recorded in results and image-cache keys: unset optional ones are left out, so a
        record made before such a setting existed still compares equal."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


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


SCALE_NAMES = ("mini", "sd35m")
PROMPT_FORMATS = ("jsonl", "lines", "python")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a benchmark name is a file name in every run directory
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: lower bounds of numeric fields; any other int field must be >= 1 and any float field >= 0 (generation settings
#: added later are checked without being listed here)
_LOWER = {"seed": 0}


class SpecError(ValueError):
    """A benchmark spec that cannot be used; the message names the file, the field and what is expected."""


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is tuple:
        return f"a list of {_type_name(get_args(hint)[0]).split(' ', 1)[1]}s"
    return names.get(hint, str(hint))


def _check_value(where: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field's type (TOML list -> tuple, int -> float), or SpecError naming it."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        if value is None and type(None) in get_args(hint):
            return None  # unset (TOML has no null: only a caller's override or the default gives None)
        options = [a for a in get_args(hint) if a is not type(None)]
        return _check_value(where, key, value, options[0])
    bad = SpecError(f"{where}: {key} must be {_type_name(hint)}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad
        low = _LOWER.get(key, 1)
        if value < low:
            raise SpecError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad
        if not math.isfinite(value) or value < _LOWER.get(key, 0):
            raise SpecError(f"{where}: {key} must be a finite number >= {_LOWER.get(key, 0)}, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, list):
            raise bad
        item = args[0]
        if len(args) == 2 and args[1] is not Ellipsis or len(args) > 2:
            if len(value) != len(args):
                raise SpecError(f"{where}: {key} must be a list of {len(args)} values, got {value!r}")
        for v in value:
            ok = isinstance(v, str) if item is str else isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok or (item is float and not math.isfinite(v)):
                raise bad
        return tuple(float(v) if item is float else v for v in value)
    raise TypeError(f"no check for the type {hint!r} of {key}")  # a field type added without a check


def _build(cls: type, data: Any, where: str, skip: Sequence[str] = ()) -> Any:
    """An instance of the spec dataclass ``cls`` from a TOML table, every field type- and range-checked."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a table, got {data!r}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.name not in skip]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise SpecError(f"{where}: unknown key {key!r}{hint}")
    missing = [f.name for f in fields(cls) if f.name in known and f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SpecError(f"{where}: missing key {missing[0]!r}")
    nested = (PromptSetSpec, GenerationSpec)  # checked by their own _build
    return {key: value if hints[key] in nested else _check_value(where, key, value, hints[key])
            for key, value in data.items()}


def _check_prompts(p: PromptSetSpec, where: str) -> None:
    if p.format not in PROMPT_FORMATS:
        raise SpecError(f"{where}: format must be one of {', '.join(PROMPT_FORMATS)}, got {p.format!r}")
    if p.format == "python":
        if not p.loader:
            raise SpecError(f"{where}: format = \"python\" needs loader = a registered prompt loader "
                            f"({', '.join(PROMPT_LOADERS.names())})")
        try:
            PROMPT_LOADERS.name_of(p.loader)
        except UnknownNameError as e:
            raise SpecError(f"{where}: loader: {e}; a spec names registered loaders only (plugins register "
                            f"through the entry point group 'flowopd.prompt_loaders')") from None
        extra = [k for k in ("path", "url", "sha256") if getattr(p, k)]
        if extra:
            raise SpecError(f"{where}: {extra[0]} is for prompt files; format = \"python\" takes loader and args")
        return
    if p.loader or p.args:
        raise SpecError(f"{where}: loader and args are for format = \"python\", not {p.format!r}")
    parts = Path(p.path).parts
    if not p.path or Path(p.path).is_absolute() or ".." in parts:
        raise SpecError(f"{where}: path must be a relative path inside the data directory (MANIFEST.tsv's path "
                        f"column), got {p.path!r}")
    if p.url and not p.url.startswith(("https://", "http://")):
        raise SpecError(f"{where}: url must be an http(s) URL, got {p.url!r}")
    if p.sha256 and not _SHA256.match(p.sha256):
        raise SpecError(f"{where}: sha256 must be 64 lowercase hex digits, got {p.sha256!r}")


def parse_spec(data: dict[str, Any], source: str = "<memory>") -> BenchmarkSpec:
    """A checked BenchmarkSpec: every field's type and range, unknown keys (with a close match), the prompt
    loader and the scorer looked up in their registries (nothing is imported). Errors are :class:`SpecError`."""
    from flowopd.scorers import SCORERS

    top = _build(BenchmarkSpec, data, source, skip=("source",))
    top["prompts"] = PromptSetSpec(**_build(PromptSetSpec, data["prompts"], f"{source} [prompts]"))
    top["generation"] = generation_spec(data.get("generation", {}), f"{source} [generation]")
    _check_prompts(top["prompts"], f"{source} [prompts]")
    spec = BenchmarkSpec(**top, source=source)
    if not _NAME.match(spec.name):
        raise SpecError(f"{source}: name must be letters, digits, '.', '_' or '-' (it names files), got {spec.name!r}")
    try:
        SCORERS.name_of(spec.scorer)
    except UnknownNameError as e:
        raise SpecError(f"{source}: scorer: {e}; a spec names registered scorers only (plugins register through "
                        f"the entry point group 'flowopd.scorers')") from None
    if spec.aggregation not in AGGREGATIONS:
        raise SpecError(f"{source}: aggregation must be one of {', '.join(AGGREGATIONS)}, got {spec.aggregation!r}")
    if spec.aggregation != "mean" and not spec.group_by:
        raise SpecError(f"{source}: aggregation {spec.aggregation!r} needs group_by (the detail column it groups by)")
    if spec.scale_name not in SCALE_NAMES:
        raise SpecError(f"{source}: scale_name must be one of {', '.join(SCALE_NAMES)}, got {spec.scale_name!r}")
    if not spec.scale[0] < spec.scale[1]:
        raise SpecError(f"{source}: scale must be [low, high] with low < high, got {list(spec.scale)}")
    if spec.scorer_options.get("trust_remote_code"):  # a spec is data: running a model's own code is the user's call
        raise SpecError(f"{source}: scorer_options.trust_remote_code: a spec cannot turn on running a model's own "
                        f"code; pass it where you run the scorer (python -m flowopd.bench serve SCORER "
                        f"--trust-remote-code)")
    if spec.images_from == spec.name:
        raise SpecError(f"{source}: images_from names the benchmark itself")
    return spec


def generation_spec(values: dict[str, Any], where: str) -> GenerationSpec:
    """A GenerationSpec from ``values`` (a spec's [generation] merged with a caller's overrides), checked as a
    spec file's is: ``where`` names the origin in messages."""
    return GenerationSpec(**_build(GenerationSpec, values, where))


def load_spec_file(path: str | Path) -> BenchmarkSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from None
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
    for spec in specs.values():
        owner = specs.get(spec.images_from) if spec.images_from else spec
        if owner is None:
            close = difflib.get_close_matches(spec.images_from, specs, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SpecError(f"{spec.source}: images_from = {spec.images_from!r} is not a benchmark{hint}")
        if (owner.prompts, owner.generation) != (spec.prompts, spec.generation):
            raise SpecError(f"{spec.source}: images_from = {owner.name!r} but its [prompts] or [generation] differ "
                            f"from {owner.source}'s (shared images need the same prompts and settings)")
    return specs


def get_spec(name: str) -> BenchmarkSpec:
    specs = all_specs()
    if name not in specs:
        import difflib

        close = difflib.get_close_matches(name, specs, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown benchmark {name!r}{hint} (run `python -m flowopd.bench list`)")
    return specs[name]
