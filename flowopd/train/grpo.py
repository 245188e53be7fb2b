"""Flow-GRPO with LoRA: ``python -m flowopd.train grpo CONFIG.toml [key=value ...]`` (METHOD.md s.3).

One iteration (Flow-GRPO's "epoch"):

1. draw ``prompts_per_iteration`` prompts from the recipe's prompt sources and repeat each ``group_size``
   times; shuffle the samples and give each process its contiguous share;
2. sample every share with the SDE sampler in batches of ``sample_batch_size``, recording the stochastic
   steps (:mod:`flowopd.train.rollout`); each batch's rewards are computed in a worker thread while the
   next batch samples (:mod:`flowopd.rewards`);
3. gather the rewards, compute group advantages ``(r - group mean) / (batch std + 1e-4)``; samples of
   groups whose rewards are all equal are dropped (:func:`flowopd.train.losses.group_advantages`);
4. train on the kept samples: the clipped surrogate of every trained step (first ``timestep_fraction`` of
   the steps, or the SDE window) plus ``beta`` times the KL to the reference (the adapter disabled), in
   ``updates_per_iteration`` AdamW updates with grad-norm clipping; then the EMA of the adapter;
5. log (tensorboard, ``metrics.jsonl``), checkpoint and evaluate every N iterations.

Multi-GPU and multi-node through accelerate (``accelerate launch -m flowopd.train grpo CONFIG``; several CPU
processes: ``torchrun --nproc_per_node N -m flowopd.train grpo CONFIG``): every process draws the same
prompts and seeds (same generator), samples its share, and the rewards are gathered, so the run is the same
whatever the number of processes up to float summation order (a test checks 2 processes against 1). DDP is
the tested path; FSDP/DeepSpeed come from accelerate's config (the adapter, EMA and checkpoint code assume
the adapter parameters are not sharded).

Checkpoints (``<output_dir>/checkpoints/iteration-NNNNNN/``): ``adapter/`` in peft format (the EMA weights
when ``ema`` is on, as Flow-GRPO saves them; ``python -m flowopd.bench evaluate DIR`` loads it), and
``state/`` with the live adapter, EMA, optimizer, scheduler, RNG states of every process and the prompt and
noise generator, from which ``resume`` continues exactly (bitwise on CPU). No file is unpickled: tensors
are safetensors or ``torch.load(weights_only=True)``, the rest JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowopd.models.policy import Conditioning, index_cond
from flowopd.registry import Registry, UnknownNameError
from flowopd.rewards import Reward, RewardOutput
from flowopd.scorers.base import Scorer
from flowopd.train.config import (
    ConfigError,
    PromptSourceConfig,
    TrainConfig,
    check_fields,
    describe_fields,
    from_dict,
    help_field,
    load_config,
    to_dict,
)
from flowopd.train.diagnostics import GradientCosineCSV, probe_task_gradients, task_reward_metrics
from flowopd.train.lora import (
    EMA,
    adapter_disabled,
    add_lora,
    lora_parameters,
    save_adapter,
    set_trainable_module,
    trainable_module,
    unwrap,
)
from flowopd.train.losses import group_advantages, grpo_loss, reference_kl
from flowopd.train.rollout import (
    Trajectory,
    concat_trajectories,
    sample_sde_trajectory,
    sde_window,
    step_log_prob,
    trained_positions,
)
from flowopd.train.runs import (
    CheckpointError,
    check_health,
    checkpoint_problem,
    divergence_error,
    prepare_resume,
    watch_scaler,
)

CHECKPOINT_FORMAT = "flowopd-grpo/1"
_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GRPOConfig(TrainConfig):
    """Flow-GRPO with LoRA: the shared fields (:class:`flowopd.train.config.TrainConfig`) and GRPO's own.
    Defaults are the published SD3.5-M settings (Flow-GRPO ``config/grpo.py`` ``geneval_sd3``/``general_ocr_sd3``/
    ``pickscore_sd3`` on 32 GPUs, and METHOD.md s.3)."""

    # --- sampling
    num_steps: int = help_field(10, "Sampling steps of a training rollout (published 10; evaluation uses 40).")
    noise_level: float = help_field(0.7, "SDE noise level a in sigma_t = a sqrt(t / (1 - t)) (published 0.7).")
    sde_type: str = help_field("sde", "'sde' (Flow-GRPO) or 'cps' (coefficient-preserving sampling).")
    same_group_noise: bool = help_field(False, "Every sample of a group starts from the same noise (DanceGRPO's "
                                        "use_same_noise), so that the group's rewards differ only through the SDE "
                                        "steps that are trained. Flow-GRPO draws one noise per sample (False).")
    sde_window_size: int = help_field(0, "Flow-GRPO-Fast: only this many consecutive steps are stochastic and "
                                      "trained, the rest ODE; 0 = every step stochastic.")
    sde_window_range: list[int] = help_field([0, 10], "Range (lo, hi) the SDE window is drawn in, per iteration.")
    timestep_fraction: float = help_field(0.99, "Without a window, train the first int(num_steps * fraction) "
                                          "steps (published 0.99: 9 of 10).")
    log_prob_reduction: str = help_field("mean", "Log-prob over latent elements: 'mean' (Flow-GRPO; the clip "
                                         "range 1e-4 is tuned for it) or 'sum' (exact density).")
    group_size: int = help_field(24, "Images per prompt k (published 24).")
    reward_workers: int = help_field(1, "Threads that score a sampling batch while the next one samples; 0 = "
                                     "score synchronously.")
    # --- optimisation
    clip_range: float = help_field(1e-4, "PPO clip eps (published 1e-4, for the per-element-mean log-prob).")
    adv_clip_max: float = help_field(5.0, "Advantages clipped to +- this (published 5).")
    advantage_std: str = help_field("batch", "'batch' std over all rewards of the iteration (Flow-GRPO "
                                    "global_std = true) or 'group' std.")
    beta: float = help_field(0.04, "KL weight to the reference (0.04 GenEval/OCR, 0.01 PickScore); 0 = no KL.")
    cfg_detach_uncond: bool = help_field(False, "Detach the unconditional CFG branch in the training forward (two "
                                         "passes of N instead of one of 2N). Flow-OPD's compute_log_prob keeps both "
                                         "branches attached (False; Flow-GRPO since 2d76907 detaches it): with CFG g "
                                         "the adapter also moves v_uncond, with weight 1 - g, and a gradient that "
                                         "ignores it is biased (on the mini world, True made the GenEval reward "
                                         "fall during training).")
    # --- diagnostics (flowopd.train.diagnostics)
    grad_cosine_every: int = help_field(0, "Every N iterations, the cosines between the task losses' gradients on "
                                        "the adapter, from a probe batch per task (logged, grad_cosines.csv); 0 = "
                                        "off.")
    grad_cosine_prompts: int = help_field(2, "Prompts per task (x group_size samples) of the gradient-cosine "
                                          "probe.")


@dataclass
class IterationPlan:
    """Everything random about one iteration, drawn identically by every process."""

    metas: list[dict[str, Any]]  # one per sample (global order)
    group_ids: np.ndarray  # (N,) int, one id per distinct (task, prompt)
    noise_seeds: np.ndarray  # (N,) seeds of the starting noise
    sde_seeds: np.ndarray  # (N,) seeds of the step noise
    sde_steps: list[int]
    shuffle_seed: int


@dataclass
class GRPOResult:
    output_dir: Path
    iteration: int
    optimizer_step: int
    history: list[dict[str, float]]
    checkpoints: list[Path]
    policy: Any


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


def import_modules(modules: Sequence[str]) -> None:
    """Import a recipe's ``imports`` (this runs their code); a module that is not found is a one-line error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ConfigError(f"imports: cannot import {module!r} ({e}); is it on PYTHONPATH?") from e


