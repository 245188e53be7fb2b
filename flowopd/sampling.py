"""Sampling loops written once against the Policy interface (used by evaluation and training)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowopd.models.policy import Conditioning, Policy
from flowopd.sde import ode_step

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def step_velocity(
    policy: Policy, cond: Conditioning, guidance_scale: float, reference: bool = False
) -> Velocity:
    """``(x, t) -> policy.velocity(x, t, cond, guidance_scale)`` for the steps of one sampling loop.

    A policy with a ``sampling_velocity`` (the mini model's: the prompts encoded once per loop, in-place
    inference ops) gives the same values faster while autograd is off and the weights stay fixed for the loop;
    ``reference`` calls ``policy.velocity`` at every step instead (the path it is checked against).
    """
    fast = None if reference else getattr(policy, "sampling_velocity", None)
    if fast is None:
        return lambda x, t: policy.velocity(x, t, cond, guidance_scale)
    return fast(cond, guidance_scale)


@torch.no_grad()
def sample_ode(
    policy: Policy,
    cond: Conditioning,
    noise: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    reference: bool = False,
) -> torch.Tensor:
    """Deterministic Euler sampling from ``noise`` (t = 1) to t = 0; returns images in [0, 1].

    ``reference``: every step through ``policy.velocity`` (see :func:`step_velocity`); the images are the same.
    """
    times = policy.timesteps(num_steps)
    x = noise.to(policy.device)
    velocity = step_velocity(policy, cond, guidance_scale, reference)
    for i in range(num_steps):
        v = velocity(x, times[i].expand(x.shape[0]).to(x.device))
        x = ode_step(x, v, times[i], times[i + 1])
    return policy.decode(x).clamp(0, 1)
