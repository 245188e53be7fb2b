"""Training prompts: the registry of prompt samplers and :class:`PromptSampler`, which draws each iteration's
prompts from a recipe's task-tagged sources (:class:`flowopd.train.config.PromptSourceConfig`): a registered
sampler, a pinned prompt file, or a benchmark's prompt set.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from flowopd.bench.spec import get_spec
from flowopd.data import load_prompts
from flowopd.registry import Registry, UnknownNameError
from flowopd.specs import PromptSetSpec
from flowopd.train.config import ConfigError, PromptSourceConfig, from_dict

#: Training prompt samplers (PromptSourceConfig.sampler): callables ``f(rng, **sampler_args) -> metadata dict`` with
#: ``"prompt"``. A recipe names one of them (or its registered ``"module:function"``) and never imports code by
#: itself; its ``imports`` modules, or the ``flowopd.prompt_samplers`` entry-point group, register more.
PROMPT_SAMPLERS = Registry("prompt sampler", entry_point_group="flowopd.prompt_samplers")
PROMPT_SAMPLERS.register("mini-world", "flowopd.world.grammar:sample_prompt")


def resolve_sampler(value: str) -> Any:
    """The registered prompt sampler that ``value`` names (its name or its registered target); anything else
    raises UnknownNameError before any code of it is imported."""
    for name in PROMPT_SAMPLERS.names():
        if value in (name, PROMPT_SAMPLERS.target(name)):
            return PROMPT_SAMPLERS.get(name)
    return PROMPT_SAMPLERS.get(value)  # not registered: the error lists the registered samplers


class PromptSampler:
    """Draws training prompts from the recipe's sources (see PromptSourceConfig and TrainConfig.mix)."""

    def __init__(self, sources: Sequence[PromptSourceConfig], mix: str = "iteration") -> None:
        if not sources:
            raise ConfigError("no prompt sources: add at least one [[prompts]] table to the recipe")
        if mix not in ("iteration", "prompt"):
            raise ConfigError(f"mix must be 'iteration' or 'prompt', got {mix!r}")
        self.sources, self.mix = list(sources), mix
        self.pools: list[list[dict[str, Any]] | None] = []
        self.fns: list[Any] = []
        for i, s in enumerate(self.sources):
            kinds = [k for k in ("sampler", "prompt_set", "benchmark") if getattr(s, k)]
            if len(kinds) != 1:
                raise ConfigError(f"prompts[{i}] (task {s.task!r}) needs exactly one of sampler, prompt_set, "
                                  f"benchmark; got {kinds or 'none'}")
            if s.weight <= 0:
                raise ConfigError(f"prompts[{i}]: weight must be > 0, got {s.weight}")
            try:
                fn = resolve_sampler(s.sampler) if s.sampler else None
            except UnknownNameError as e:
                raise ConfigError(f"prompts[{i}].sampler: {e}") from e
            if fn is not None:
                try:  # the arguments fit the sampler's signature (checked before any prompt is drawn)
                    inspect.signature(fn).bind(None, **s.sampler_args)
                except TypeError as e:
                    raise ConfigError(f"prompts[{i}].sampler_args: {e} (sampler {s.sampler!r})") from e
            self.fns.append(fn)
            if s.prompt_set:
                where = f"prompts[{i}].prompt_set"
                try:
                    spec = from_dict(PromptSetSpec, s.prompt_set, "recipe", prefix=f"{where}.")
                except TypeError as e:  # a required field left out
                    raise ConfigError(f"{where}: {e}") from e
                self.pools.append(load_prompts(spec))
            elif s.benchmark:
                self.pools.append(load_prompts(get_spec(s.benchmark).prompts))
            else:
                self.pools.append(None)
        weights = [s.weight for s in self.sources]
        if mix == "iteration":
            if any(w != int(w) for w in weights):
                raise ConfigError(f"mix = 'iteration' cycles whole iterations: weights must be integers, got {weights}")
            self.cycle = [i for i, w in enumerate(weights) for _ in range(int(w))]
        self.probs = np.asarray(weights, dtype=np.float64) / sum(weights)

    def draw(self, rng: np.random.Generator, iteration: int, n: int) -> list[dict[str, Any]]:
        """``n`` prompt metadata dicts for ``iteration`` (1-based), each with its source's ``task``."""
        if self.mix == "iteration":
            which = np.full(n, self.cycle[(iteration - 1) % len(self.cycle)])
        else:
            which = rng.choice(len(self.sources), size=n, p=self.probs)
        out: list[dict[str, Any]] = [{}] * n
        for src in dict.fromkeys(which.tolist()):
            slots = np.flatnonzero(which == src)
            for slot, meta in zip(slots, self.draw_source(rng, src, len(slots))):
                out[slot] = meta
        return out

    def draw_source(self, rng: np.random.Generator, src: int, n: int) -> list[dict[str, Any]]:
        """``n`` prompt metadata dicts from source ``src`` (an index into ``sources``), with its ``task``."""
        pool, fn, s = self.pools[src], self.fns[src], self.sources[src]
        if pool is not None:
            picks = [pool[j] for j in rng.choice(len(pool), size=n, replace=n > len(pool))]
        else:
            picks = [fn(rng, **s.sampler_args) for _ in range(n)]
        for meta in picks:
            if not isinstance(meta.get("prompt"), str):
                raise ValueError(f"prompt source {src} (task {s.task!r}) gave an item without a 'prompt'")
        return [{**meta, "task": s.task} for meta in picks]