class PromptSampler:
    """Draws training prompts from the recipe's sources (see PromptSourceConfig and GRPOConfig.mix)."""

    def __init__(self, sources: Sequence[PromptSourceConfig], mix: str = "iteration") -> None:
        from flowopd.bench.spec import get_spec
        from flowopd.data import load_prompts
        from flowopd.specs import PromptSetSpec

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


def plan_iteration(config: GRPOConfig, sampler: PromptSampler, rng: np.random.Generator, iteration: int) -> IterationPlan:
    """Prompts, groups, seeds and SDE steps of one iteration, from the shared generator ``rng``."""
    p, k = config.prompts_per_iteration, config.group_size
    prompts = sampler.draw(rng, iteration, p)
    prompt_of = np.repeat(np.arange(p), k)[rng.permutation(p * k)]
    keys: dict[tuple[str, str], int] = {}
    group_of_prompt = [keys.setdefault((m["task"], m["prompt"]), len(keys)) for m in prompts]
    noise_seeds = rng.integers(0, 2**31 - 1, size=p * k)
    if config.same_group_noise:  # one seed per drawn prompt: its first sample's (same draws either way)
        noise_seeds = noise_seeds[np.argmax(prompt_of[None, :] == np.arange(p)[:, None], axis=1)][prompt_of]
    return IterationPlan(
        metas=[prompts[i] for i in prompt_of],
        group_ids=np.asarray(group_of_prompt)[prompt_of],
        noise_seeds=noise_seeds,
        sde_seeds=rng.integers(0, 2**31 - 1, size=p * k),
        sde_steps=sde_window(config.num_steps, config.sde_window_size, config.sde_window_range, rng),
        shuffle_seed=int(rng.integers(0, 2**31 - 1)),
    )


