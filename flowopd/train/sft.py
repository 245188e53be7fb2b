"""The SFT cold start of the student (METHOD.md s.2): ``python -m flowopd.train sft CONFIG.toml [key=value ...]``.

One iteration:

1. draw ``prompts_per_iteration`` prompts from the recipe's task-tagged sources (each process its share);
2. make the data, without gradient. ``data = "teachers"``: the teacher of each prompt's task (the OPD
   router; teachers are adapters on the student's own base network, :class:`flowopd.train.teachers.TeacherSet`)
   samples one image with the deterministic ODE sampler and CFG. ``data = "best_of_n"``: the base network
   (adapters disabled) samples ``best_of_n`` images per prompt and the task reward (flowopd.rewards) keeps
   the best;
3. train the LoRA student on those samples ``x0`` with the conditional flow-matching loss plus a strong L2
   pull toward the base velocity (the adapter disabled)::

       x_t = (1 - t) x0 + t eps,   v_target = eps - x0            (METHOD.md s.3 conventions)
       L = mean ||v_theta(x_t, t) - v_target||^2 + anchor_weight * mean ||v_theta(x_t, t) - v_base(x_t, t)||^2

   (means over the latent elements; ``t`` logit-normal as in SD3's training, or uniform); the velocity is
   the conditional one (``loss_guidance_scale = 1``) or the CFG velocity with the unconditional branch
   detached. ``epochs_per_iteration`` passes over the iteration's samples with fresh ``(t, eps)``, each in
   ``updates_per_iteration`` AdamW updates over micro-batches of ``train_batch_size``;
4. checkpoints with exact resume, tensorboard and ``metrics.jsonl``, periodic evaluation: the shared runtime
   (flowopd.train.runtime). The checkpoint's ``adapter/`` is the student's cold start for OPD (``lora_path``).

The paper gives no weight for the pull toward the base; ``anchor_weight = 1`` (as strong as the data term)
is our default.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowopd.models.policy import Conditioning, index_cond
from flowopd.rewards import Reward
from flowopd.scorers.base import Scorer
from flowopd.sde import ode_step, sde_step_with_logprob
from flowopd.train.config import ConfigError, TrainConfig, describe_fields, help_field, load_config
from flowopd.train.prompts import PromptSampler
from flowopd.train.rollout import guided_velocity
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
from flowopd.train.teachers import BASE_ANCHOR, TeacherSet, adapter_active


@dataclass
class SFTConfig(TrainConfig):
    """Cold-start SFT of the LoRA student: the shared fields (:class:`flowopd.train.config.TrainConfig`, ten with
    SFT defaults of their own) and SFT's. Sampling and LoRA defaults follow the published SD3.5-M settings
    (METHOD.md s.3: 512 px, CFG 4.5, 40 ODE steps for images, r 32 / alpha 64 on the attention projections,
    AdamW lr 1e-4 as OPD)."""

    # --- shared fields with SFT defaults
    output_dir: str = help_field("runs/sft", "Checkpoints, tensorboard logs, metrics.jsonl and evaluations.")
    guidance_scale: float = help_field(4.5, "CFG scale of the data samples (published 4.5).")
    prompts_per_iteration: int = help_field(32, "Samples (prompts) per iteration over all processes.")
    sample_batch_size: int = help_field(8, "Prompts per data-sampling batch per process.")
    mix: str = help_field("prompt", "'prompt': each prompt picks a source by weight; 'iteration': sources "
                          "alternate.")
    num_iterations: int = help_field(500, "Iterations to run.")
    updates_per_iteration: int = help_field(1, "Optimizer steps per pass over the iteration's samples.")
    learning_rate: float = help_field(1e-4, "AdamW learning rate.")
    ema: bool = help_field(False, "EMA of the adapter (checkpoints and evaluation then use it).")
    save_every: int = help_field(50, "Checkpoint every N iterations, and at the end.")
    eval_every: int = help_field(50, "Evaluate every N iterations, before the first and at the end; 0 = never.")
    # --- data
    data: str = help_field("teachers", "'teachers': each prompt's task teacher samples it; 'best_of_n': the best "
                           "of best_of_n base samples by the task reward.")
    teachers: dict[str, str] = help_field({}, "data = 'teachers': task -> teacher adapter on the same base as "
                                          "`model`.")
    best_of_n: int = help_field(4, "data = 'best_of_n': base samples per prompt, of which the best is kept.")
    sample_steps: int = help_field(40, "ODE steps of the data samples (published evaluation setting 40).")
    # --- optimisation
    train_batch_size: int = help_field(8, "Samples per training micro-batch per process.")
    epochs_per_iteration: int = help_field(1, "Passes over the iteration's samples, each with fresh (t, eps).")
    anchor_weight: float = help_field(1.0, "Weight of the L2 pull ||v_theta - v_base||^2 toward the base velocity "
                                      "(the paper's 'strong' pull; no published value).")
    time_sampling: str = help_field("logit_normal", "Flow-matching times: 'logit_normal' (SD3's training, "
                                    "t = sigmoid(N(logit_mean, logit_std))) or 'uniform'.")
    logit_mean: float = help_field(0.0, "Mean of the logit-normal times (SD3: 0).")
    logit_std: float = help_field(1.0, "Std of the logit-normal times (SD3: 1).")
    time_shift: float = help_field(1.0, "Shift of the sampled times, t = shift s / (1 + (shift - 1) s) (the public "
                                   "SFT draws its times from the SD3.5 scheduler: shift 3; 1 = none).")
    time_grid: int = help_field(0, "0: continuous times; N: s = 1 - floor(N u) / N before the shift, the public "
                                "SFT's index into the scheduler's 1000 training timesteps (1000).")
    data_noise_level: float = help_field(0.0, "data = 'best_of_n': 0 samples with the ODE; a > 0 with the Flow-GRPO "
                                         "SDE at noise level a (the public SFT: 0.7).")
    loss_guidance_scale: float = help_field(1.0, "1: regress the conditional velocity (standard flow matching); "
                                            "> 1: the CFG velocity at this scale, unconditional branch detached.")


@dataclass
class SFTPlan:
    """Everything random about one iteration, drawn identically by every process from the shared generator."""

    metas: list[dict[str, Any]]  # (P,) one per prompt
    data_seeds: np.ndarray  # (P, n) seeds of the data samples' starting noise (n = best_of_n or 1)
    eps_seeds: np.ndarray  # (epochs, P) seeds of the flow-matching noise
    times: np.ndarray  # (epochs, P) flow-matching times
    shuffle_seed: int


def sample_times(rng: np.random.Generator, shape: tuple[int, ...], kind: str, mean: float = 0.0,
                 std: float = 1.0, shift: float = 1.0, grid: int = 0) -> np.ndarray:
    """Flow-matching times in (0, 1]: ``u`` logit-normal ``sigmoid(N(mean, std))`` (SD3) or uniform, then
    optionally put on a grid of ``grid`` training timesteps, ``s = 1 - floor(grid u) / grid``, and shifted,
    ``t = shift s / (1 + (shift - 1) s)`` - with ``grid = 1000`` and ``shift = 3`` the public SFT's draw (its
    index into the SD3.5 scheduler's shifted training sigmas)."""
    if kind == "logit_normal":
        u = 1.0 / (1.0 + np.exp(-rng.normal(mean, std, size=shape)))
    elif kind == "uniform":
        u = rng.uniform(0.0, 1.0, size=shape)
    else:
        raise ConfigError(f"time_sampling must be 'logit_normal' or 'uniform', got {kind!r}")
    if grid:
        u = 1.0 - np.floor(grid * u) / grid
    if shift != 1.0:
        u = shift * u / (1.0 + (shift - 1.0) * u)
    return u


