"""Flow-OPD: multi-teacher on-policy distillation with task routing and MAR (METHOD.md s.2-3).

``python -m flowopd.train opd CONFIG.toml [key=value ...]`` (``accelerate launch -m flowopd.train opd ...``).

One iteration, on the GRPO loop's machinery (flowopd.train.grpo: rollouts, micro-batches) and the shared
runtime (flowopd.train.prompts: prompt sampling; flowopd.train.runtime: checkpoints with exact resume, logging,
evaluation):

1. draw prompts from the recipe's task-tagged sources and repeat each ``group_size`` times. ``mix = "prompt"``
   (default) mixes the tasks in every iteration and routes per sample; ``mix = "iteration"`` alternates whole
   iterations between the tasks, as the public code alternates epochs between its task datasets;
2. the student samples G SDE trajectories per prompt, recording the trained steps (with a reward configured,
   the images are scored too: per-task reward curves, and the task advantage of mode ``"mixed"``);
3. at every trained step of every sample the router (:func:`flowopd.train.teachers.route_to_teacher`) picks
   the teacher of the sample's task (``metadata["task"]``); the teacher's guided velocity at the *student's*
   state (same CFG, no gradient) gives its kernel mean, and ``KL_t = KL(student step || teacher step)``
   (:func:`step_kl`, ``= w(t) |dt| ||v_student - v_teacher||^2`` summed over the latent, METHOD.md s.3);
4. the loss is :func:`flowopd.train.losses.opd_loss`: the clipped surrogate with the dense advantage
   ``A_t = clip(-KL_t, +-5)`` (``pathwise``, the default: attached, the public code; ``kl_only``: detached,
   the paper's literal form, an ablation; ``gkd``: mean KL_t, no ratio; ``mixed``: task GRPO advantage - KL_t),
   optionally with the sampled log-ratio as the local term (``kl_estimator = "sample"``) and the return-to-go of
   the later steps (``kl_advantage = "to_go"``), plus MAR, ``mar_weight * KL(student || anchor)`` on every
   sample;
5. AdamW updates with grad-norm clipping, EMA of the adapter, checkpoints, evaluation and logs as in GRPO.

**The detached step advantage has a zero-mean gradient** (METHOD.md s.3, corrected). ``KL_t`` depends on
the state ``x_t`` only, while the step's action is ``x_{t+1}``, and ``E[grad log pi(x_{t+1} | x_t)] = 0``
under the sampling policy. With the advantage ``-KL_t`` detached (``kl_only`` + ``step``) the surrogate's
expected gradient is therefore zero at the first update of every batch: in expectation the student is moved by
MAR alone. It stays available as an ablation, and start-up warns about it. The gradient of
``E[sum_t KL_t]`` has a local and a future part; the estimators (tested on a Gaussian policy in
tests/test_opd_estimators.py):

- ``pathwise`` (default, the public code): the attached ``grad KL_t`` through the student's mean (local);
- ``kl_estimator = "sample"``: the detached log-ratio ``log pi_S(x_{t+1}|x_t) - log pi_T(x_{t+1}|x_t)`` of the
  sampled transition (:func:`sampled_step_kl`) - its score-function gradient is an unbiased local part;
- ``kl_advantage = "to_go"``: adds the return-to-go ``sum_{s > t} KL_s`` of the sampled trajectory
  (:func:`future_kl`), the future part. ``pathwise`` + ``to_go`` and ``sample`` + ``to_go`` are the complete
  estimators.

With ``log_prob_reduction = "mean"`` (Flow-GRPO's per-element log-prob) every score-function term is the
summed one divided by the number of latent elements D, while the pathwise term is not: the local ``sample``
gradient is then ``1/D`` of the ``pathwise`` one at the same ``kl_scale``.

Teachers and anchor are LoRA adapters on the student's own base network (:mod:`flowopd.train.teachers`,
which also counts the memory that saves against the public code's full copies).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowopd.models.policy import Conditioning, index_cond
from flowopd.rewards import Reward
from flowopd.scorers.base import Scorer
from flowopd.sde import StepOutput, kernel_kl, kernel_log_ratio
from flowopd.train.config import ConfigError, describe_fields, help_field, load_config
from flowopd.train.diagnostics import GradientCosineCSV, probe_task_gradients
from flowopd.train.grpo import (
    GRPOConfig,
    batch_layout,
    compute_advantages,
    micro_batches,
    plan_iteration,
    plan_probe,
    reward_metrics,
    rollout,
    sample_and_score,
)
from flowopd.train.grpo import check_config as check_grpo_config
from flowopd.train.losses import Stats, opd_loss, reference_kl, zero_mean_kl_gradient
from flowopd.train.prompts import PromptSampler
from flowopd.train.rollout import Trajectory, step_log_prob, trained_positions
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
from flowopd.train.teachers import BASE_ANCHOR, TeacherSet, shared_base_memory

OPD_MODES = ("kl_only", "pathwise", "gkd", "mixed")
KL_ESTIMATORS = ("analytic", "sample")
KL_SCALES = ("mean", "sum", "public")

logger = logging.getLogger(__name__)


@dataclass
class OPDConfig(GRPOConfig):
    """Flow-OPD. Every GRPOConfig field applies (model, LoRA, sampling, optimisation, checkpoints, logging);
    the defaults below are the public multi-teacher settings (Flow-OPD ``config/grpo.py`` ``mix_opd_8gpu``:
    16 prompts x 16 images per epoch, lr 1e-4, clip 1e-4, advantages clipped to +-5, KL weight 0.04 to the
    base, EMA) and METHOD.md s.3. The student starts from ``lora_path`` (the cold start: a merged adapter or
    the SFT adapter) or, without it, from a fresh adapter (B = 0, i.e. the base)."""

    output_dir: str = help_field("runs/opd", "Checkpoints, tensorboard logs, metrics.jsonl and evaluations.")
    group_size: int = help_field(16, "Student rollouts per prompt G (published 16 for OPD).")
    prompts_per_iteration: int = help_field(16, "Distinct prompts per iteration (public mix_opd_8gpu: 16 x 16 = 256 "
                                             "images per epoch on 8 GPUs).")
    sample_batch_size: int = help_field(4, "Images per sampling batch per process (public OPD: 4).")
    learning_rate: float = help_field(1e-4, "AdamW learning rate (published 1e-4 for OPD).")
    mix: str = help_field("prompt", "'prompt': every iteration mixes the tasks, each sample routed to its teacher "
                           "(the paper's one-hot routing, our default); 'iteration': whole iterations alternate "
                           "between the tasks by integer weights (the public code's per-epoch alternation).")
    beta: float = help_field(0.0, "Unused by OPD (must stay 0): its regulariser is MAR, see mar_weight and anchor.")
    teachers: dict[str, str] = help_field({}, "Task -> teacher adapter (peft directory or mini:NAME) on the same base "
                                           "as `model`; every prompt source's task needs one.")
    anchor: str = help_field(BASE_ANCHOR, "MAR's frozen anchor: 'base' (the base network, adapters disabled; the "
                              "public default) or an adapter directory / mini:NAME.")
    mar_weight: float = help_field(0.04, "MAR weight lambda of KL(student || anchor) on every sample (public beta "
                                    "0.04); 0 = no MAR.")
    mode: str = help_field("pathwise", "'pathwise' (the public code: A_t = -KL_t attached, its gradient through the "
                            "student's mean; with kl_scale = 'public' for parity), 'kl_only' (A_t detached: with "
                            "kl_estimator 'analytic' and kl_advantage 'step' its expected gradient is zero - an "
                            "ablation, warned at start-up), 'gkd' (loss = mean KL_t, no ratio), 'mixed' (task GRPO "
                            "advantage - KL_t; needs a reward).")
    kl_estimator: str = help_field("analytic", "Local KL term of the advantage: 'analytic' (KL_t from the two kernel "
                                    "means) or 'sample' (the detached log-ratio log pi_student - log pi_teacher of the "
                                    "sampled transition, scaled as kl_scale: its mean is KL_t and its score-function "
                                    "gradient an unbiased local grad KL_t; with mode 'kl_only' or 'mixed').")
    kl_grad: str = help_field("detached", "Mode 'mixed' only: 'detached' or 'pathwise' KL part of the advantage.")
    kl_scale: str = help_field("public", "Scale of KL_t: 'mean' (exact kernel KL per latent element, the scale of the "
                                "per-element log-prob; advantages rarely reach the +-5 clip), 'sum' (exact kernel KL, "
                                "summed), 'public' (the public code: per element, over 2 sigma_t^2, = 'mean' x |dt|).")
    mar_scale: str = help_field("public", "Scale of MAR's KL, as kl_scale; 'public' is the scale its weight 0.04 "
                                 "was tuned at (Flow-GRPO's KL loss).")
    kl_advantage: str = help_field("step", "'step': A_t = -KL_t (local term only); 'to_go': A_t = -(KL_t + sum of "
                                    "the later recorded steps' KL), adding the return-to-go of the dense reward, the "
                                    "future part of the gradient (a step's own KL_t does not depend on its action). "
                                    "Costs one more teacher pass over the recorded steps.")


def step_kl(student: StepOutput, other_mean: torch.Tensor, scale: str = "mean") -> torch.Tensor:
    """Per-sample KL(student step || other step) from the two kernel means (same state, same std), METHOD.md s.3.

    ``"sum"``: the exact kernel KL ``||m_s - m_o||^2 / (2 std^2)``, which for the SDE step is
    ``w(t) |dt| ||v_s - v_o||^2``; ``"mean"``: the same per latent element (divided by D); ``"public"``:
    the public code's ``mean((m_s - m_o)^2) / (2 sigma_t^2)`` (``"mean"`` times ``|dt|``). Gradients reach
    it through ``student.mean``.
    """
    return kernel_step_kl(student.mean, other_mean, student.std, student.sigma, scale)


def kernel_step_kl(mean: torch.Tensor, other_mean: torch.Tensor, std: torch.Tensor, sigma: torch.Tensor,
                   scale: str = "mean") -> torch.Tensor:
    """:func:`step_kl` from the kernel's parts: ``std`` the kernel std, ``sigma`` the SDE's ``sigma_t``."""
    if scale in ("mean", "sum"):
        return kernel_kl(mean, other_mean, std, scale)
    if scale == "public":
        return reference_kl(mean, other_mean, sigma, reduction="none")
    raise ValueError(f"step_kl: scale must be one of {KL_SCALES}, got {scale!r}")


def sampled_step_kl(next_x: torch.Tensor, mean: torch.Tensor, other_mean: torch.Tensor, std: torch.Tensor,
                    sigma: torch.Tensor, scale: str = "public") -> torch.Tensor:
    """The sampled transition's ``log pi(x_next | x_t) - log pi_other(x_next | x_t)`` at the scale of
    :func:`kernel_step_kl`: its mean under ``x_next ~ pi`` is ``kernel_step_kl(mean, other_mean, ...)``.

    ``"sum"``: the exact log-ratio; ``"mean"``: divided by the number of elements D; ``"public"``: per element
    over ``2 sigma_t^2`` instead of ``2 std^2`` (``"mean"`` times ``|dt|``), as the public KL.
    """
    if scale in ("mean", "sum"):
        return kernel_log_ratio(next_x, mean, other_mean, std, scale)
    if scale == "public":
        return kernel_log_ratio(next_x, mean, other_mean, sigma, "mean")
    raise ValueError(f"sampled_step_kl: scale must be one of {KL_SCALES}, got {scale!r}")


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


@torch.no_grad()
def future_kl(
    config: OPDConfig,
    policy: Any,
    model: torch.nn.Module,
    teachers: TeacherSet,
    traj: Trajectory,
    cond: Conditioning,
    metas: Sequence[Mapping[str, Any]],
) -> torch.Tensor:
    """``(N, S)``: for each recorded step j, the sum of ``KL_s`` over the later recorded steps ``s > j`` of the
    sampled trajectories (the sampling student's recorded kernel means against the routed teachers').

    ``kl_advantage = "to_go"`` adds it to the step's own ``KL_t``: the return-to-go of the dense reward
    ``-KL``. Action j draws ``x_{j+1}``, which changes the later KLs but not ``KL_j`` (a function of ``x_j``).
    """
    n, steps = traj.log_probs.shape
    kl = torch.zeros(n, steps, dtype=torch.float32)
    for start in range(0, n, config.sample_batch_size):
        ids = torch.arange(start, min(n, start + config.sample_batch_size))
        routes = teachers.routes([metas[i] for i in ids.tolist()])
        cond_b = index_cond(cond, ids.to(traj.states.device))
        for j in range(steps):
            t, t_next = traj.times[j], traj.next_times[j]
            teacher = teachers.teacher_means(config, policy, model, routes, traj.states[ids, j], t, t_next,
                                             traj.next_states[ids, j], cond_b)
            std = traj.stds[ids, j].reshape(-1, *([1] * (teacher.ndim - 1))).to(teacher)
            sigma = std / torch.sqrt(t - t_next).to(std) if config.sde_type == "sde" else std
            kl[ids, j] = (
                kernel_step_kl(traj.means[ids, j].to(teacher), teacher, std, sigma, config.kl_scale).cpu().float()
            )
    later = kl.flip(1).cumsum(1).flip(1) - kl  # sum over s > j
    return later


def opd_step_loss(
    config: OPDConfig,
    policy: Any,
    model: torch.nn.Module,
    teachers: TeacherSet,
    routes: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    next_x: torch.Tensor,
    cond: Conditioning,
    log_prob_old: torch.Tensor,
    task_advantages: torch.Tensor | None = None,
    mar: bool = True,
    later_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats, torch.Tensor]:
    """OPD loss of one trained step on a micro-batch: ``(loss, stats, KL_t detached per sample)``.

    The teachers' and the anchor's kernels come first, without gradient (switching adapters changes which
    parameters require gradients, so no student graph may be alive meanwhile), then the student's with it.
    ``mar=False`` leaves MAR out (the gradient-cosine probe). ``later_kl`` (from :func:`future_kl`) makes the
    advantage the return-to-go ``-(local + later_kl)``; the local term is ``KL_t`` or, with ``kl_estimator =
    "sample"``, the sampled transition's log-ratio against the teacher (under the current student's mean,
    which is the sampling one at the first update of a batch).
    """
    if later_kl is not None and config.mode == "gkd":
        raise ValueError("kl_advantage = 'to_go' needs an advantage: not with mode 'gkd'")
    teacher_mean = teachers.teacher_means(config, policy, model, routes, x, t, t_next, next_x, cond)
    anchor_mean = None
    if mar and config.mar_weight > 0:
        anchor_mean = teachers.kernel_means(config, policy, model, teachers.anchor, x, t, t_next, next_x, cond)
    new = step_log_prob(policy, x, t, t_next, next_x, cond, config.guidance_scale, config.noise_level,
                        config.sde_type, config.log_prob_reduction, config.cfg_detach_uncond)
    kl_t = step_kl(new, teacher_mean, config.kl_scale)
    sample_kl = None
    if config.kl_estimator == "sample":
        sample_kl = sampled_step_kl(next_x, new.mean.detach(), teacher_mean, new.std, new.sigma, config.kl_scale)
    mar_kl = step_kl(new, anchor_mean, config.mar_scale) if anchor_mean is not None else None
    loss, stats = opd_loss(new.log_prob, log_prob_old, kl_t, config.mode, config.clip_range, task_advantages, mar_kl,
                           config.mar_weight, adv_clip=config.adv_clip_max,
                           kl_grad=config.kl_grad if config.mode == "mixed" else None,
                           kl_estimator=config.kl_estimator, sample_kl=sample_kl, later_kl=later_kl)
    return loss, stats, kl_t.detach()


# ---------------------------------------------------------------- the loop


def main(argv: Sequence[str] | None = None) -> int:
    """``opd CONFIG [key=value ...]`` (the arguments after the subcommand)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        print("usage: python -m flowopd.train opd CONFIG.toml [key=value ...]\n\n" + describe_fields(OPDConfig))
        return 0 if args and args[0] in ("-h", "--help") else 2
    result = train(load_config(OPDConfig, args[0], args[1:]))
    from accelerate import PartialState

    if PartialState().is_main_process:
        last = result.checkpoints[-1] if result.checkpoints else None
        print(f"done: iteration {result.iteration}, {result.optimizer_step} optimizer steps; last checkpoint {last}")
    return 0


