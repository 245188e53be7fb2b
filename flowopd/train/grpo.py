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
5. log (tensorboard, ``metrics.jsonl``), checkpoint and evaluate every N iterations (the shared runtime,
   :mod:`flowopd.train.runtime`, which also writes the checkpoints that ``resume`` continues from exactly).

The rollouts and their rewards (:func:`rollout`, :func:`reward_metrics`) and the iteration's plan serve OPD too
(:mod:`flowopd.train.opd`).

Multi-GPU and multi-node through accelerate (``accelerate launch -m flowopd.train grpo CONFIG``; several CPU
processes: ``torchrun --nproc_per_node N -m flowopd.train grpo CONFIG``): every process draws the same
prompts and seeds (same generator), samples its share, and the rewards are gathered, so the run is the same
whatever the number of processes up to float summation order (a test checks 2 processes against 1). DDP is
the tested path; FSDP/DeepSpeed come from accelerate's config (the adapter, EMA and checkpoint code assume
the adapter parameters are not sharded).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowopd.models.policy import Conditioning, index_cond
from flowopd.rewards import Reward, RewardOutput
from flowopd.scorers.base import Scorer
from flowopd.train.config import (
    ConfigError,
    TrainConfig,
    check_fields,
    describe_fields,
    help_field,
    load_config,
)
from flowopd.train.diagnostics import GradientCosineCSV, probe_task_gradients, task_reward_metrics
from flowopd.train.lora import adapter_disabled, lora_parameters
from flowopd.train.losses import group_advantages, grpo_loss, reference_kl
from flowopd.train.monitor import ImageMonitor
from flowopd.train.prompts import PromptSampler
from flowopd.train.rollout import (
    Trajectory,
    concat_trajectories,
    sample_sde_trajectory,
    sde_window,
    step_log_prob,
    trained_positions,
)
from flowopd.train.runs import divergence_error
from flowopd.train.runtime import (
    Run,
    TrainResult,
    build_policy,
    build_reward,
    gather_stats,
    import_modules,
    make_accelerator,
    mean_grad_norm,
    torch_threads,
    unwrapped,
)


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


def plan_iteration(
    config: GRPOConfig, sampler: PromptSampler, rng: np.random.Generator, iteration: int
) -> IterationPlan:
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
) -> TrainResult:
    """Run the recipe. ``scorers`` (by scorer name) and ``eval_scorers`` (by benchmark) may be injected."""
    with torch_threads(config.threads):
        return _train(config, scorers, eval_scorers)


def batch_layout(config: GRPOConfig) -> tuple[int, int]:
    """``(samples per iteration over all processes, sampling batches per process)``: Flow-GRPO's layout, in which
    the sampling batches of an iteration are its micro-batches; a ConfigError when they do not split evenly."""
    from accelerate import PartialState

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
    return total, n_batches


def _train(
    config: GRPOConfig, scorers: Mapping[str, Scorer] | None, eval_scorers: Mapping[str, Scorer] | None
) -> TrainResult:
    import_modules(config.imports)
    check_config(config)
    n_train = len(trained_positions(config.num_steps, config.sde_window_size or config.num_steps,
                                    config.timestep_fraction, config.sde_window_size > 0))
    total, n_batches = batch_layout(config)
    accelerator = make_accelerator(config, n_batches // config.updates_per_iteration * n_train)
    sampler = PromptSampler(config.prompts, config.mix)  # fails on a missing prompt file before the model loads
    policy, model = build_policy(config, accelerator.device)
    run = Run.prepare(config, accelerator, policy, model, config.num_iterations * config.updates_per_iteration,
                      eval_scorers)
    reward = build_reward(config.reward, scorers, accelerator.device)
    run.begin()
    cosines = None
    if config.grad_cosine_every and run.is_main_process:
        cosines = GradientCosineCSV(run.out_dir / "grad_cosines.csv", run.start)

    bar = run.progress_bar("grpo")
    executor = ThreadPoolExecutor(config.reward_workers) if config.reward_workers > 0 else None
    try:
        for iteration in run.iterations():
            t0 = time.perf_counter()
            plan = plan_iteration(config, sampler, run.rng, iteration)
            probe = {}
            if config.grad_cosine_every and iteration % config.grad_cosine_every == 0:
                probe = _gradient_probe(run, sampler, reward, iteration, cosines)
            n_local = total // accelerator.num_processes
            local = np.arange(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
            traj, cond, rewards, timing = rollout(config, policy, run.model, plan, local, reward, executor)
            metrics = {**reward_metrics(accelerator, plan, rewards, reward.keys), **probe}
            total_r = metrics.pop("_total")
            adv, keep = compute_advantages(total_r, plan.group_ids, config.adv_clip_max, config.advantage_std)
            metrics["advantage/abs_mean"] = float(np.abs(adv[keep]).mean()) if keep.any() else 0.0
            metrics["train/kept_fraction"] = float(keep.mean())
            t1 = time.perf_counter()
            if keep.any():
                batches = micro_batches(keep[local], n_batches, np.random.default_rng([plan.shuffle_seed,
                                                                                          accelerator.process_index]))
                metrics.update(train_iteration(run, traj, cond, torch.as_tensor(adv[local]), batches))
            del traj, cond
            metrics.update({"time/sample_s": timing["sample"], "time/reward_wait_s": timing["reward_wait"],
                            "time/train_s": time.perf_counter() - t1})
            metrics.update({k: v for k, v in timing.items() if k.startswith("monitor/")})
            run.end_iteration(iteration, metrics, t0)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('reward/total', math.nan):.4f}")
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True)
        run.close()
    return run.finish()