def plan_sft(config: SFTConfig, sampler: PromptSampler, rng: np.random.Generator, iteration: int) -> SFTPlan:
    p, e = config.prompts_per_iteration, config.epochs_per_iteration
    n = config.best_of_n if config.data == "best_of_n" else 1
    return SFTPlan(
        metas=sampler.draw(rng, iteration, p),
        data_seeds=rng.integers(0, 2**31 - 1, size=(p, n)),
        eps_seeds=rng.integers(0, 2**31 - 1, size=(e, p)),
        times=sample_times(rng, (e, p), config.time_sampling, config.logit_mean, config.logit_std, config.time_shift,
                           config.time_grid),
        shuffle_seed=int(rng.integers(0, 2**31 - 1)),
    )


@torch.no_grad()
def ode_latents(
    policy: Any, cond: Conditioning, noise: torch.Tensor, num_steps: int, guidance_scale: float
) -> torch.Tensor:
    """Deterministic Euler sampling from ``noise`` (t = 1) to t = 0; the final latents in float32."""
    times = policy.timesteps(num_steps)
    x = noise.to(policy.device, torch.float32)
    for i in range(num_steps):
        v = policy.velocity(x, times[i].expand(x.shape[0]).to(x.device), cond, guidance_scale)
        x = ode_step(x, v.float(), times[i], times[i + 1])
    return x