def train(
    config: OPDConfig,
    scorers: Mapping[str, Scorer] | None = None,
    eval_scorers: Mapping[str, Scorer] | None = None,
) -> TrainResult:
    """Run the recipe. ``scorers`` (by scorer name) and ``eval_scorers`` (by benchmark) may be injected."""
    with torch_threads(config.threads):
        return _train(config, scorers, eval_scorers)


def check_config(config: OPDConfig) -> None:
    """Errors that name the key at fault, before anything loads."""
    check_grpo_config(config, require_reward=config.mode == "mixed")
    choices = {"mode": OPD_MODES, "kl_scale": KL_SCALES, "mar_scale": KL_SCALES, "kl_grad": ("detached", "pathwise"),
               "kl_advantage": ("step", "to_go"), "kl_estimator": KL_ESTIMATORS}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(config, name)!r}")
    if config.kl_grad != "detached" and config.mode != "mixed":
        raise ConfigError(f"kl_grad = {config.kl_grad!r} applies to mode 'mixed' only (mode {config.mode!r} fixes it)")
    if config.kl_advantage == "to_go" and config.mode == "gkd":
        raise ConfigError("kl_advantage = 'to_go' shapes an advantage; mode 'gkd' has none (use 'step')")
    if config.kl_estimator == "sample" and (config.mode in ("pathwise", "gkd") or config.kl_grad == "pathwise"):
        raise ConfigError(f"kl_estimator = 'sample' is a score-function estimator with a detached advantage: use "
                          f"mode 'kl_only' or 'mixed' with kl_grad 'detached' (got mode {config.mode!r}, kl_grad "
                          f"{config.kl_grad!r})")
    if config.beta != 0:
        raise ConfigError(f"beta = {config.beta}: OPD regularises with MAR; set mar_weight (and anchor) instead")
    if config.mar_weight < 0:
        raise ConfigError(f"mar_weight must be >= 0, got {config.mar_weight}")
    if not config.teachers:
        raise ConfigError("no teachers: add [teachers] with task = ADAPTER_DIR for every prompt source's task")
    missing = sorted({s.task for s in config.prompts} - set(config.teachers))
    if missing:
        raise ConfigError(
            f"prompt sources of tasks {missing} have no teacher; teachers cover {sorted(config.teachers)}"
        )


