"""Recipe configs: a TOML file is an instance of a config dataclass, refined by ``key=value`` overrides.

``load_config(PretrainConfig, "training/configs/mini_pretrain.toml", ["max_steps=20", "model.channels=[16,32,64]"])``
reads the file, applies the overrides (dotted keys reach nested dataclasses; values are parsed as TOML values,
falling back to a plain string) and converts every value to the field's declared type. Every value is checked
when it is parsed (issue 19, point 3): its type, finiteness for numbers, and the range or choices that
:data:`FIELD_RULES` gives its field name. An error is one line that names the file (or the override), the dotted
key, what was expected and what was given; an unknown key also gets the closest known keys.

:func:`resume_changes` compares a run's recorded config with the config it is resumed with.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """The values a config field may take: bounds (``gt``/``ge``/``lt``/``le``) or ``choices``. For a list the
    rule applies to every item; ``None`` (an optional field left unset) always passes."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    why: str = ""

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe(self, integer: bool) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        bounds = [f"{op} {_number(v)}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                  if v is not None]
        what = "an integer" if integer else "a finite number"
        return f"{what} {' and '.join(bounds)}" + (f" ({self.why})" if self.why else "")


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


_AT_LEAST_0, _AT_LEAST_1, _POSITIVE = Rule(ge=0), Rule(ge=1), Rule(gt=0)
_FRACTION, _DECAY = Rule(ge=0, le=1), Rule(ge=0, lt=1)

#: diffusers.optimization.SchedulerType (a test keeps the two in step; diffusers is not imported to parse a file)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")

#: Ranges and choices by field name. One name means one thing in every recipe (GRPO, OPD, SFT, pretraining;
#: STYLE.md), so one rule per name, applied wherever a config dataclass has a field of that name. Rules that
#: involve several fields (batch divisibility, the SDE window inside the steps) are the recipes' own checks.
FIELD_RULES: dict[str, Rule] = {
    # optimisation
    "learning_rate": _POSITIVE, "lr": _POSITIVE, "adam_epsilon": _POSITIVE,
    "adam_beta1": _DECAY, "adam_beta2": _DECAY, "betas": _DECAY,
    "adam_weight_decay": _AT_LEAST_0, "weight_decay": _AT_LEAST_0,
    "max_grad_norm": _POSITIVE, "grad_clip": Rule(ge=0, why="0 disables the clip"),
    "lr_scheduler": Rule(choices=LR_SCHEDULERS), "lr_warmup_steps": _AT_LEAST_0, "warmup_steps": _AT_LEAST_0,
    "min_lr_ratio": _FRACTION, "clip_range": _POSITIVE, "adv_clip_max": _POSITIVE, "beta": _AT_LEAST_0,
    "ema_decay": _DECAY, "ema_update_interval": _AT_LEAST_1, "anchor_weight": _AT_LEAST_0,
    "mar_weight": _AT_LEAST_0,
    # sizes, counts and cadences
    "num_iterations": _AT_LEAST_1, "max_steps": _AT_LEAST_1, "num_steps": _AT_LEAST_1, "sample_steps": _AT_LEAST_1,
    "group_size": Rule(ge=2, why="a group of one has no advantage"), "prompts_per_iteration": _AT_LEAST_1,
    "sample_batch_size": _AT_LEAST_1, "train_batch_size": _AT_LEAST_1, "batch_size": _AT_LEAST_1,
    "eval_batch_size": _AT_LEAST_1, "updates_per_iteration": _AT_LEAST_1, "epochs_per_iteration": _AT_LEAST_1,
    "best_of_n": _AT_LEAST_1, "save_every": _AT_LEAST_1, "eval_every": Rule(ge=0, why="0 = never"),
    "checkpoint_every": Rule(ge=0, why="0 = only the final model"), "keep_checkpoints": _AT_LEAST_1,
    "eval_limit": _AT_LEAST_1, "grad_cosine_every": Rule(ge=0, why="0 = off"), "grad_cosine_prompts": _AT_LEAST_1,
    "reward_workers": _AT_LEAST_0, "threads": Rule(ge=0, why="0 = torch's default"), "seed": _AT_LEAST_0,
    "lora_rank": _AT_LEAST_1, "lora_alpha": _POSITIVE, "resolution": _AT_LEAST_1,
    # sampling
    "guidance_scale": _AT_LEAST_0, "loss_guidance_scale": _AT_LEAST_0, "sample_guidance": _AT_LEAST_0,
    "noise_level": Rule(gt=0, why="0 is the deterministic ODE, which has no log-prob to train"),
    "timestep_fraction": Rule(gt=0, le=1), "sde_window_size": _AT_LEAST_0, "sde_window_range": _AT_LEAST_0,
    "shift": _POSITIVE, "text_share": _FRACTION, "prompt_dropout": _DECAY, "logit_std": _POSITIVE,
    "weight": _POSITIVE, "max_sequence_length": _AT_LEAST_1, "time_shift": _POSITIVE,
    "time_grid": Rule(ge=0, why="0 = continuous times"), "data_noise_level": Rule(ge=0, why="0 = the ODE"),
    # choices
    "mixed_precision": Rule(choices=("no", "bf16", "fp16")), "sde_type": Rule(choices=("sde", "cps")),
    "log_prob_reduction": Rule(choices=("mean", "sum")), "advantage_std": Rule(choices=("batch", "group")),
    "mix": Rule(choices=("iteration", "prompt")), "time_sampling": Rule(choices=("logit_normal", "uniform")),
    "save_dtype": Rule(choices=("float32", "float16", "bfloat16")), "data": Rule(choices=("teachers", "best_of_n")),
    # the mini network's shape (pretraining)
    "channels": _AT_LEAST_1, "text_dim": _AT_LEAST_1, "text_layers": _AT_LEAST_1, "heads": _AT_LEAST_1,
    "cond_dim": _AT_LEAST_1, "groups": _AT_LEAST_1, "max_length": _AT_LEAST_1, "image_size": _AT_LEAST_1,
    "vocab_size": Rule(ge=0, why="0 = the tokenizer's"),
}


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from the TOML file at ``path`` (optional) and ``key=value`` overrides (applied last)."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} not found") from e
        except IsADirectoryError as e:
            raise ConfigError(f"config file {path} is a directory, not a TOML file") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (a TOML file?): {e.reason} at byte {e.start}") from e
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), _Override(raw.strip()))
    return from_dict(cls, data, source)


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "config", prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (nested) mapping, converting values to the declared field types."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        where = f"override {prefix + key}={data[key]}" if isinstance(data[key], _Override) else source
        close = difflib.get_close_matches(key, list(fields), n=3)
        hint = (f"; did you mean {', '.join(prefix + c for c in close)}?" if close
                else f" (known keys: {', '.join(prefix + f for f in fields)})")
        raise ConfigError(f"{where}: unknown key {prefix + key!r} for {cls.__name__}{hint}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        where = f"override {key}={value}" if isinstance(value, _Override) else source
        kwargs[name] = _convert(hints[name], value, key, where)
        check_value(name, kwargs[name], key, where)
    return cls(**kwargs)


def check_value(name: str, value: Any, key: str, source: str) -> None:
    """Raise ConfigError unless ``value`` fits :data:`FIELD_RULES`'s rule for the field ``name`` (if any)."""
    rule = FIELD_RULES.get(name)
    if rule is None or value is None:
        return
    for item in value if isinstance(value, list | tuple) else [value]:
        if not rule.allows(item):
            integer = isinstance(item, int) and not isinstance(item, bool)
            raise ConfigError(f"{source}: {key!r} must be {rule.describe(integer)}, got {item!r}")


def check_fields(config: Any, source: str = "config", prefix: str = "") -> None:
    """Apply :func:`check_value` to every field of a config dataclass built in code (nested ones too)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, source, f"{prefix}{f.name}.")
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, v in enumerate(value):
                check_fields(v, source, f"{prefix}{f.name}[{i}].")
        else:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{source}: {prefix + f.name!r} must be a finite number, got {value!r}")
            check_value(f.name, value, prefix + f.name, source)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for logging into a run directory and checking a resume)."""
    return dataclasses.asdict(config)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    data[leaf] = value


class _Override(str):
    """The raw text of a command-line value; parsed once its field's type is known."""


def _parse_value(raw: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"s"``) or, failing that, the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return str(raw)


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Override):
        source = f"override {key}={value}"
        if value.lower() == "none" and type(None) in args:
            return None
        parsed = _parse_value(value)
        # a string field keeps the text as typed (``name=true`` is "true"), unless it was TOML-quoted
        value = parsed if isinstance(parsed, str) or not _accepts_str(tp) else str(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key!r} must be a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key!r} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key!r} must be a table, got {value!r}")
        value_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(value_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key!r} must be true or false, got {value!r}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key!r} must be a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key!r} must be a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: {key!r} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _accepts_str(tp: Any) -> bool:
    """A str field, or an optional/union one with str among its options (not a dict keyed by str)."""
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def resume_changes(
    saved: Mapping[str, Any], config: Any, changeable: Collection[str], where: str
) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Compare the config a checkpoint recorded (``saved``: :func:`to_dict` through JSON) with the config dataclass
    ``config`` it is resumed with. Returns ``({dotted key: (recorded, now)}`` of the changed fields, ``[fields the
    checkpoint did not record]``): those were added to the recipe since, and take the value given now. A change to
    a field not in ``changeable`` (dotted names; a section's name covers its fields) is refused with a ConfigError
    naming ``where`` (the checkpoint), each refused field and its two values."""
    changed: dict[str, tuple[Any, Any]] = {}
    added: list[str] = []
    _compare(saved, config, json.loads(json.dumps(to_dict(config), default=str)), "", changed, added)
    refused = [k for k in changed if not any(k == c or k.startswith(c + ".") for c in changeable)]
    if refused:
        shown = "; ".join(f"{k} = {changed[k][0]!r} there, {changed[k][1]!r} now" for k in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise ConfigError(
            f"resume: {where} was written with another config: {shown}{more}. Only {', '.join(changeable)} may "
            f"change when a run is resumed: put the recorded values back, or start a new run in another output_dir"
        )
    return changed, added


def _compare(saved: Mapping[str, Any], config: Any, now: Mapping[str, Any], prefix: str,
             changed: dict[str, tuple[Any, Any]], added: list[str]) -> None:
    """``now`` is ``config`` as JSON data; sections (nested dataclasses) are compared field by field."""
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if f.name not in saved:
            added.append(key)
        elif dataclasses.is_dataclass(value) and isinstance(saved[f.name], Mapping):
            _compare(saved[f.name], value, now[f.name], key + ".", changed, added)
        elif now[f.name] != saved[f.name]:
            changed[key] = (saved[f.name], now[f.name])