def plan_probe(config: GRPOConfig, sampler: PromptSampler, iteration: int) -> IterationPlan:
    """The gradient-cosine probe of ``iteration`` (flowopd.train.diagnostics): ``grad_cosine_prompts`` prompts x
    ``group_size`` samples from every prompt source, drawn from a generator of its own seeded by (seed,
    iteration), so that the training run is the same with the probe on or off."""
    rng = np.random.default_rng([config.seed, iteration, 1])
    prompts = [m for src in range(len(sampler.sources))
               for m in sampler.draw_source(rng, src, config.grad_cosine_prompts)]
    k, n = config.group_size, len(prompts) * config.group_size
    noise_seeds = rng.integers(0, 2**31 - 1, size=n)
    if config.same_group_noise:
        noise_seeds = np.repeat(noise_seeds[::k], k)
    return IterationPlan(
        metas=[m for m in prompts for _ in range(k)],
        group_ids=np.repeat(np.arange(len(prompts)), k),
        noise_seeds=noise_seeds,
        sde_seeds=rng.integers(0, 2**31 - 1, size=n),
        sde_steps=sde_window(config.num_steps, config.sde_window_size, config.sde_window_range, rng),
        shuffle_seed=0,
    )


def compute_advantages(
    total: np.ndarray, group_ids: np.ndarray, clip: float, std: str
) -> tuple[np.ndarray, np.ndarray]:
    """Group advantages of the finite rewards (METHOD.md s.3); NaN rewards get 0 and are not kept."""
    adv = np.zeros(len(total), dtype=np.float32)
    keep = np.zeros(len(total), dtype=bool)
    finite = np.isfinite(total)
    if finite.any():
        a, k = group_advantages(
            torch.as_tensor(total[finite]), torch.as_tensor(group_ids[finite]), eps=1e-4, clip=clip, std=std
        )
        adv[finite], keep[finite] = a.numpy(), k.numpy()
    return adv, keep


def micro_batches(keep: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split a process's kept samples into ``count`` equal micro-batches, in random order.

    As Flow-GRPO does, dropped samples (advantage 0) pad the kept ones up to a multiple of ``count`` so that
    every process runs the same number of backward passes (DDP); a process with nothing kept trains on
    ``count`` dropped samples, whose only gradient is the KL term.
    """
    kept, dropped = rng.permutation(np.flatnonzero(keep)), rng.permutation(np.flatnonzero(~keep))
    target = max(count, math.ceil(len(kept) / count) * count)
    order = np.concatenate([kept, dropped[: target - len(kept)]])
    return np.split(order, count)


def main(argv: Sequence[str] | None = None) -> int:
    """``grpo CONFIG [key=value ...]`` (the arguments after the subcommand)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        print("usage: python -m flowopd.train grpo CONFIG.toml [key=value ...]\n\n" + describe_fields(GRPOConfig))
        return 0 if args and args[0] in ("-h", "--help") else 2
    result = train(load_config(GRPOConfig, args[0], args[1:]))
    last = result.checkpoints[-1] if result.checkpoints else None
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"done: iteration {result.iteration}, {result.optimizer_step} optimizer steps; last checkpoint {last}")
    return 0


def train(
    config: GRPOConfig,
    scorers: Mapping[str, Scorer] | None = None,
    eval_scorers: Mapping[str, Scorer] | None = None,
) -> GRPOResult:
    """Run the recipe. ``scorers`` (by scorer name) and ``eval_scorers`` (by benchmark) may be injected."""
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, scorers, eval_scorers)
    finally:
        torch.set_num_threads(previous)


