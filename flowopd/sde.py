"""ODE and SDE steps with log-probs, and the KL between two SDE kernels (METHOD.md s.3).

Placeholder holding only the Euler ODE step; the full module is being written (issue 6).
"""

from __future__ import annotations

import torch


def ode_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float) -> torch.Tensor:
    """Plain Euler step of the probability-flow ODE: ``x + (t_next - t) v`` (computed in float32)."""
    dt = _bcast(torch.as_tensor(t_next, dtype=torch.float32) - torch.as_tensor(t, dtype=torch.float32), x)
    return (x.float() + dt * v.float()).to(x.dtype)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = t.to(x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t
