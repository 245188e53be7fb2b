"""On-policy SDE rollouts with log-probs, written once against the Policy interface (METHOD.md s.3).

A rollout runs ``num_steps`` steps of the schedule ``policy.timesteps(num_steps)`` from ``t = 1`` to ``t = 0``.
The steps listed in ``sde_steps`` are stochastic (Flow-GRPO's SDE or CPS kernel) and are *recorded*: the
state before and after, the kernel's mean and std, and the log-prob of the drawn next state. The other
steps are plain Euler ODE steps (Flow-GRPO-Fast's "SDE window"). The trainer recomputes the log-prob of a
recorded step under the current weights with ``prev_sample = next_state`` (:func:`step_log_prob`), which is
the numerator of the PPO ratio.

States are kept in float32 whatever the model dtype (``policy.velocity`` casts its input), as Flow-GRPO
keeps its latents in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from flowopd.models.policy import Conditioning, Policy
from flowopd.sampling import step_velocity
from flowopd.sde import StepOutput, cps_step_with_logprob, ode_step, sde_step_with_logprob

SDEType = Literal["sde", "cps"]
_STEPS = {"sde": sde_step_with_logprob, "cps": cps_step_with_logprob}
# Conditioning keys of the positive prompt and of the empty (negative) prompt, per policy family:
# SD3Policy (embeds/pooled) and MiniPolicy (tokens/mask).
_NEGATIVE_KEYS = {"embeds": "neg_embeds", "pooled": "neg_pooled", "tokens": "negative_tokens", "mask": "negative_mask"}


@dataclass
class Trajectory:
    """A batch of SDE rollouts; ``S`` is the number of recorded (stochastic) steps.

    Attributes:
        states: (N, S, ...) float32 ``x_t`` before each recorded step.
        next_states: (N, S, ...) float32 state drawn by the step.
        log_probs: (N, S) log-prob of ``next_states`` under the sampling policy (reduction as asked).
        means: (N, S, ...) kernel means.
        stds: (N, S) kernel standard deviations.
        times: (S,) ``t`` of each recorded step; ``next_times``: (S,) its ``t_next``.
        step_indices: (S,) position of each recorded step in the schedule.
        latents: (N, ...) final state at ``t = 0``.
        images: (N, 3, H, W) float32 in [0, 1], ``policy.decode(latents)``.
    """

    states: torch.Tensor
    next_states: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    times: torch.Tensor
    next_times: torch.Tensor
    step_indices: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor


def sde_window(
    num_steps: int, window_size: int, window_range: Sequence[int], rng: np.random.Generator
) -> list[int]:
    """Flow-GRPO-Fast's SDE window: ``window_size`` consecutive steps starting uniformly in ``window_range``.

    ``window_size = 0`` means every step is stochastic. ``window_range = (lo, hi)`` bounds the window:
    the start is drawn from ``lo .. hi - window_size`` inclusive (``hi`` at most ``num_steps``).
    """
    if window_size <= 0:
        return list(range(num_steps))
    lo, hi = int(window_range[0]), min(int(window_range[1]), num_steps)
    if not 0 <= lo <= hi - window_size:
        raise ValueError(
            f"sde_window: window of {window_size} steps does not fit in range ({lo}, {hi}) of {num_steps} steps"
        )
    start = int(rng.integers(lo, hi - window_size + 1))
    return list(range(start, start + window_size))


def trained_positions(num_steps: int, num_recorded: int, timestep_fraction: float, windowed: bool) -> list[int]:
    """Which recorded steps are trained (positions into the trajectory's step axis).

    Without an SDE window, the first ``int(num_steps * timestep_fraction)`` steps (Flow-GRPO: 9 of 10 at
    0.99); with a window, every step of the window (Flow-GRPO-Fast trains ``sde_window_size`` steps).
    """
    n = num_recorded if windowed else min(num_recorded, int(num_steps * timestep_fraction))
    if n < 1:
        raise ValueError(
            f"no trained step: timestep_fraction {timestep_fraction} of {num_steps} steps rounds down to 0"
        )
    return list(range(n))


def unconditional(cond: Conditioning) -> Conditioning:
    """The conditioning with the negative (empty) prompt in the positive slots, for ``guidance_scale = 1``."""
    pairs = [(k, n) for k, n in _NEGATIVE_KEYS.items() if k in cond]
    if not pairs or any(n not in cond for _, n in pairs):
        raise ValueError(
            f"cannot find the negative-prompt entries in conditioning keys {sorted(cond)} (known pairs: "
            f"{_NEGATIVE_KEYS}); set cfg_detach_uncond = false for this policy"
        )
    return {**cond, **{k: cond[n] for k, n in pairs}}


def guided_velocity(
    policy: Policy,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    detach_uncond: bool = False,
) -> torch.Tensor:
    """The CFG velocity; with ``detach_uncond`` the unconditional branch carries no gradient.

    Flow-GRPO's training forward (``compute_log_prob`` in ``scripts/train_sd3.py``) keeps both branches
    attached (``detach_uncond=False``). Detaching the unconditional prediction makes the policy gradient flow
    through the conditional branch only (two forward passes of N instead of one of 2N; the value is the same up
    to float rounding), which ignores the adapter's effect on ``v_uncond`` (weight ``1 - g``): a biased
    gradient.
    """
    if not detach_uncond or guidance_scale == 1.0:
        return policy.velocity(x, t, cond, guidance_scale)
    v_cond = policy.velocity(x, t, cond, 1.0)
    with torch.no_grad():
        v_uncond = policy.velocity(x, t, unconditional(cond), 1.0)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def step_log_prob(
    policy: Policy,
    x: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    next_x: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    noise_level: float,
    sde_type: SDEType = "sde",
    reduction: Literal["mean", "sum"] = "mean",
    detach_uncond: bool = False,
) -> StepOutput:
    """Kernel of the step ``x -> next_x`` under the policy's current weights (the PPO ratio's numerator).

    ``t`` and ``t_next`` are 0-d times of the step; gradients reach ``log_prob`` and ``mean`` through the
    velocity.
    """
    v = guided_velocity(policy, x, t.expand(x.shape[0]).to(x.device), cond, guidance_scale, detach_uncond)
    return _STEPS[sde_type](x, v, t, t_next, noise_level, prev_sample=next_x, reduction=reduction)


@torch.no_grad()
def sample_sde_trajectory(
    policy: Policy,
    cond: Conditioning,
    noise: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    noise_level: float = 0.7,
    sde_steps: Sequence[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    sde_type: SDEType = "sde",
    reference: bool = False,
) -> Trajectory:
    """Sample from ``noise`` (t = 1) to t = 0, recording the stochastic steps (see the module docstring).

    Args:
        policy: any Policy (SD3, mini).
        cond: ``policy.encode_prompts(prompts)``, one row per sample.
        noise: (N, ...) starting noise, e.g. ``policy.initial_noise(seeds, H, W)``.
        num_steps: steps of the schedule (Flow-GRPO trains with 10).
        guidance_scale: CFG scale (4.5 for SD3.5-M).
        noise_level: ``a`` of the SDE (0.7); 0 gives the deterministic ODE sampler (NaN log-probs).
        sde_steps: indices of the stochastic, recorded steps (default: all); see :func:`sde_window`.
        generator: source of the step noise; a list gives one generator per sample, so that a sample never
            depends on the batch it is drawn in.
        reduction: log-prob over elements: ``"mean"`` (Flow-GRPO) or ``"sum"`` (exact log-density).
        sde_type: ``"sde"`` (Flow-GRPO) or ``"cps"`` (coefficient-preserving sampling).
        reference: every step through ``policy.velocity`` (flowopd.sampling.step_velocity; same values).
    """
    if sde_type not in _STEPS:
        raise ValueError(f"sde_type must be one of {sorted(_STEPS)}, got {sde_type!r}")
    steps = list(range(num_steps)) if sde_steps is None else sorted({int(s) for s in sde_steps})
    if not steps or not 0 <= steps[0] <= steps[-1] < num_steps:
        raise ValueError(f"sde_steps {steps} must name at least one step in 0..{num_steps - 1}")
    times = policy.timesteps(num_steps)
    x = noise.to(policy.device, torch.float32)
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in ("states", "next_states", "log_probs", "means", "stds")}
    velocity = step_velocity(policy, cond, guidance_scale, reference)  # policy.velocity's values, faster
    for i in range(num_steps):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t.expand(x.shape[0]).to(x.device))
        if i not in steps:
            x = ode_step(x, v.float(), t, t_next)
            continue
        out = _STEPS[sde_type](x, v, t, t_next, noise_level, generator=generator, reduction=reduction)
        rec["states"].append(x)
        rec["next_states"].append(out.sample)
        rec["log_probs"].append(out.log_prob)
        rec["means"].append(out.mean)
        rec["stds"].append(out.std.reshape(-1))
        x = out.sample
    stacked = {k: torch.stack(v, dim=1) for k, v in rec.items()}
    idx = torch.as_tensor(steps, dtype=torch.long)
    return Trajectory(
        **stacked,
        times=times[idx],
        next_times=times[idx + 1],
        step_indices=idx,
        latents=x,
        images=policy.decode(x).float().clamp(0, 1),
    )


def concat_trajectories(parts: Sequence[Trajectory]) -> Trajectory:
    """Trajectories of sampling batches with the same recorded steps, joined along the batch axis."""
    first = parts[0]
    for p in parts[1:]:
        if not torch.equal(p.step_indices, first.step_indices):
            raise ValueError("concat_trajectories: parts recorded different steps")
    per_sample = ("states", "next_states", "log_probs", "means", "stds", "latents", "images")
    return Trajectory(
        **{k: torch.cat([getattr(p, k) for p in parts]) for k in per_sample},
        times=first.times,
        next_times=first.next_times,
        step_indices=first.step_indices,
    )