def _train(
    config: GRPOConfig, scorers: Mapping[str, Scorer] | None, eval_scorers: Mapping[str, Scorer] | None
) -> GRPOResult:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from diffusers.optimization import get_scheduler

    import_modules(config.imports)
    _check(config)
    n_train = len(trained_positions(config.num_steps, config.sde_window_size or config.num_steps,
                                    config.timestep_fraction, config.sde_window_size > 0))
    # Flow-GRPO's layout: the sampling batches of an iteration are its micro-batches.
    total = config.prompts_per_iteration * config.group_size
    world = PartialState(cpu=config.cpu).num_processes
    if total % (world * config.sample_batch_size):
        raise ConfigError(
            f"prompts_per_iteration x group_size = {total} samples must split into {world} processes x batches "
            f"of sample_batch_size = {config.sample_batch_size}"
        )
    n_batches = total // (world * config.sample_batch_size)
    if n_batches % config.updates_per_iteration:
        raise ConfigError(f"{n_batches} sampling batches per process do not split into updates_per_iteration = "
                          f"{config.updates_per_iteration} equal updates")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=n_batches // config.updates_per_iteration * n_train,
        cpu=config.cpu,
        # adapters whose output does not reach the loss (the mini UNet's last text update) get no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    set_seed(config.seed)
    out_dir = Path(config.output_dir)
    sampler = PromptSampler(config.prompts, config.mix)  # fails on a missing prompt file before the model loads

    policy, model = _build_policy(config, accelerator.device)
    named = lora_parameters(model)
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.num_iterations * config.updates_per_iteration)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_trainable_module(policy, model)
    named = lora_parameters(model)
    ema = EMA(named, config.ema_decay, config.ema_update_interval) if config.ema else None
    reward = Reward(config.reward.terms_by_task(), config.reward.scales, scorers, config.reward.scorer_options,
                    config.reward.servers, accelerator.device)
    rng = np.random.default_rng(config.seed)

    start, step = 0, 0
    resume_dir = _resume_dir(config, out_dir)
    if resume_dir is not None:
        start, step = load_checkpoint(resume_dir, accelerator, named, optimizer, scheduler, ema, rng)
    main_process = accelerator.is_main_process
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2, default=str) + "\n")
    writer = _writer(out_dir, start) if config.tensorboard and main_process else None
    cosines = GradientCosineCSV(out_dir / "grad_cosines.csv", start) if config.grad_cosine_every and main_process else None
    history: list[dict[str, float]] = []
    checkpoints: list[Path] = []
    if config.eval_every and config.eval_benchmarks and resume_dir is None:
        history.append(_log({"iteration": 0, **_evaluate(config, policy, model, named, ema, 0, eval_scorers,
                                                          accelerator)}, writer, out_dir, main_process))

    from tqdm.auto import tqdm

    bar = tqdm(total=config.num_iterations, initial=start, desc="grpo", unit="it",
               disable=not (config.progress and accelerator.is_local_main_process))
    executor = ThreadPoolExecutor(config.reward_workers) if config.reward_workers > 0 else None
    try:
        for iteration in range(start + 1, config.num_iterations + 1):
            t0 = time.perf_counter()
            plan = plan_iteration(config, sampler, rng, iteration)
            probe = {}
            if config.grad_cosine_every and iteration % config.grad_cosine_every == 0:
                probe = _gradient_probe(config, accelerator, policy, model, named, sampler, reward, iteration, cosines)
            n_local = total // accelerator.num_processes
            local = np.arange(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
            traj, cond, rewards, timing = _rollout(config, policy, model, plan, local, reward, executor)
            metrics = {**_reward_metrics(accelerator, plan, rewards, reward.keys), **probe}
            total_r = metrics.pop("_total")
            adv, keep = compute_advantages(total_r, plan.group_ids, config.adv_clip_max, config.advantage_std)
            metrics["advantage/abs_mean"] = float(np.abs(adv[keep]).mean()) if keep.any() else 0.0
            metrics["train/kept_fraction"] = float(keep.mean())
            t1 = time.perf_counter()
            if keep.any():
                batches = micro_batches(keep[local], n_batches, np.random.default_rng([plan.shuffle_seed,
                                                                                          accelerator.process_index]))
                stats, step = _train_iteration(config, accelerator, policy, model, named, optimizer, scheduler, ema,
                                               traj, cond, torch.as_tensor(adv[local]), batches, step)
                metrics.update(stats)
            del traj, cond
            metrics.update({"time/sample_s": timing["sample"], "time/reward_wait_s": timing["reward_wait"],
                            "time/train_s": time.perf_counter() - t1})
            history.append(end_iteration(config, accelerator, policy, model, named, optimizer, scheduler, ema, rng,
                                         iteration, step, metrics, t0, checkpoints, eval_scorers, writer))
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('reward/total', math.nan):.4f}")
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True)
        if writer is not None:
            writer.close()
    accelerator.wait_for_everyone()
    return GRPOResult(out_dir, max(start, config.num_iterations), step, history, checkpoints, policy)


def end_iteration(
    config: GRPOConfig,
    accelerator: Any,
    policy: Any,
    model: torch.nn.Module,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: Any,
    scheduler: Any,
    ema: EMA | None,
    rng: np.random.Generator,
    iteration: int,
    step: int,
    metrics: dict[str, Any],
    t0: float,
    checkpoints: list[Path],
    eval_scorers: Mapping[str, Scorer] | None,
    writer: Any,
) -> dict[str, float]:
    """The tail every training loop (GRPO, OPD, SFT) shares: the checkpoint and the evaluation when due, then
    the iteration's metrics logged (tensorboard, metrics.jsonl); returns the logged metrics. An iteration that
    diverged (:func:`flowopd.train.runs.check_health`) is logged, then stops the run before its checkpoint."""
    out_dir = Path(config.output_dir)
    problem = check_health(metrics, named, ema, accelerator.scaler, step)
    if problem:
        metrics.update({"iteration": iteration, "optimizer_step": step})
        _log(metrics, writer, out_dir, accelerator.is_main_process)
        raise divergence_error(problem, iteration, out_dir)
    if iteration % config.save_every == 0 or iteration == config.num_iterations:
        path = out_dir / "checkpoints" / f"iteration-{iteration:06d}"
        save_checkpoint(path, accelerator, model, named, optimizer, scheduler, ema, rng,
                        {"iteration": iteration, "optimizer_step": step}, config)
        checkpoints.append(path)
    if config.eval_every and config.eval_benchmarks and (
        iteration % config.eval_every == 0 or iteration == config.num_iterations
    ):
        metrics.update(_evaluate(config, policy, model, named, ema, iteration, eval_scorers, accelerator))
    metrics.update({"iteration": iteration, "optimizer_step": step, "time/iteration_s": time.perf_counter() - t0})
    return _log(metrics, writer, out_dir, accelerator.is_main_process)


