"""Rewards for training: registered scorers turned into normalised, weighted, task-routed rewards.

A reward is a weighted sum of *terms* ``{key: weight}`` (TRL's habit: rewards are plain callables). A key is

- a registered scorer name (``"geneval"``, ``"mini-quality"``): the scorer's per-sample score, or
- ``"<scorer>.<detail>"`` (``"mini-geneval.partial"``): one of the scorer's per-sample details instead of
  its score, e.g. the mini world's partial GenEval credit (a denser signal than the strict 0/1 score).

Native-scale normalisation (METHOD.md s.4-5: "reward normalisations live in the reward adapter, not in the
scorer"): each score is divided by :data:`NATIVE_SCALES` (DeQA/5, PickScore/26, as in the paper's average and
in Flow-GRPO's reward functions; the mini analogues by the top of their scale), every other score and every
detail by 1, unless ``scales`` says otherwise.

Task routing (GRPO-Mix, METHOD.md s.4: reward 0.8 x task + 0.2 x quality): ``tasks`` maps a prompt's task
(``metadata["task"]``, set by the prompt source of the recipe) to its terms; the task ``"*"`` serves every
prompt whose task has no entry of its own. A scorer runs only on the samples whose terms use it.

NaN means "not applicable" (ScoreBatch's convention). The total of a sample is the weighted sum over its
applicable terms, rescaled by ``sum(all weights) / sum(applicable weights)`` so that it stays on the scale of
the full sum (and equals Flow-GRPO's plain weighted sum when every term applies); with no applicable term it
is NaN and the trainer gives that sample no advantage.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowopd.scorers.base import ScoreBatch, Scorer

#: Divisors that put a scorer's native score on a ~0-1 scale (METHOD.md s.4: DeQA/5, PickScore/26).
NATIVE_SCALES: dict[str, float] = {
    "deqa": 5.0,
    "pickscore": 26.0,
    "mini-quality": 5.0,  # the DeQA analogue, 1-5 (benchmarks/mini-quality.toml)
    "mini-pick": 10.0,  # the PickScore analogue, 0-10 (benchmarks/mini-pick.toml)
}
#: The task whose terms serve every prompt without a task entry of its own.
ANY_TASK = "*"


@dataclass(frozen=True)
class RewardTerm:
    """One weighted, normalised term: ``weight * value / scale``; ``value`` is a score or a detail."""

    key: str
    scorer: str
    detail: str | None
    weight: float
    scale: float


def parse_key(key: str) -> tuple[str, str | None]:
    """``"mini-geneval.partial"`` -> ``("mini-geneval", "partial")``; ``"geneval"`` -> ``("geneval", None)``."""
    scorer, sep, detail = key.partition(".")
    if not scorer or (sep and not detail):
        raise ValueError(f"reward key {key!r} must be '<scorer>' or '<scorer>.<detail>'")
    return scorer, (detail or None)


def make_terms(weights: Mapping[str, Any], scales: Mapping[str, float] | None = None) -> list[RewardTerm]:
    """Terms of ``{key: weight}``; ``scales`` overrides :data:`NATIVE_SCALES` per key or per scorer."""
    scales = dict(scales or {})
    if not weights:
        raise ValueError("a reward needs at least one {scorer: weight} term")
    terms = []
    for key, weight in weights.items():
        scorer, detail = parse_key(key)
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"reward term {key!r}: weight must be a number, got {weight!r}") from None
        # a detail (e.g. partial credit in [0, 1]) has no native scale of its own: divided by 1 unless told
        scale = float(scales.get(key, 1.0 if detail else NATIVE_SCALES.get(scorer, 1.0)))
        if not math.isfinite(w) or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"reward term {key!r}: weight {w} and scale {scale} must be finite, scale non-zero")
        terms.append(RewardTerm(key=key, scorer=scorer, detail=detail, weight=w, scale=scale))
    return terms


def term_values(batch: ScoreBatch, term: RewardTerm) -> np.ndarray:
    """The normalised per-sample values of ``term`` from a scorer's output (NaN = not applicable)."""
    if term.detail is None:
        raw = batch.scores
    else:
        if term.detail not in batch.details:
            raise KeyError(
                f"reward term {term.key!r}: scorer {term.scorer!r} returned no detail {term.detail!r} "
                f"(its details: {sorted(batch.details) or 'none'})"
            )
        raw = np.asarray([math.nan if v is None else float(v) for v in batch.details[term.detail]])
    return np.asarray(raw, dtype=np.float64) / term.scale


