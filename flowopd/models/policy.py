"""The Policy interface: what generation and every trainer need from a flow-matching model.

Conventions (METHOD.md s.3): rectified flow ``x_t = (1 - t) x0 + t eps``; ``t = 1`` is noise;
velocity ``v = eps - x0``; steps go from ``t`` to ``t_next < t``. ``velocity`` returns the velocity
*after* classifier-free guidance. Conditioning is a dict of tensors whose first dimension is the batch
(negative/unconditional entries included), so it can be indexed and repeated with the helpers below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

Conditioning = dict[str, torch.Tensor]


@runtime_checkable
class Policy(Protocol):
    device: torch.device

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts (and the empty negative prompt used by CFG) into a batch-first dict."""
        ...

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        """Guided velocity at states ``x`` (N, C, h, w) and times ``t`` (N,) in [0, 1]."""
        ...

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Starting noise, one CPU generator per seed, so a sample never depends on its batch."""
        ...

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """float32 tensor of ``num_steps + 1`` times from 1.0 down to 0.0 (any shift applied)."""
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels) at t = 0 -> images (N, 3, H, W) float in [0, 1]."""
        ...


def index_cond(cond: Conditioning, index: torch.Tensor | slice | Sequence[int]) -> Conditioning:
    """Select batch rows of every conditioning tensor."""
    if not isinstance(index, slice):
        index = torch.as_tensor(index, dtype=torch.long)
    return {k: v[index.to(v.device) if isinstance(index, torch.Tensor) else index] for k, v in cond.items()}


def repeat_cond(cond: Conditioning, repeats: int) -> Conditioning:
    """Repeat each prompt's conditioning ``repeats`` times in a row (a GRPO group per prompt)."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``(len(seeds), *shape)``, one CPU generator per seed."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        g = torch.Generator("cpu").manual_seed(int(seed))
        out[i] = torch.randn(shape, generator=g, dtype=torch.float32)
    return out.to(dtype)