def _check(config: GRPOConfig, require_reward: bool = True) -> None:
    check_fields(config)  # each field's range (flowopd.train.config.FIELD_RULES), for configs built in code
    lo_hi = config.sde_window_range
    if config.sde_window_size and not (
        len(lo_hi) == 2 and lo_hi[0] + config.sde_window_size <= min(lo_hi[1], config.num_steps)
    ):
        raise ConfigError(f"sde_window_range must be [lo, hi] with lo + sde_window_size <= min(hi, num_steps = "
                          f"{config.num_steps}), got {lo_hi} (sde_window_size = {config.sde_window_size})")
    if config.sde_type == "cps":
        end = config.sde_window_range[1] if config.sde_window_size else int(config.num_steps * config.timestep_fraction)
        if end >= config.num_steps:
            raise ConfigError("sde_type = 'cps': the last step (to t = 0) is deterministic and has no log-prob; keep it "
                              "out of the trained steps (timestep_fraction < 1, or sde_window_range ending before num_steps)")
    if config.grad_cosine_every < 0 or config.grad_cosine_prompts < 1:
        raise ConfigError(f"need grad_cosine_every >= 0 and grad_cosine_prompts >= 1, got {config.grad_cosine_every}, "
                          f"{config.grad_cosine_prompts}")
    if require_reward and not config.reward.is_set():
        raise ConfigError("no reward: set reward.weights = {scorer = weight} or [reward.tasks.<task>]")


def _build_policy(config: GRPOConfig, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """Load the base policy frozen in the run's dtype and put a float32 LoRA adapter on its velocity network."""
    from flowopd.models.loading import load_policy

    policy = load_policy(config.model, device=device, dtype=_DTYPES[config.mixed_precision])
    return policy, prepare_policy(policy, config)


def prepare_policy(policy: Any, config: GRPOConfig) -> torch.nn.Module:
    """Freeze a loaded policy in the run's dtype (VAE in float32) and put the run's float32 LoRA adapter on its
    velocity network; returns the adapted network, already set back on the policy."""
    dtype = _DTYPES[config.mixed_precision]
    pipe = getattr(policy, "pipe", None)
    if hasattr(policy, "max_sequence_length"):  # SD3: T5 prompt length of rollouts and the training forward
        policy.max_sequence_length = config.max_sequence_length
    if pipe is not None:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        if pipe.vae.dtype != torch.float32:
            pipe.vae.to(torch.float32)  # decoding in float32, as Flow-GRPO keeps its VAE
    else:
        trainable_module(policy).to(dtype)
    from flowopd.models.loading import model_dir

    adapter = str(model_dir(config.lora_path)) if config.lora_path else None  # mini:NAME, a run or checkpoint
    model = add_lora(trainable_module(policy), config.lora_rank, config.lora_alpha, config.lora_target_modules,
                     config.lora_init, adapter_path=adapter, base_model=config.model)
    set_trainable_module(policy, model)
    return model


def _rollout(
    config: GRPOConfig,
    policy: Any,
    model: torch.nn.Module,
    plan: IterationPlan,
    local: np.ndarray,
    reward: Reward | None,
    executor: ThreadPoolExecutor | None,
) -> tuple[Trajectory, Conditioning, RewardOutput | None, dict[str, float]]:
    """Sample this process's share in batches; score each batch (in the background when asked; not at all
    without a reward). Rollouts with non-finite states stop the run (finite but diverged adapter weights)."""
    model.eval()
    with _unwrapped(policy, model):
        out = _sample_and_score(config, policy, plan, local, reward, executor)
    from accelerate.utils import reduce

    traj = out[0]
    bad = ~(torch.isfinite(traj.log_probs).all() & torch.isfinite(traj.latents).all())
    if reduce(bad.float().reshape(1), reduction="sum").item() > 0:  # every process stops, none waits in a gather
        largest = max(float(p.detach().abs().max()) for _, p in lora_parameters(model))
        raise divergence_error(f"the policy's rollouts hold non-finite values (largest |adapter weight| {largest:.3g})",
                               None, Path(config.output_dir))
    return out


def _sample_and_score(
    config: GRPOConfig,
    policy: Any,
    plan: IterationPlan,
    local: np.ndarray,
    reward: Reward | None,
    executor: ThreadPoolExecutor | None,
) -> tuple[Trajectory, Conditioning, RewardOutput | None, dict[str, float]]:
    parts, conds, futures = [], [], []
    t0 = time.perf_counter()
    b = config.sample_batch_size
    for start in range(0, len(local), b):
        ids = local[start : start + b]
        metas = [plan.metas[i] for i in ids]
        texts = [m["prompt"] for m in metas]
        cond = policy.encode_prompts(texts)
        noise = policy.initial_noise(plan.noise_seeds[ids].tolist(), config.resolution, config.resolution)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in plan.sde_seeds[ids]]
        traj = sample_sde_trajectory(policy, cond, noise, config.num_steps, config.guidance_scale,
                                     config.noise_level, plan.sde_steps, gens, config.log_prob_reduction,
                                     config.sde_type)
        # the scorer keeps the images; training does not (an empty tensor, not a view that pins their storage)
        images, traj.images = traj.images, traj.images.new_empty((0, *traj.images.shape[1:]))
        if reward is not None and executor is not None:
            futures.append(executor.submit(_score, reward, images, texts, metas))
        elif reward is not None:
            done: Future = Future()
            done.set_result(_score(reward, images, texts, metas))
            futures.append(done)
        parts.append(traj)
        conds.append(cond)
    t1 = time.perf_counter()
    outs = [f.result() for f in futures]
    t2 = time.perf_counter()
    rewards = None if reward is None else RewardOutput(
        total=np.concatenate([o.total for o in outs]),
        terms={k: np.concatenate([o.terms[k] for o in outs]) for k in reward.keys},
        tasks=[t for o in outs for t in o.tasks],
    )
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return concat_trajectories(parts), cond, rewards, {"sample": t1 - t0, "reward_wait": t2 - t1}


