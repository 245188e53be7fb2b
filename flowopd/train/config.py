"""Recipe configs: a TOML file is an instance of a config dataclass, refined by ``key=value`` overrides.

``load_config(PretrainConfig, "training/configs/mini_pretrain.toml", ["max_steps=20", "model.channels=[16,32,64]"])``
reads the file, applies the overrides (dotted keys reach nested dataclasses; values are parsed as TOML values,
falling back to a plain string) and converts every value to the field's declared type. Every value is checked
when it is parsed (issue 19, point 3): its type, finiteness for numbers, and the range or choices that
:data:`FIELD_RULES` gives its field name. An error is one line that names the file (or the override), the dotted
key, what was expected and what was given; an unknown key also gets the closest known keys.

:func:`resume_changes` compares a run's recorded config with the config it is resumed with.

The fields every trainer shares (GRPO, OPD, SFT: model, LoRA, prompts, reward, optimisation, EMA, checkpoints,
evaluation, logging) are declared once, in :class:`TrainConfig`; each recipe's config extends it, may give a
field a default of its own, and ``--help`` lists the fields (:func:`describe_fields`) base first, then the
recipe's own.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flowopd.rewards import ANY_TASK
from flowopd.train.lora import LORA_TARGET_MODULES

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
    "monitor_probe_every": Rule(ge=0, why="0 = off"), "monitor_probe_prompts": _AT_LEAST_1,
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
            raise ConfigError(
                f"config file {path} is not UTF-8 text (a TOML file?): {e.reason} at byte {e.start}"
            ) from e
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


# ---------------------------------------------------------------- the trainers' configs


def help_field(default: Any, text: str) -> Any:
    """A dataclass field with help text (TRL's habit); mutable defaults are copied per instance."""
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def describe_fields(cls: type) -> str:
    """Every field of the config dataclass ``cls`` with its default and help text (the ``--help`` of a recipe)."""
    lines = ["keys (default): help"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


@dataclass
class PromptSourceConfig:
    """Where one task's training prompts come from; exactly one of ``sampler``, ``prompt_set``, ``benchmark``."""

    task: str = help_field(ANY_TASK, "Routing key: the prompts' metadata['task'], which picks their reward terms.")
    weight: float = help_field(1.0, "Share of this source. mix='iteration': whole iterations per cycle (GRPO-Mix "
                               "GenEval:OCR:PickScore = 3:1:1, integers); mix='prompt': probability weight.")
    sampler: str = help_field("", "A registered prompt sampler (PROMPT_SAMPLERS: 'mini-world', also written "
                              "'flowopd.world.grammar:sample_prompt'; others registered by the recipe's `imports`), "
                              "called as f(rng: numpy Generator, **sampler_args) -> metadata dict with 'prompt'.")
    sampler_args: dict[str, Any] = help_field({}, "Keyword arguments of the sampler, e.g. {split='train', "
                                              "task='ocr'}.")
    prompt_set: dict[str, Any] = help_field({}, "A prompt file as flowopd.specs.PromptSetSpec fields (format, "
                                            "path, url, sha256, prompt_field): pinned and verified by flowopd.data.")
    benchmark: str = help_field("", "Use this benchmark's prompt set (its *evaluation* prompts: smoke tests only).")


@dataclass
class RewardConfig:
    """The reward (flowopd.rewards.Reward): weighted, native-scale-normalised scorer terms per task."""

    weights: dict[str, float] = help_field({}, "{key: weight} for every prompt; a key is a registered scorer or "
                                           "'<scorer>.<detail>' (e.g. 'mini-geneval.partial').")
    tasks: dict[str, dict[str, float]] = help_field({}, "Per-task terms (GRPO-Mix: geneval = {geneval = 0.8, "
                                                    "deqa = 0.2}); a task without an entry uses `weights`.")
    scales: dict[str, float] = help_field({}, "Divisors per key or scorer, overriding DeQA/5, PickScore/26 ...")
    scorer_options: dict[str, dict[str, Any]] = help_field({}, "Constructor options per scorer (model id, local "
                                                           "path, device ...).")
    servers: dict[str, str] = help_field({}, "Scorer name -> URL of a running scorer server (DeQA's own env).")

    def is_set(self) -> bool:
        """Whether the recipe configures a reward (OPD may run without one, SFT needs one for best-of-N)."""
        return bool(self.weights or self.tasks)

    def terms_by_task(self) -> dict[str, dict[str, float]]:
        """``{task: {key: weight}}`` as flowopd.rewards.Reward takes it (``weights`` under the any-task key)."""
        tasks = {str(k): dict(v) for k, v in self.tasks.items()}
        if self.weights:
            tasks[ANY_TASK] = dict(self.weights)
        return tasks


@dataclass
class TrainConfig:
    """The fields every trainer shares (GRPO, OPD, SFT), declared once. Defaults are the published SD3.5-M
    settings (Flow-GRPO ``config/grpo.py`` ``geneval_sd3``/``general_ocr_sd3``/``pickscore_sd3`` on 32 GPUs, and
    METHOD.md s.3); a recipe's config may give a field a default of its own."""

    # --- model and run
    model: str = help_field("stabilityai/stable-diffusion-3.5-medium", "Base checkpoint: hub id, diffusers "
                            "directory, mini:NAME or a mini directory (flowopd.models.loading.load_policy).")
    output_dir: str = help_field("runs/grpo", "Checkpoints, tensorboard logs, metrics.jsonl and evaluations.")
    seed: int = help_field(42, "Seeds the prompt/noise generator and the adapter init (Flow-GRPO: 42).")
    resume: str = help_field("", "'' starts fresh; 'latest' continues from the newest checkpoint in output_dir "
                             "(fresh if none); or a checkpoint directory.")
    imports: list[str] = help_field([], "Modules imported first, so that they can register scorers and prompt "
                                    "samplers. This RUNS CODE, as running a Python file of yours would: the only "
                                    "field through which a recipe loads code (every other name resolves through a "
                                    "registry).")
    mixed_precision: str = help_field("bf16", "'no', 'bf16' or 'fp16': dtype of the frozen base weights and "
                                      "accelerate's autocast; the adapter stays float32 and the VAE float32.")
    allow_tf32: bool = help_field(True, "TF32 matmuls on Ampere+ GPUs (Flow-GRPO: true).")
    cpu: bool = help_field(False, "Run on CPU even when a GPU is present.")
    threads: int = help_field(0, "torch CPU threads of this process (0: torch's default). On a shared small CPU, 1 "
                              "avoids thread contention that slows small models many times over.")
    # --- LoRA
    lora_rank: int = help_field(32, "LoRA rank (published 32).")
    lora_alpha: float = help_field(64.0, "LoRA alpha (published 64; scaling alpha / rank = 2).")
    lora_target_modules: list[str] = help_field(list(LORA_TARGET_MODULES), "Module-name suffixes that get "
                                                "adapters (Flow-GRPO's joint-attention projections).")
    lora_init: str = help_field("gaussian", "peft init_lora_weights (Flow-GRPO: gaussian, B = 0).")
    lora_path: str = help_field("", "Start from this adapter (peft directory, mini:NAME, or a training checkpoint "
                                "or run directory) instead of a fresh one.")
    # --- prompts and sampling
    resolution: int = help_field(512, "Image height and width (published 512).")
    guidance_scale: float = help_field(4.5, "CFG scale for rollouts and the training forward (published 4.5).")
    max_sequence_length: int = help_field(128, "T5 prompt length of SD3 models (Flow-GRPO / Flow-OPD encode at "
                                          "128; diffusers' default is 256). The mini world's tokenizer has its own "
                                          "length.")
    prompts_per_iteration: int = help_field(48, "Distinct prompt draws per iteration over all processes "
                                            "(published 48: 48 x 24 = 1152 images per epoch on 32 GPUs).")
    sample_batch_size: int = help_field(9, "Images per sampling batch per process (published 9).")
    prompts: list[PromptSourceConfig] = help_field([], "Prompt sources (one per task).")
    mix: str = help_field("iteration", "'iteration': each iteration draws from one source, cycling by integer "
                          "weights (the public GRPO-Mix alternation); 'prompt': each prompt picks a source.")
    reward: RewardConfig = help_field(RewardConfig(), "The reward; see RewardConfig.")
    # --- optimisation
    num_iterations: int = help_field(1000, "Iterations (Flow-GRPO epochs) to run; Flow-GRPO runs until stopped.")
    updates_per_iteration: int = help_field(2, "Optimizer steps per iteration (Flow-GRPO: gradient accumulation "
                                            "over half the sampling batches, i.e. 2).")
    learning_rate: float = help_field(3e-4, "AdamW learning rate (published 3e-4).")
    adam_beta1: float = help_field(0.9, "AdamW beta1.")
    adam_beta2: float = help_field(0.999, "AdamW beta2.")
    adam_weight_decay: float = help_field(1e-4, "AdamW weight decay (Flow-GRPO 1e-4).")
    adam_epsilon: float = help_field(1e-8, "AdamW epsilon.")
    lr_scheduler: str = help_field("constant", "diffusers.optimization scheduler name (Flow-GRPO: constant).")
    lr_warmup_steps: int = help_field(0, "Warm-up optimizer steps of the scheduler.")
    max_grad_norm: float = help_field(1.0, "Gradient-norm clip (published 1.0).")
    ema: bool = help_field(True, "EMA of the adapter; checkpoints and evaluation use the EMA weights.")
    ema_decay: float = help_field(0.9, "EMA decay (Flow-GRPO 0.9, with warm-up min((1+s)/(10+s), decay)).")
    ema_update_interval: int = help_field(8, "Optimizer steps between EMA updates (Flow-GRPO 8).")
    # --- checkpoints, evaluation, logging
    save_every: int = help_field(60, "Checkpoint every N iterations, and at the end (Flow-GRPO save_freq 60).")
    eval_every: int = help_field(60, "Evaluate every N iterations, before the first and at the end; 0 = never.")
    eval_benchmarks: list[str] = help_field([], "Benchmarks of flowopd.bench for periodic evaluation.")
    eval_limit: int | None = help_field(None, "Evaluate on the first N prompts of each benchmark (None = all).")
    eval_batch_size: int = help_field(8, "Batch size of evaluation sampling.")
    monitor_probe_every: int = help_field(0, "Mini world only: every N iterations (and at 0 and the last), the "
                                          "policy samples a fixed probe set of train-split prompts and the four "
                                          "Table-1 mini scorers score it, logged as monitor/probe/<benchmark> "
                                          "(flowopd.train.probe; trains nothing, draws no random number); 0 = off. "
                                          "One probe of 16 + 16 prompts on mini:base took 4-6 s on one thread of a "
                                          "busy 2-core CPU. SD3.5-M: use eval_every / eval_benchmarks.")
    monitor_probe_prompts: int = help_field(16, "Prompts of the probe set per image set (mini-geneval's, also "
                                            "scored by mini-quality and mini-pick, and mini-ocr's), one image each.")
    tensorboard: bool = help_field(True, "Write tensorboard events to <output_dir>/tensorboard.")
    progress: bool = help_field(True, "Show a progress bar.")