@torch.no_grad()
def sde_latents(policy: Any, cond: Conditioning, noise: torch.Tensor, num_steps: int, guidance_scale: float,
                noise_level: float, seeds: Sequence[int]) -> torch.Tensor:
    """Flow-GRPO's SDE sampling from ``noise`` to t = 0 (every step stochastic, one generator per sample seeded
    by ``seeds``, so a sample does not depend on its batch); the final latents in float32."""
    times = policy.timesteps(num_steps)
    x = noise.to(policy.device, torch.float32)
    gens = [torch.Generator(device=x.device).manual_seed(int(s)) for s in seeds]
    for i in range(num_steps):
        v = policy.velocity(x, times[i].expand(x.shape[0]).to(x.device), cond, guidance_scale)
        x = sde_step_with_logprob(x, v.float(), times[i], times[i + 1], noise_level, generator=gens).sample.float()
    return x


def sft_loss(
    policy: Any,
    model: torch.nn.Module,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    anchor_weight: float,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-matching loss on ``x0`` plus ``anchor_weight`` times the L2 distance to the base velocity.

    ``t``: (N,) times; the base velocity (adapters disabled) is computed first, without gradient.
    """
    tt = t.to(x0.device, torch.float32).reshape(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - tt) * x0 + tt * eps
    target = eps - x0
    with torch.no_grad(), adapter_active(model, None):
        v_base = guided_velocity(policy, x_t, t.to(x0.device), cond, guidance_scale).float()
    v = guided_velocity(policy, x_t, t.to(x0.device), cond, guidance_scale, detach_uncond=True).float()
    fm = ((v - target) ** 2).mean()
    pull = ((v - v_base) ** 2).mean()
    loss = fm + anchor_weight * pull
    return loss, {"fm_loss": fm.detach(), "anchor_l2": pull.detach(), "loss": loss.detach()}


def main(argv: Sequence[str] | None = None) -> int:
    """``sft CONFIG [key=value ...]`` (the arguments after the subcommand)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        print("usage: python -m flowopd.train sft CONFIG.toml [key=value ...]\n\n" + describe_fields(SFTConfig))
        return 0 if args and args[0] in ("-h", "--help") else 2
    result = train(load_config(SFTConfig, args[0], args[1:]))
    from accelerate import PartialState

    if PartialState().is_main_process:
        last = result.checkpoints[-1] if result.checkpoints else None
        print(f"done: iteration {result.iteration}, {result.optimizer_step} optimizer steps; last checkpoint {last}")
    return 0


def train(config: SFTConfig, scorers: Mapping[str, Scorer] | None = None,
          eval_scorers: Mapping[str, Scorer] | None = None) -> TrainResult:
    """Run the recipe. ``scorers`` (by scorer name) and ``eval_scorers`` (by benchmark) may be injected."""
    with torch_threads(config.threads):
        return _train(config, scorers, eval_scorers)


def check_config(config: SFTConfig, world: int) -> tuple[int, int]:
    """Errors that name the key at fault; returns (micro-batches per pass, micro-batches per update)."""
    if config.data not in ("teachers", "best_of_n"):
        raise ConfigError(f"data must be 'teachers' or 'best_of_n', got {config.data!r}")
    if config.data == "teachers":
        missing = sorted({s.task for s in config.prompts} - set(config.teachers))
        if not config.teachers or missing:
            raise ConfigError(
                f"data = 'teachers': prompt sources of tasks {missing or sorted({s.task for s in config.prompts})} "
                f"have no teacher; add teachers.<task> = ADAPTER_DIR"
            )
    elif not config.reward.is_set() or config.best_of_n < 2:
        raise ConfigError("data = 'best_of_n' needs reward.weights or reward.tasks and best_of_n >= 2")
    for name in ("prompts_per_iteration", "sample_batch_size", "train_batch_size", "updates_per_iteration",
                 "epochs_per_iteration", "num_iterations", "save_every", "sample_steps"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.anchor_weight < 0:
        raise ConfigError(f"anchor_weight must be >= 0, got {config.anchor_weight}")
    if not (math.isfinite(config.time_shift) and config.time_shift > 0):
        raise ConfigError(f"time_shift must be a finite number > 0, got {config.time_shift}")
    if config.time_grid < 0:
        raise ConfigError(f"time_grid must be 0 (continuous) or a number of timesteps >= 1, got {config.time_grid}")
    if not (math.isfinite(config.data_noise_level) and config.data_noise_level >= 0):
        raise ConfigError(f"data_noise_level must be a finite number >= 0, got {config.data_noise_level}")
    if config.prompts_per_iteration % (world * config.train_batch_size):
        raise ConfigError(f"prompts_per_iteration = {config.prompts_per_iteration} must split into {world} processes "
                          f"x micro-batches of train_batch_size = {config.train_batch_size}")
    n_micro = config.prompts_per_iteration // (world * config.train_batch_size)
    if n_micro % config.updates_per_iteration:
        raise ConfigError(f"{n_micro} micro-batches per process do not split into updates_per_iteration = "
                          f"{config.updates_per_iteration} equal updates")
    return n_micro, n_micro // config.updates_per_iteration


def _train(config: SFTConfig, scorers: Mapping[str, Scorer] | None,
           eval_scorers: Mapping[str, Scorer] | None) -> TrainResult:
    from accelerate import PartialState

    import_modules(config.imports)
    world = PartialState(cpu=config.cpu).num_processes
    n_micro, accumulation = check_config(config, world)
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {config.mixed_precision!r}")
    accelerator = make_accelerator(config, accumulation)
    sampler = PromptSampler(config.prompts, config.mix)
    policy, model = build_policy(config, accelerator.device)
    teachers = TeacherSet(model, config.teachers, BASE_ANCHOR, config.model) if config.data == "teachers" else None
    steps_per_iteration = config.epochs_per_iteration * config.updates_per_iteration
    run = Run.prepare(config, accelerator, policy, model, config.num_iterations * steps_per_iteration, eval_scorers)
    reward = build_reward(config.reward, scorers, accelerator.device) if config.data == "best_of_n" else None
    run.begin()

    bar = run.progress_bar("sft")
    n_local = config.prompts_per_iteration // world
    try:
        for iteration in run.iterations():
            t0 = time.perf_counter()
            plan = plan_sft(config, sampler, run.rng, iteration)
            local = np.arange(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
            run.model.eval()
            with unwrapped(policy, run.model):
                x0, cond, metrics = _make_data(config, policy, run.model, teachers, reward, plan, local)
            metrics.update(_gather_means(accelerator, metrics))
            t1 = time.perf_counter()
            metrics.update(_train_iteration(run, x0, cond, plan, local, n_micro))
            metrics.update({"time/data_s": t1 - t0, "time/train_s": time.perf_counter() - t1})
            run.end_iteration(iteration, metrics, t0)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('train/loss', math.nan):.4g}")
    finally:
        bar.close()
        run.close()
    return run.finish()


def _make_data(
    config: SFTConfig,
    policy: Any,
    model: torch.nn.Module,
    teachers: TeacherSet | None,
    reward: Reward | None,
    plan: SFTPlan,
    local: np.ndarray,
) -> tuple[torch.Tensor, Conditioning, dict[str, float]]:
    """This process's training samples ``x0`` (float32 latents) and their conditioning, batch by batch."""
    parts, conds, rewards_best, rewards_all = [], [], [], []
    b = config.sample_batch_size
    for s in range(0, len(local), b):
        ids = local[s : s + b]
        metas = [plan.metas[i] for i in ids]
        cond = policy.encode_prompts([m["prompt"] for m in metas])
        if teachers is not None:
            x0 = None
            for name, idx in teachers.routes(metas).items():
                i = idx.to(policy.device)
                noise = policy.initial_noise(plan.data_seeds[ids[idx.numpy()], 0].tolist(), config.resolution,
                                             config.resolution)
                with adapter_active(model, name):
                    part = ode_latents(policy, index_cond(cond, i), noise, config.sample_steps, config.guidance_scale)
                if x0 is None:
                    x0 = torch.empty((len(ids), *part.shape[1:]), dtype=part.dtype, device=part.device)
                x0[i] = part
        else:
            x0, best, mean = _best_of_n(config, policy, model, reward, cond, metas, plan.data_seeds[ids])
            rewards_best.append(best)
            rewards_all.append(mean)
        parts.append(x0)
        conds.append(cond)
    metrics = {}
    if rewards_best:
        metrics = {"data/reward_best": float(np.nanmean(np.concatenate(rewards_best))),
                   "data/reward_mean": float(np.nanmean(np.concatenate(rewards_all)))}
    return torch.cat(parts), {k: torch.cat([c[k] for c in conds]) for k in conds[0]}, metrics


def _best_of_n(
    config: SFTConfig,
    policy: Any,
    model: torch.nn.Module,
    reward: Reward,
    cond: Conditioning,
    metas: Sequence[Mapping[str, Any]],
    seeds: np.ndarray,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The base's best of ``n`` samples per prompt by the task reward: (latents, best rewards, mean rewards)."""
    n = seeds.shape[1]
    repeat = torch.arange(len(metas), device=policy.device).repeat_interleave(n)
    noise = policy.initial_noise(seeds.reshape(-1).tolist(), config.resolution, config.resolution)
    with adapter_active(model, None):
        if config.data_noise_level > 0:
            latents = sde_latents(policy, index_cond(cond, repeat), noise, config.sample_steps, config.guidance_scale,
                                  config.data_noise_level, (seeds.reshape(-1) + 1).tolist())
        else:
            latents = ode_latents(policy, index_cond(cond, repeat), noise, config.sample_steps,
                                  config.guidance_scale)
    images = policy.decode(latents).float().clamp(0, 1)
    metas_n = [m for m in metas for _ in range(n)]
    with torch.no_grad():
        total = reward(images, [m["prompt"] for m in metas_n], metas_n).total.reshape(len(metas), n)
    score = np.where(np.isfinite(total), total, -np.inf)
    best = score.argmax(axis=1)  # the first sample where no reward is finite
    pick = torch.as_tensor(np.arange(len(metas)) * n + best, device=latents.device)
    return latents[pick], total[np.arange(len(metas)), best], np.nanmean(np.where(np.isfinite(total), total, np.nan), 1)


def _gather_means(accelerator: Any, metrics: Mapping[str, float]) -> dict[str, float]:
    """Process means of the data metrics (every process has the same keys)."""
    if not metrics or accelerator.num_processes == 1:
        return dict(metrics)
    keys = sorted(metrics)
    local = torch.as_tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local.unsqueeze(0)).cpu()
    return {k: float(every[:, i].nanmean()) for i, k in enumerate(keys)}


def _train_iteration(
    run: Run, x0: torch.Tensor, cond: Conditioning, plan: SFTPlan, local: np.ndarray, n_micro: int
) -> dict[str, float]:
    """``epochs_per_iteration`` passes of flow matching + pull over the samples, in shuffled micro-batches
    (advancing ``run.step``)."""
    config, accelerator, policy, model = run.config, run.accelerator, run.policy, run.model
    optimizer, scheduler, ema, named, step = run.optimizer, run.scheduler, run.ema, run.named, run.step
    model.train()
    params = [p for _, p in named]
    collected: dict[str, list[torch.Tensor]] = {}
    grad_norms = []
    shuffle = np.random.default_rng([plan.shuffle_seed, accelerator.process_index])
    for epoch in range(config.epochs_per_iteration):
        with unwrapped(policy, model):  # SD3's initial_noise reads the transformer's config, which DDP hides
            eps = policy.initial_noise(plan.eps_seeds[epoch, local].tolist(), config.resolution,
                                       config.resolution).float()
        times = torch.as_tensor(plan.times[epoch, local], dtype=torch.float32)
        for batch in np.split(shuffle.permutation(len(local)), n_micro):
            idx = torch.as_tensor(batch, dtype=torch.long, device=x0.device)
            with accelerator.accumulate(model):
                loss, stats = sft_loss(policy, model, x0[idx], eps[idx], times[batch], index_cond(cond, idx),
                                       config.anchor_weight, config.loss_guidance_scale)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norms.append(accelerator.clip_grad_norm_(params, config.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad()
            for k, v in stats.items():
                collected.setdefault(k, []).append(v.float())
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(named, step)
    run.step = step
    out = {**gather_stats(accelerator, collected), **mean_grad_norm(grad_norms)}
    out["train/lr"] = float(scheduler.get_last_lr()[0])
    return out