def _score(reward: Reward, images: torch.Tensor, prompts: list[str], metas: list[dict[str, Any]]) -> RewardOutput:
    with torch.no_grad():  # grad mode is per thread: a worker thread starts with it on
        return reward(images, prompts, metas)


def _reward_metrics(accelerator: Any, plan: IterationPlan, rewards: RewardOutput, keys: Sequence[str]) -> dict[str, Any]:
    """Gather every process's rewards; per-term and per-task means (NaN-aware) for the logs."""
    local = np.stack([rewards.total, *(rewards.terms[k] for k in keys)], axis=1)
    gathered = accelerator.gather(torch.as_tensor(local, dtype=torch.float64, device=accelerator.device))
    values = gathered.cpu().numpy()
    total = values[:, 0]
    metrics: dict[str, Any] = {"_total": total, "reward/total": _nanmean(total), "reward/std": _nanstd(total)}
    for j, key in enumerate(keys, start=1):
        metrics[f"reward/{key}"] = _nanmean(values[:, j])
    metrics.update(task_reward_metrics(total, [m["task"] for m in plan.metas]))
    groups = np.unique(plan.group_ids)
    zero_std = [np.nanstd(total[plan.group_ids == g]) == 0 for g in groups]
    metrics["train/zero_std_groups"] = float(np.mean(zero_std))
    return metrics