def check_config(config: GRPOConfig, require_reward: bool = True) -> None:
    """Errors that name the key at fault, before anything loads (OPD adds its own checks)."""
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
            raise ConfigError(
                "sde_type = 'cps': the last step (to t = 0) is deterministic and has no log-prob; keep it "
                "out of the trained steps (timestep_fraction < 1, or sde_window_range ending before num_steps)"
            )
    if config.grad_cosine_every < 0 or config.grad_cosine_prompts < 1:
        raise ConfigError(f"need grad_cosine_every >= 0 and grad_cosine_prompts >= 1, got {config.grad_cosine_every}, "
                          f"{config.grad_cosine_prompts}")
    if require_reward and not config.reward.is_set():
        raise ConfigError("no reward: set reward.weights = {scorer = weight} or [reward.tasks.<task>]")


def rollout(
    config: GRPOConfig,
    policy: Any,
    model: torch.nn.Module,
    plan: IterationPlan,
    local: np.ndarray,
    reward: Reward | None,
    executor: ThreadPoolExecutor | None,
) -> tuple[Trajectory, Conditioning, RewardOutput | None, dict[str, float]]:
    """Sample this process's share in batches; score each batch (in the background when asked; not at all
    without a reward). Rollouts with non-finite states stop the run (finite but diverged adapter weights).
    The last value holds the timings and the reward-hacking monitor of every process's images
    (``monitor/*``, :mod:`flowopd.train.monitor`)."""
    model.eval()
    monitor = ImageMonitor(plan.group_ids)
    with unwrapped(policy, model):
        out = sample_and_score(config, policy, plan, local, reward, executor, monitor)
    from accelerate.utils import reduce

    out[3].update(monitor.metrics(lambda t: reduce(t, reduction="sum")))

    traj = out[0]
    bad = ~(torch.isfinite(traj.log_probs).all() & torch.isfinite(traj.latents).all())
    if reduce(bad.float().reshape(1), reduction="sum").item() > 0:  # every process stops, none waits in a gather
        largest = max(float(p.detach().abs().max()) for _, p in lora_parameters(model))
        raise divergence_error(f"the policy's rollouts hold non-finite values (largest |adapter weight| {largest:.3g})",
                               None, Path(config.output_dir))
    return out


def sample_and_score(
    config: GRPOConfig,
    policy: Any,
    plan: IterationPlan,
    local: np.ndarray,
    reward: Reward | None,
    executor: ThreadPoolExecutor | None,
    monitor: ImageMonitor | None = None,
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
        if monitor is not None:
            monitor.add(images, ids)
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


def reward_metrics(accelerator: Any, plan: IterationPlan, rewards: RewardOutput, keys: Sequence[str]) -> dict[str, Any]:
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


def train_iteration(
    run: Run, traj: Trajectory, cond: Conditioning, adv: torch.Tensor, batches: list[np.ndarray]
) -> dict[str, float]:
    """The clipped surrogate (+ KL to the reference) over every trained step of every micro-batch; advances
    ``run.step`` by the optimizer steps taken and returns the iteration's training metrics."""
    config, accelerator, policy, model = run.config, run.accelerator, run.policy, run.model
    optimizer, scheduler, ema, named, step = run.optimizer, run.scheduler, run.ema, run.named, run.step
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
    run.step = step
    out = {**gather_stats(accelerator, collected), **mean_grad_norm(grad_norms)}
    if lrs:
        out["train/lr"] = float(lrs[-1])
    return out


def _gradient_probe(
    run: Run, sampler: PromptSampler, reward: Reward, iteration: int, csv: GradientCosineCSV | None
) -> dict[str, float]:
    """GRPO-Mix's task-gradient cosines (flowopd.train.diagnostics) on a probe batch, main process only: each
    task's loss is the clipped surrogate with its samples' group advantages (the KL term left out)."""
    config, policy, model = run.config, run.policy, run.model
    metrics: dict[str, float] = {}
    if run.is_main_process:
        plan = plan_probe(config, sampler, iteration)
        model.eval()
        with unwrapped(policy, model):
            traj, cond, rewards, _ = sample_and_score(config, policy, plan, np.arange(len(plan.metas)), reward, None)
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
                                         [p for _, p in run.named], config.sample_batch_size)
        metrics = grads.metrics()
        if csv is not None:
            csv.write(iteration, grads.cosines())
    run.accelerator.wait_for_everyone()
    return metrics


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _nanstd(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std()) if x.size else math.nan
