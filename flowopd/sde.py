"""ODE and SDE steps with log-probs, and the KL between two SDE kernels (METHOD.md s.3).

Conventions: rectified flow ``x_t = (1 - t) x0 + t eps``, ``t = 1`` is noise, velocity ``v = eps - x0``
(after classifier-free guidance), one step goes from ``t`` to ``t_next < t`` with ``dt = t_next - t < 0``.

Times ``t``/``t_next`` may be Python floats, 0-d tensors or per-sample tensors of shape (N,). Every step
computes in float32 whatever the dtype of ``x`` and ``v`` (bf16 overflows in the mean, as Flow-GRPO notes;
float64 inputs stay float64), returns ``sample`` in ``x.dtype`` and everything else in the compute dtype.

The ``t = 1`` guard. ``sigma_t = a sqrt(t / (1 - t))`` is infinite at ``t = 1``. Flow-GRPO
(``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``) replaces the ``t`` of ``1 - t`` by
``scheduler.sigmas[1]``, the largest time below 1 of the schedule. In a step that starts at ``t = 1`` that
time is the step's own ``t_next``, so the steps below use ``t_guard = t_next`` by default and need no
schedule; :func:`sigma_t` takes ``t_guard`` explicitly and refuses ``t = 1`` without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Reduction = Literal["mean", "sum"]
TimeLike = torch.Tensor | float


@dataclass(frozen=True)
class StepOutput:
    """One stochastic step ``x_t -> x_next`` and the Gaussian kernel it was drawn from.

    Attributes:
        sample: ``x_next`` in ``x.dtype`` (the given ``prev_sample`` when one was passed).
        mean: kernel mean, compute dtype, shape of ``x``.
        std: kernel standard deviation, compute dtype, shape (N, 1, ..., 1).
        log_prob: log-density of ``sample`` under the kernel, shape (N,), reduced over the elements
            as asked (``"mean"`` is Flow-GRPO's per-element mean, ``"sum"`` the exact log-density).
        sigma: what Flow-GRPO returns as ``std_dev_t`` and divides its KL terms by: ``sigma_t`` for the
            SDE (so ``std = sigma * sqrt(|dt|)``), the kernel std itself for CPS. Shape (N, 1, ..., 1).
    """

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor
    sigma: torch.Tensor


def ode_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float) -> torch.Tensor:
    """Plain Euler step of the probability-flow ODE: ``x + (t_next - t) v`` (computed in float32)."""
    dt = _bcast(torch.as_tensor(t_next, dtype=torch.float32) - torch.as_tensor(t, dtype=torch.float32), x)
    return (x.float() + dt * v.float()).to(x.dtype)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = t.to(x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def sigma_t(t: TimeLike, noise_level: float, t_guard: TimeLike | None = None) -> torch.Tensor:
    """Diffusion scale of the Flow-GRPO SDE, ``a * sqrt(t / (1 - t))`` (METHOD.md s.3).

    Args:
        t: time(s) in (0, 1].
        noise_level: ``a`` (Flow-GRPO default 0.7).
        t_guard: used in place of ``t`` inside ``1 - t`` where ``t == 1``: the largest time below 1 of the
            sampling schedule (Flow-GRPO's ``scheduler.sigmas[1]``). Required when some ``t`` equals 1.

    Returns:
        ``sigma_t`` with the shape of ``t``, in float32 (float64 if ``t`` is float64).
    """
    t = _as_float(t)
    if bool((t <= 0).any()) or bool((t > 1).any()):
        raise ValueError(f"sigma_t: times must lie in (0, 1], got min {t.min().item()}, max {t.max().item()}")
    at_one = t == 1
    if bool(at_one.any()):
        if t_guard is None:
            raise ValueError(
                "sigma_t: sigma is infinite at t = 1; pass t_guard = the largest time below 1 of the "
                "schedule (e.g. timesteps[1]), as Flow-GRPO does with scheduler.sigmas[1]"
            )
        guard = torch.broadcast_to(_as_float(t_guard).to(device=t.device, dtype=t.dtype), t.shape)
        if bool(((guard >= 1) | (guard < 0))[at_one].any()):
            raise ValueError(f"sigma_t: t_guard must lie in [0, 1) where t = 1, got {guard[at_one].tolist()}")
        denom_t = torch.where(at_one, guard, t)
    else:
        denom_t = t
    return noise_level * torch.sqrt(t / (1 - denom_t))


def sde_step_with_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    t: TimeLike,
    t_next: TimeLike,
    noise_level: float = 0.7,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    t_guard: TimeLike | None = None,
) -> StepOutput:
    """Flow-GRPO's SDE step from ``t`` to ``t_next`` with the log-prob of the result (METHOD.md s.3).

    ``mean = x (1 + sigma^2 dt / (2t)) + v (1 + sigma^2 (1 - t) / (2t)) dt``, ``std = sigma sqrt(|dt|)``.
    ``noise_level = 0`` is exactly the Euler step :func:`ode_step`; its kernel is a point mass, so its
    ``log_prob`` is NaN.

    Args:
        x: state at ``t``, (N, ...).
        v: guided velocity at ``(x, t)``, same shape.
        t, t_next: current and next time, ``0 <= t_next < t <= 1``.
        noise_level: ``a`` in ``sigma_t = a sqrt(t / (1 - t))``.
        noise: standard normal noise (shape of ``x``) to use instead of drawing it.
        generator: drawn-noise source; a list gives one generator per sample (batch-independent draws).
        prev_sample: evaluate the log-prob of this ``x_next`` instead of sampling (the PPO ratio's
            numerator); gradients reach ``log_prob`` only through ``mean``.
        reduction: ``"mean"`` over the elements (Flow-GRPO, default) or ``"sum"`` (exact log-density).
        t_guard: time used in ``1 - t`` where ``t == 1``; defaults to ``t_next`` (see module docstring).
    """
    xf, vf, tt, tn, dt = _prepare(x, v, t, t_next)
    sigma = sigma_t(tt, noise_level, tn if t_guard is None else _as_float(t_guard).to(tt))
    mean = xf * (1 + sigma**2 * dt / (2 * tt)) + vf * (1 + sigma**2 * (1 - tt) / (2 * tt)) * dt
    std = sigma * torch.sqrt(-dt)
    sample = _draw(x, mean, std, noise, generator, prev_sample)
    log_prob = _gaussian_log_prob(sample.to(mean.dtype).detach(), mean, std, reduction)
    return StepOutput(sample=sample, mean=mean, std=std, log_prob=log_prob, sigma=sigma)


def cps_step_with_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    t: TimeLike,
    t_next: TimeLike,
    noise_level: float = 0.7,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    log_prob_kind: Literal["gaussian", "flow_grpo"] = "gaussian",
) -> StepOutput:
    """Coefficient-preserving sampling (CPS) step with the log-prob of the result (METHOD.md s.3).

    ``std = t_next sin(a pi / 2)``, ``x0_hat = x - t v``, ``eps_hat = x + (1 - t) v``,
    ``mean = x0_hat (1 - t_next) + eps_hat sqrt(t_next^2 - std^2)``. ``noise_level = 0`` is the Euler
    step; the last step (``t_next = 0``) is deterministic too, and a Gaussian ``log_prob`` there is NaN.

    Arguments as in :func:`sde_step_with_logprob`, plus ``log_prob_kind``: ``"gaussian"`` (default) is
    the true Gaussian log-density reduced by ``reduction``; ``"flow_grpo"`` is Flow-GRPO's CPS surrogate
    ``-(x_next - mean)^2`` reduced the same way (no constants, no ``1 / (2 std^2)``; its CPS presets tune
    ``clip_range = 1e-5`` for it). ``t = 1`` needs no guard here.
    """
    xf, vf, tt, tn, _ = _prepare(x, v, t, t_next)
    std = tn * math.sin(noise_level * math.pi / 2)
    x0_hat = xf - tt * vf
    eps_hat = xf + (1 - tt) * vf
    mean = x0_hat * (1 - tn) + eps_hat * torch.sqrt((tn**2 - std**2).clamp_min(0))
    sample = _draw(x, mean, std, noise, generator, prev_sample)
    value = sample.to(mean.dtype).detach()
    if log_prob_kind == "gaussian":
        log_prob = _gaussian_log_prob(value, mean, std, reduction)
    elif log_prob_kind == "flow_grpo":
        log_prob = _reduce(-((value - mean) ** 2), reduction)
    else:
        raise ValueError(
            f"cps_step_with_logprob: log_prob_kind must be 'gaussian' or 'flow_grpo', got {log_prob_kind!r}"
        )
    return StepOutput(sample=sample, mean=mean, std=std, log_prob=log_prob, sigma=std)


def kernel_kl(
    mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor | float, reduction: Reduction = "sum"
) -> torch.Tensor:
    """KL between two Gaussian kernels with the same diagonal std: ``||mean_a - mean_b||^2 / (2 std^2)``.

    Per sample, shape (N,). ``"sum"`` is the exact KL; ``"mean"`` divides it by the number of elements
    (the scale of the per-element log-prob). ``std`` is a scalar, (N,) or (N, 1, ..., 1) (``StepOutput.std``).
    """
    diff = _upcast(mean_a) - _upcast(mean_b).to(mean_a.device)
    std_t = _bcast(_as_float(std).to(diff.dtype), diff)
    return _reduce(diff**2 / (2 * std_t**2), reduction)


def kernel_log_ratio(
    x_next: torch.Tensor,
    mean_a: torch.Tensor,
    mean_b: torch.Tensor,
    std: torch.Tensor | float,
    reduction: Reduction = "sum",
) -> torch.Tensor:
    """``log p_a(x_next) - log p_b(x_next)`` for two Gaussian kernels with the same diagonal std.

    ``= (||x_next - mean_b||^2 - ||x_next - mean_a||^2) / (2 std^2)`` (the log-std terms cancel). Under
    ``x_next ~ p_a`` its expectation is :func:`kernel_kl` ``(mean_a, mean_b, std)`` with the same reduction:
    the single-sample estimator of the reverse KL used by on-policy distillation (METHOD.md s.3). Per
    sample, shape (N,).
    """
    x = _upcast(x_next)
    a, b = _upcast(mean_a).to(x.device), _upcast(mean_b).to(x.device)
    std_t = _bcast(_as_float(std).to(x.dtype), x)
    return _reduce(((x - b) ** 2 - (x - a) ** 2) / (2 * std_t**2), reduction)


def kl_time_weight(t: TimeLike, noise_level: float, t_guard: TimeLike | None = None) -> torch.Tensor:
    """``w(t)`` with ``KL_t = w(t) |dt| ||v_a - v_b||^2`` for two SDE kernels at the same state (METHOD.md s.3).

    Computed as ``(1 + sigma^2 (1 - t) / (2t))^2 / (2 sigma^2)``, which equals the closed form
    ``(1 + a^2/2)^2 (1 - t) / (2 a^2 t)`` for ``t < 1`` and stays consistent with the guarded ``sigma``
    at ``t = 1`` (where the closed form would wrongly give 0).
    """
    if noise_level <= 0:
        raise ValueError(
            f"kl_time_weight: noise_level must be > 0 (the kernels are point masses at 0), got {noise_level}"
        )
    t = _as_float(t)
    sigma = sigma_t(t, noise_level, t_guard)
    return (1 + sigma**2 * (1 - t) / (2 * t)) ** 2 / (2 * sigma**2)


def velocity_kl(
    v_a: torch.Tensor,
    v_b: torch.Tensor,
    t: TimeLike,
    t_next: TimeLike,
    noise_level: float = 0.7,
    reduction: Reduction = "sum",
    t_guard: TimeLike | None = None,
) -> torch.Tensor:
    """Reverse KL of two SDE steps from the same state, from velocities: ``w(t) |dt| ||v_a - v_b||^2``.

    Per sample, shape (N,); equals :func:`kernel_kl` of the two steps' means with their common std
    (``reduction`` as there). ``t_guard`` defaults to ``t_next`` as in :func:`sde_step_with_logprob`.
    """
    diff = _upcast(v_a) - _upcast(v_b).to(v_a.device)
    tt, tn = _as_float(t).to(diff), _as_float(t_next).to(diff)
    w = kl_time_weight(tt, noise_level, tn if t_guard is None else t_guard)
    scale = _bcast(w * (tt - tn), diff)
    return _reduce(scale * diff**2, reduction)


def _as_float(t: TimeLike) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.dtype == torch.float64 else t.float()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 -> float32, float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prepare(
    x: torch.Tensor, v: torch.Tensor, t: TimeLike, t_next: TimeLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upcast x and v, and turn the times into (N, 1, ..., 1) tensors; check 0 <= t_next < t <= 1."""
    if x.shape != v.shape:
        raise ValueError(f"SDE step: x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    dtype = torch.promote_types(x.dtype, torch.float32)
    shape = (x.shape[0], *([1] * (x.ndim - 1)))
    for name, value in (("t", t), ("t_next", t_next)):
        if torch.as_tensor(value).numel() not in (1, x.shape[0]):
            raise ValueError(
                f"SDE step: {name} has {torch.as_tensor(value).numel()} entries for a batch of {x.shape[0]}"
            )
    tt = _as_float(t).to(device=x.device, dtype=dtype).reshape(-1, *shape[1:]).expand(shape)
    tn = _as_float(t_next).to(device=x.device, dtype=dtype).reshape(-1, *shape[1:]).expand(shape)
    if bool((tn >= tt).any()) or bool((tn < 0).any()) or bool((tt > 1).any()):
        raise ValueError(
            f"SDE step: need 0 <= t_next < t <= 1 (steps go from noise t = 1 to data t = 0), got t={t}, t_next={t_next}"
        )
    return x.to(dtype), v.to(dtype), tt, tn, tn - tt


def _draw(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor | float,
    noise: torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator] | None,
    prev_sample: torch.Tensor | None,
) -> torch.Tensor:
    """The next state in ``x.dtype``: ``prev_sample`` if given, else ``mean + std * noise``."""
    if prev_sample is not None:
        if noise is not None or generator is not None:
            raise ValueError("SDE step: pass either prev_sample (evaluate) or noise/generator (sample), not both")
        if prev_sample.shape != mean.shape:
            raise ValueError(
                f"SDE step: prev_sample {tuple(prev_sample.shape)} must have the shape of x {tuple(mean.shape)}"
            )
        return prev_sample
    if noise is None:
        noise = _randn(mean.shape, generator, mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"SDE step: noise {tuple(noise.shape)} must have the shape of x {tuple(mean.shape)}")
    # The log-prob is evaluated at the returned (cast) sample, so re-evaluating it later gives ratio 1 exactly.
    return (mean + std * noise.to(mean)).to(x.dtype)


def _randn(
    shape: torch.Size, generator: torch.Generator | list[torch.Generator] | None, device: torch.device
) -> torch.Tensor:
    """Standard normal float32 noise; a generator list draws each sample from its own generator."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"SDE step: got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        ).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _gaussian_log_prob(
    value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduction: Reduction
) -> torch.Tensor:
    """Per-sample log N(value; mean, std^2 I), NaN where std = 0 (a deterministic step has no density)."""
    std_t = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).expand(
        (mean.shape[0], *([1] * (mean.ndim - 1)))
    )
    safe = torch.where(std_t > 0, std_t, torch.ones_like(std_t))
    elem = -((value - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    out = _reduce(elem, reduction)
    return torch.where(std_t.reshape(-1) > 0, out, torch.full_like(out, float("nan")))


def _reduce(elem: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    dims = tuple(range(1, elem.ndim))
    if reduction == "mean":
        return elem.mean(dim=dims)
    if reduction == "sum":
        return elem.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