def _train_iteration(
    config: GRPOConfig,
    accelerator: Any,
    policy: Any,
    model: torch.nn.Module,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: Any,
    scheduler: Any,
    ema: EMA | None,
    traj: Trajectory,
    cond: Conditioning,
    adv: torch.Tensor,
    batches: list[np.ndarray],
    step: int,
) -> tuple[dict[str, float], int]:
    """The clipped surrogate (+ KL to the reference) over every trained step of every micro-batch."""
    model.train()
    positions = trained_positions(config.num_steps, len(traj.step_indices), config.timestep_fraction,
                                  config.sde_window_size > 0)
    params = [p for _, p in named]
    device = accelerator.device
    adv = adv.to(device)
    collected: dict[str, list[torch.Tensor]] = {}
    grad_norms, lrs = [], []
    for batch in batches:
        idx = torch.as_tensor(batch, dtype=torch.long, device=traj.states.device)
        cond_mb = index_cond(cond, idx)
        for j in positions:
            x, nxt = traj.states[idx, j], traj.next_states[idx, j]
            t, t_next = traj.times[j], traj.next_times[j]
            with accelerator.accumulate(model):
                new = step_log_prob(policy, x, t, t_next, nxt, cond_mb, config.guidance_scale, config.noise_level,
                                    config.sde_type, config.log_prob_reduction, config.cfg_detach_uncond)
                kl = None
                if config.beta > 0:
                    with torch.no_grad(), adapter_disabled(model):
                        ref = step_log_prob(policy, x, t, t_next, nxt, cond_mb, config.guidance_scale,
                                            config.noise_level, config.sde_type, config.log_prob_reduction)
                    kl = reference_kl(new.mean, ref.mean, new.sigma, reduction="none")
                loss, stats = grpo_loss(new.log_prob, traj.log_probs[idx, j], adv[idx], kl=kl, beta=config.beta,
                                        clip_range=config.clip_range, adv_clip=config.adv_clip_max)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norms.append(accelerator.clip_grad_norm_(params, config.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad()
            for k, v in stats.items():
                collected.setdefault(k, []).append(v.detach().float())
            if accelerator.sync_gradients:
                lrs.append(scheduler.get_last_lr()[0])
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(named, step)
    local = {k: torch.stack(v) for k, v in collected.items()}
    reduce = {"ratio_min": torch.min, "ratio_max": torch.max}
    out = {}
    for k, v in local.items():
        part = reduce[k](v) if k in reduce else v.mean()
        every = accelerator.gather(part.reshape(1).to(device))
        out[f"train/{k}"] = float(reduce[k](every) if k in reduce else every.mean())
    if grad_norms:
        out["train/grad_norm"] = float(torch.stack([torch.as_tensor(g, dtype=torch.float32) for g in grad_norms]).mean())
    if lrs:
        out["train/lr"] = float(lrs[-1])
    return out, step


def _gradient_probe(
    config: GRPOConfig,
    accelerator: Any,
    policy: Any,
    model: torch.nn.Module,
    named: Sequence[tuple[str, torch.nn.Parameter]],
    sampler: PromptSampler,
    reward: Reward,
    iteration: int,
    csv: GradientCosineCSV | None,
) -> dict[str, float]:
    """GRPO-Mix's task-gradient cosines (flowopd.train.diagnostics) on a probe batch, main process only: each
    task's loss is the clipped surrogate with its samples' group advantages (the KL term left out)."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        plan = plan_probe(config, sampler, iteration)
        model.eval()
        with _unwrapped(policy, model):
            traj, cond, rewards, _ = _sample_and_score(config, policy, plan, np.arange(len(plan.metas)), reward, None)
            adv = torch.as_tensor(compute_advantages(rewards.total, plan.group_ids, config.adv_clip_max,
                                                     config.advantage_std)[0])

            def task_loss(idx: torch.Tensor, j: int) -> torch.Tensor:
                new = step_log_prob(policy, traj.states[idx, j], traj.times[j], traj.next_times[j],
                                    traj.next_states[idx, j], index_cond(cond, idx), config.guidance_scale,
                                    config.noise_level, config.sde_type, config.log_prob_reduction,
                                    config.cfg_detach_uncond)
                return grpo_loss(new.log_prob, traj.log_probs[idx, j], adv[idx], beta=0.0,
                                 clip_range=config.clip_range, adv_clip=config.adv_clip_max)[0]

            positions = trained_positions(config.num_steps, len(traj.step_indices), config.timestep_fraction,
                                          config.sde_window_size > 0)
            grads = probe_task_gradients(task_loss, [m["task"] for m in plan.metas], positions,
                                         [p for _, p in named], config.sample_batch_size)
        metrics = grads.metrics()
        if csv is not None:
            csv.write(iteration, grads.cosines())
    accelerator.wait_for_everyone()
    return metrics


@contextlib.contextmanager
def _unwrapped(policy: Any, model: torch.nn.Module) -> Iterator[None]:
    """The policy with its network out of DDP: sampling needs no gradient sync, and evaluation runs on one
    process only (a DDP forward may broadcast buffers, which would wait for the other processes)."""
    set_trainable_module(policy, unwrap(model))
    try:
        yield
    finally:
        set_trainable_module(policy, model)


def _evaluate(
    config: GRPOConfig,
    policy: Any,
    model: torch.nn.Module,
    named: Sequence[tuple[str, Any]],
    ema: EMA | None,
    iteration: int,
    scorers: Mapping[str, Scorer] | None,
    accelerator: Any,
) -> dict[str, float]:
    """Every metric (``mean`` and per tag) of the evaluation benchmarks (flowopd.bench.evaluate), main process only."""
    from flowopd.bench.evaluate import evaluate

    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        t0 = time.perf_counter()
        model.eval()
        with _unwrapped(policy, model), ema.applied(named) if ema is not None else contextlib.nullcontext():
            results = evaluate(
                checkpoint=None, policy=policy, benchmarks=config.eval_benchmarks,
                out=Path(config.output_dir) / "eval" / f"iteration-{iteration:06d}", limit=config.eval_limit,
                batch_size=config.eval_batch_size, device=str(accelerator.device), scorers=scorers,
                progress=False, log=lambda _: None,
            )
        for name, record in results["benchmarks"].items():
            for metric, value in record["metrics"].items():
                metrics[f"eval/{name}/{metric}"] = float(value["value"])
        metrics["time/eval_s"] = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------- logging


def _writer(out_dir: Path, start: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - tensorboard is in the train and dev extras
        raise ImportError("tensorboard logging needs `pip install tensorboard` (or set tensorboard = false)") from e
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start + 1 if start else None)


def _log(metrics: dict[str, Any], writer: Any, out_dir: Path, main_process: bool) -> dict[str, float]:
    row = {k: float(v) for k, v in metrics.items()}
    if main_process:
        it = int(row.get("iteration", 0))
        if writer is not None:
            for k, v in row.items():
                if k != "iteration" and math.isfinite(v):
                    writer.add_scalar(k, v, it)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({k: (v if math.isfinite(v) else None) for k, v in row.items()}) + "\n")
    return row


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _nanstd(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std()) if x.size else math.nan


# ---------------------------------------------------------------- checkpoints


def _resume_dir(config: GRPOConfig, out_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start (GRPO, OPD and SFT alike): a corrupt newest
    checkpoint falls back to the previous one, the config may differ only in declared fields, metrics.jsonl is
    trimmed to the resumed iteration (:func:`flowopd.train.runs.prepare_resume`)."""
    return prepare_resume(config, out_dir, CHECKPOINT_FORMAT)


def save_checkpoint(
    path: Path,
    accelerator: Any,
    model: torch.nn.Module,
    named: Sequence[tuple[str, torch.Tensor]],
    optimizer: Any,
    scheduler: Any,
    ema: EMA | None,
    rng: np.random.Generator,
    counters: Mapping[str, int],
    config: GRPOConfig,
) -> Path:
    """Write the checkpoint into ``path`` atomically (a temporary directory renamed at the end)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    state = tmp / "state"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        state.mkdir(parents=True)
        with ema.applied(named) if ema is not None else contextlib.nullcontext():
            save_adapter(model, tmp / "adapter")
        save_file({n: p.detach().cpu().contiguous() for n, p in named}, str(state / "adapter_live.safetensors"))
        if ema is not None:
            save_file({n: t.cpu().contiguous() for n, t in ema.state_dict().items()}, str(state / "ema.safetensors"))
        torch.save(optimizer.state_dict(), state / "optimizer.pt")
        torch.save(scheduler.state_dict(), state / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), state / "scaler.pt")
        trainer = {"format": CHECKPOINT_FORMAT, **counters, "num_processes": accelerator.num_processes,
                   "sampler_rng": rng.bit_generator.state, "config": to_dict(config)}
        (state / "trainer.json").write_text(json.dumps(trainer, indent=1, default=str) + "\n")
    accelerator.wait_for_everyone()
    _save_rng(state, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(
    path: Path,
    accelerator: Any,
    named: Sequence[tuple[str, torch.nn.Parameter]],
    optimizer: Any,
    scheduler: Any,
    ema: EMA | None,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (iteration, optimizer step)."""
    from safetensors.torch import load_file

    state = path / "state"
    problem = checkpoint_problem(path, CHECKPOINT_FORMAT)
    if problem:
        raise CheckpointError(f"{path}: the checkpoint cannot be read: {problem}")
    trainer = json.loads((state / "trainer.json").read_text())
    live = load_file(str(state / "adapter_live.safetensors"))
    names = [n for n, _ in named]
    if sorted(live) != sorted(names):
        raise CheckpointError(f"{state / 'adapter_live.safetensors'}: adapter weights "
                              f"{sorted(set(live) ^ set(names))[:4]} do not match the model's adapter (different "
                              f"lora_rank/targets/model?)")
    with torch.no_grad():
        for n, p in named:
            p.copy_(live[n])
    if ema is not None:
        ema_file = state / "ema.safetensors"
        if not ema_file.is_file():
            raise CheckpointError(f"{ema_file} missing: the checkpoint was written with ema = false")
        ema.load_state_dict(load_file(str(ema_file)))
    optimizer.load_state_dict(torch.load(state / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(state / "scheduler.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (state / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(state / "scaler.pt", weights_only=True))
    watch_scaler(accelerator.scaler, int(trainer["optimizer_step"]))
    rng.bit_generator.state = trainer["sampler_rng"]
    if trainer.get("num_processes") != accelerator.num_processes:
        print(f"resume: checkpoint from {trainer.get('num_processes')} processes, running {accelerator.num_processes}: "
              "global RNG states restored from process 0", file=sys.stderr)
    rank = accelerator.process_index if (state / f"rng_{accelerator.process_index}.json").is_file() else 0
    _load_rng(state, rank)
    return int(trainer["iteration"]), int(trainer["optimizer_step"])


def _save_rng(state: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(state / f"rng_{rank}.safetensors"))
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    (state / f"rng_{rank}.json").write_text(json.dumps({
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }))


def _load_rng(state: Path, rank: int) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(state / f"rng_{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    saved = json.loads((state / f"rng_{rank}.json").read_text())
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = saved["python"]
    random.setstate((version, tuple(internal), gauss_next))