def zero_gradient_warning(config: OPDConfig) -> str | None:
    """The one-line start-up warning for a configuration whose KL term has a zero-mean gradient, else None."""
    reason = zero_mean_kl_gradient(config.mode, config.kl_estimator, config.kl_advantage, config.kl_grad)
    if reason is None:
        return None
    return (f"opd: {reason}: the KL term's expected policy gradient is zero (an ablation, METHOD.md s.3); to "
            f"distill use mode 'pathwise' (the default), kl_estimator 'sample' or kl_advantage 'to_go'")


def _train(
    config: OPDConfig, scorers: Mapping[str, Scorer] | None, eval_scorers: Mapping[str, Scorer] | None
) -> TrainResult:
    import_modules(config.imports)
    check_config(config)
    warning = zero_gradient_warning(config)
    if warning and os.environ.get("RANK", "0") == "0":  # once per launch (torchrun / accelerate set RANK)
        logger.warning(warning)
    n_train = len(trained_positions(config.num_steps, config.sde_window_size or config.num_steps,
                                    config.timestep_fraction, config.sde_window_size > 0))
    total, n_batches = batch_layout(config)
    accelerator = make_accelerator(config, n_batches // config.updates_per_iteration * n_train)
    sampler = PromptSampler(config.prompts, config.mix)
    policy, model = build_policy(config, accelerator.device)
    teachers = TeacherSet(model, config.teachers, config.anchor, config.model)
    memory = shared_base_memory(model, teachers.frozen)
    run = Run.prepare(config, accelerator, policy, model, config.num_iterations * config.updates_per_iteration,
                      eval_scorers)
    reward = build_reward(config.reward, scorers, accelerator.device) if config.reward.is_set() else None
    run.begin()
    if run.is_main_process:
        memory_file = run.out_dir / "memory.json"
        memory_file.write_text(json.dumps({"frozen_adapters": teachers.frozen, **memory}, indent=1) + "\n")
        logger.info(f"opd: {memory['copies']} frozen networks ({', '.join(teachers.frozen)}) kept as adapters on "
                    f"one base of {memory['base_parameters']:,} parameters: {_mib(memory['adapter_bytes'])} instead "
                    f"of {_mib(memory['full_copies_bytes'])} of float32 copies, {_mib(memory['saved_bytes'])} saved")
    cosines = None
    if config.grad_cosine_every and run.is_main_process:
        cosines = GradientCosineCSV(run.out_dir / "grad_cosines.csv", run.start)

    bar = run.progress_bar("opd")
    executor = ThreadPoolExecutor(config.reward_workers) if config.reward_workers > 0 and reward is not None else None
    try:
        for iteration in run.iterations():
            t0 = time.perf_counter()
            plan = plan_iteration(config, sampler, run.rng, iteration)
            metrics: dict[str, Any] = {}
            if config.grad_cosine_every and iteration % config.grad_cosine_every == 0:
                metrics.update(_gradient_probe(run, teachers, sampler, reward, iteration, cosines))
            n_local = total // accelerator.num_processes
            local = np.arange(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
            traj, cond, rewards, timing = rollout(config, policy, run.model, plan, local, reward, executor)
            task_adv = None
            if rewards is not None:
                metrics.update(reward_metrics(accelerator, plan, rewards, reward.keys))
                total_r = metrics.pop("_total")
                if config.mode == "mixed":
                    adv, _ = compute_advantages(total_r, plan.group_ids, config.adv_clip_max, config.advantage_std)
                    task_adv = torch.as_tensor(adv[local])
            metas_local = [plan.metas[i] for i in local]
            later = None
            if config.kl_advantage == "to_go":
                later = future_kl(config, policy, run.model, teachers, traj, cond, metas_local)
            t1 = time.perf_counter()
            # every sample carries a dense KL advantage: none is dropped
            batches = micro_batches(np.ones(len(local), dtype=bool), n_batches,
                                    np.random.default_rng([plan.shuffle_seed, accelerator.process_index]))
            metrics.update(_train_iteration(run, teachers, traj, cond, metas_local, task_adv, later, batches))
            del traj, cond
            metrics.update({"time/sample_s": timing["sample"], "time/reward_wait_s": timing["reward_wait"],
                            "time/train_s": time.perf_counter() - t1})
            metrics.update({k: v for k, v in timing.items() if k.startswith("monitor/")})
            run.end_iteration(iteration, metrics, t0)
            bar.update(1)
            bar.set_postfix(kl=f"{metrics.get('train/kl_t', math.nan):.4g}")
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True)
        run.close()
    return run.finish()


def _train_iteration(
    run: Run,
    teachers: TeacherSet,
    traj: Trajectory,
    cond: Conditioning,
    metas: Sequence[Mapping[str, Any]],
    task_adv: torch.Tensor | None,
    later: torch.Tensor | None,
    batches: list[np.ndarray],
) -> dict[str, float]:
    """The OPD loss over every trained step of every micro-batch (advancing ``run.step``); per-task mean KL_t
    for the logs."""
    config, accelerator, policy, model = run.config, run.accelerator, run.policy, run.model
    optimizer, scheduler, ema, named, step = run.optimizer, run.scheduler, run.ema, run.named, run.step
    model.train()
    positions = trained_positions(config.num_steps, len(traj.step_indices), config.timestep_fraction,
                                  config.sde_window_size > 0)
    params = [p for _, p in named]
    device = accelerator.device
    tasks = sorted(teachers.adapter_of)
    kl_sum = torch.zeros(len(tasks), dtype=torch.float64)
    kl_count = torch.zeros(len(tasks), dtype=torch.float64)
    collected: dict[str, list[torch.Tensor]] = {}
    grad_norms, lrs = [], []
    for batch in batches:
        idx = torch.as_tensor(batch, dtype=torch.long, device=traj.states.device)
        cond_mb = index_cond(cond, idx)
        metas_mb = [metas[i] for i in batch]
        routes = teachers.routes(metas_mb)
        task_of = torch.as_tensor([tasks.index(m["task"]) for m in metas_mb])
        adv_mb = task_adv[batch].to(device) if task_adv is not None else None
        for j in positions:
            with accelerator.accumulate(model):
                loss, stats, kl_t = opd_step_loss(
                    config, policy, model, teachers, routes, traj.states[idx, j], traj.times[j], traj.next_times[j],
                    traj.next_states[idx, j], cond_mb, traj.log_probs[idx, j], adv_mb,
                    later_kl=later[torch.as_tensor(batch), j].to(device) if later is not None else None)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norms.append(accelerator.clip_grad_norm_(params, config.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad()
            kl_sum.index_add_(0, task_of, kl_t.double().cpu())
            kl_count.index_add_(0, task_of, torch.ones(len(batch), dtype=torch.float64))
            for k, v in stats.items():
                collected.setdefault(k, []).append(v.detach().float())
            if accelerator.sync_gradients:
                lrs.append(scheduler.get_last_lr()[0])
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(named, step)
    run.step = step
    out = gather_stats(accelerator, collected)
    sums = accelerator.gather(torch.stack([kl_sum, kl_count]).to(device).unsqueeze(0)).sum(0).cpu()
    for i, task in enumerate(tasks):
        if sums[1, i] > 0:
            out[f"kl_task/{task}"] = float(sums[0, i] / sums[1, i])
    out.update(mean_grad_norm(grad_norms))
    if lrs:
        out["train/lr"] = float(lrs[-1])
    return out


def _gradient_probe(
    run: Run,
    teachers: TeacherSet,
    sampler: PromptSampler,
    reward: Reward | None,
    iteration: int,
    csv: GradientCosineCSV | None,
) -> dict[str, float]:
    """The task-gradient cosines of the OPD loss (MAR left out) on a probe batch, main process only
    (flowopd.train.diagnostics)."""
    config, policy, model = run.config, run.policy, run.model
    metrics: dict[str, float] = {}
    if run.is_main_process:
        plan = plan_probe(config, sampler, iteration)
        model.eval()
        with unwrapped(policy, model):
            traj, cond, rewards, _ = sample_and_score(config, policy, plan, np.arange(len(plan.metas)), reward, None)
            adv = later = None
            if config.mode == "mixed":
                adv = torch.as_tensor(compute_advantages(rewards.total, plan.group_ids, config.adv_clip_max,
                                                         config.advantage_std)[0])
            if config.kl_advantage == "to_go":
                later = future_kl(config, policy, model, teachers, traj, cond, plan.metas)

            def task_loss(idx: torch.Tensor, j: int) -> torch.Tensor:
                routes = teachers.routes([plan.metas[i] for i in idx.tolist()])
                return opd_step_loss(config, policy, model, teachers, routes, traj.states[idx, j], traj.times[j],
                                     traj.next_times[j], traj.next_states[idx, j], index_cond(cond, idx),
                                     traj.log_probs[idx, j], adv[idx] if adv is not None else None, mar=False,
                                     later_kl=later[idx, j] if later is not None else None)[0]

            positions = trained_positions(config.num_steps, len(traj.step_indices), config.timestep_fraction,
                                          config.sde_window_size > 0)
            grads = probe_task_gradients(task_loss, [m["task"] for m in plan.metas], positions,
                                         [p for _, p in run.named], config.sample_batch_size)
        metrics = grads.metrics()
        if csv is not None:
            csv.write(iteration, grads.cosines())
    run.accelerator.wait_for_everyone()
    return metrics
