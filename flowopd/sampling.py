"""Sampling loops written once against the Policy interface (used by evaluation and training)."""

from __future__ import annotations

import torch

from flowopd.models.policy import Conditioning, Policy
from flowopd.sde import ode_step


@torch.no_grad()
def sample_ode(
    policy: Policy,
    cond: Conditioning,
    noise: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """Deterministic Euler sampling from ``noise`` (t = 1) to t = 0; returns images in [0, 1]."""
    times = policy.timesteps(num_steps)
    x = noise.to(policy.device)
    for i in range(num_steps):
        t = times[i].expand(x.shape[0]).to(x.device)
        v = policy.velocity(x, t, cond, guidance_scale)
        x = ode_step(x, v, times[i], times[i + 1])
    return policy.decode(x).clamp(0, 1)