def weighted_sum(values: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """``sum_k w_k v_k`` over the finite values, rescaled by ``sum(w) / sum(w of finite values)``; NaN if none.

    Every array in ``values`` has the same length; ``weights`` has the same keys.
    """
    keys = list(weights)
    if set(keys) != set(values):
        raise ValueError(f"weighted_sum: keys of values {sorted(values)} and weights {sorted(keys)} differ")
    v = np.stack([np.asarray(values[k], dtype=np.float64) for k in keys])  # (K, N)
    w = np.asarray([weights[k] for k in keys], dtype=np.float64)[:, None]
    ok = np.isfinite(v)
    applicable = (w * ok).sum(0)
    total = (np.where(ok, v, 0.0) * w).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total * (w.sum() / applicable)
    return np.where(ok.any(0) & (applicable != 0), out, np.nan)


@dataclass
class RewardOutput:
    """Per-sample rewards of one batch.

    Attributes:
        total: (N,) float64 reward the advantages are computed from (NaN = no applicable term).
        terms: normalised value of every term key, (N,) each, NaN where the key is not a term of the
            sample's task or does not apply to it.
        tasks: the task each sample was routed by.
    """

    total: np.ndarray
    terms: dict[str, np.ndarray]
    tasks: list[str]


class Reward:
    """A callable ``reward(images, prompts, metadata) -> RewardOutput`` built from registered scorers.

    Args:
        tasks: ``{task: {key: weight}}``, or a flat ``{key: weight}`` that serves every prompt (task ``"*"``).
        scales: divisor per key or scorer, overriding :data:`NATIVE_SCALES`.
        scorers: scorer instances by name (injected: tests, shared with an evaluator); the others are built.
        scorer_options: constructor options per scorer name (model id or local path, device, ...).
        servers: scorer name -> URL of a running scorer server (``flowopd.scorers.server``), for scorers that
            live in their own environment (DeQA) or on another machine. A server's token is read from
            ``$FLOWOPD_SCORER_TOKEN`` by ``RemoteScorer`` (never from the recipe, which is committed).
        device: passed to scorers whose constructor takes ``device`` (unless their options set it).
    """

    def __init__(
        self,
        tasks: Mapping[str, Any],
        scales: Mapping[str, float] | None = None,
        scorers: Mapping[str, Scorer] | None = None,
        scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
        servers: Mapping[str, str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if tasks and all(not isinstance(v, Mapping) for v in tasks.values()):
            tasks = {ANY_TASK: tasks}
        if not tasks:
            raise ValueError("Reward: no terms; give {scorer: weight} or {task: {scorer: weight}}")
        self.terms: dict[str, list[RewardTerm]] = {}
        for task, weights in tasks.items():
            if not isinstance(weights, Mapping):
                raise ValueError(f"Reward: task {task!r} must map to {{scorer: weight}}, got {weights!r}")
            self.terms[str(task)] = make_terms(weights, scales)
        self.keys: list[str] = list(dict.fromkeys(t.key for terms in self.terms.values() for t in terms))
        names = list(dict.fromkeys(t.scorer for terms in self.terms.values() for t in terms))
        given = dict(scorers or {})
        self.scorers: dict[str, Scorer] = {
            name: given[name] if name in given else _build(name, scorer_options, servers, device) for name in names
        }

    def task_terms(self, task: str) -> list[RewardTerm]:
        """The terms that score a prompt of ``task``."""
        if task in self.terms:
            return self.terms[task]
        if ANY_TASK in self.terms:
            return self.terms[ANY_TASK]
        raise KeyError(
            f"reward: no terms for task {task!r} and no '*' entry (tasks with terms: {sorted(self.terms)}); "
            f"add [reward.tasks.{task}] to the recipe or set the prompt source's task"
        )

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> RewardOutput:
        n = len(prompts)
        if len(metadata) != n or images.shape[0] != n:
            raise ValueError(f"reward: {images.shape[0]} images, {n} prompts, {len(metadata)} metadata rows")
        tasks = [str(m.get("task", ANY_TASK)) for m in metadata]
        per_sample = [self.task_terms(task) for task in tasks]
        values = {key: np.full(n, np.nan) for key in self.keys}
        for name, scorer in self.scorers.items():
            rows = [i for i, terms in enumerate(per_sample) if any(t.scorer == name for t in terms)]
            if not rows:
                continue
            batch = scorer.score(images[rows], [prompts[i] for i in rows], [metadata[i] for i in rows])
            if len(batch) != len(rows):
                raise ValueError(f"reward: scorer {name!r} returned {len(batch)} scores for {len(rows)} images")
            for key in {t.key for i in rows for t in per_sample[i] if t.scorer == name}:
                term = next(t for terms in self.terms.values() for t in terms if t.key == key)
                vals = term_values(batch, term)
                for j, i in enumerate(rows):
                    if any(t.key == key for t in per_sample[i]):
                        values[key][i] = vals[j]
        total = np.full(n, np.nan)
        for task in dict.fromkeys(tasks):
            idx = np.asarray([i for i, t in enumerate(tasks) if t == task])
            terms = self.task_terms(task)
            total[idx] = weighted_sum({t.key: values[t.key][idx] for t in terms}, {t.key: t.weight for t in terms})
        return RewardOutput(total=total, terms=values, tasks=tasks)


def _build(
    name: str,
    scorer_options: Mapping[str, Mapping[str, Any]] | None,
    servers: Mapping[str, str] | None,
    device: str | torch.device,
) -> Scorer:
    """A scorer client for a served scorer, or the registered scorer built with its options."""
    if servers and name in servers:
        from flowopd.scorers.client import RemoteScorer

        return RemoteScorer(servers[name], expected_name=name)
    from flowopd.scorers import SCORERS, build_scorer

    options = dict((scorer_options or {}).get(name, {}))
    params = inspect.signature(SCORERS.get(name)).parameters
    if "device" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options.setdefault("device", str(device))
    return build_scorer(name, **options)
