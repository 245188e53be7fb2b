"""SDE/CPS steps against float64 references written from METHOD.md s.3, diffusers' Euler step, and torch's Normal."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowopd.sde import (
    cps_step_with_logprob,
    kernel_kl,
    kl_time_weight,
    ode_step,
    sde_step_with_logprob,
    sigma_t,
    velocity_kl,
)

SHAPE = (4, 3, 8, 8)
D = 3 * 8 * 8


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    v = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    # Per-sample times, including the t = 1 first step and the t_next = 0 last step.
    t = torch.tensor([1.0, 0.8, 0.5, 0.1])
    t_next = torch.tensor([0.9, 0.6, 0.45, 0.0])
    return x, v, noise, t, t_next


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(-1, 1, 1, 1)


def _ref_sde(x, v, noise, t, t_next, a):
    """METHOD.md s.3 in float64, guard 1 - t_next at t = 1 (t_next is the largest schedule time below 1)."""
    x, v, noise, t, tn = x.double(), v.double(), noise.double(), _col(t), _col(t_next)
    dt = tn - t
    sigma = a * torch.sqrt(t / (1 - torch.where(t == 1, tn, t)))
    mean = x * (1 + sigma**2 * dt / (2 * t)) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    std = sigma * torch.sqrt(-dt)
    sample = mean + std * noise
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return sample, mean, std, lp.sum(dim=(1, 2, 3))


def _ref_cps(x, v, noise, t, t_next, a):
    x, v, noise, t, tn = x.double(), v.double(), noise.double(), _col(t), _col(t_next)
    std = tn * math.sin(a * math.pi / 2)
    x0_hat = x - t * v
    eps_hat = x + (1 - t) * v
    mean = x0_hat * (1 - tn) + eps_hat * torch.sqrt(tn**2 - std**2)
    sample = mean + std * noise
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return sample, mean, std, lp.sum(dim=(1, 2, 3))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("a", [0.7, 1.0])
def test_sde_step_matches_float64_reference(a: float) -> None:
    x, v, noise, t, t_next = _inputs()
    out = sde_step_with_logprob(x, v, t, t_next, a, noise=noise, reduction="sum")
    sample, mean, std, lp = _ref_sde(x, v, noise, t, t_next, a)
    assert out.sample.dtype == torch.float32 and out.log_prob.shape == (4,)
    assert _rel(out.sample, sample) < 1e-5
    assert _rel(out.mean, mean) < 1e-5
    assert _rel(out.std, std) < 1e-5
    assert _rel(out.log_prob, lp) < 1e-5
    # The guard at t = 1 is what Flow-GRPO uses: sigma = a sqrt(1 / (1 - sigmas[1])).
    assert out.sigma[0].item() == pytest.approx(a * math.sqrt(1 / (1 - 0.9)), rel=1e-6)


@pytest.mark.parametrize("a", [0.7, 0.3])
def test_cps_step_matches_float64_reference(a: float) -> None:
    x, v, noise, t, t_next = _inputs(1)
    # The last sample has t_next = 0 (deterministic step): compare the first three for the log-prob.
    out = cps_step_with_logprob(x, v, t, t_next, a, noise=noise, reduction="sum")
    sample, mean, std, lp = _ref_cps(x, v, noise, t, t_next, a)
    assert _rel(out.sample, sample) < 1e-5
    assert _rel(out.mean, mean) < 1e-5
    assert _rel(out.std, std) < 1e-5
    assert _rel(out.log_prob[:3], lp[:3]) < 1e-5
    assert torch.isnan(out.log_prob[3])
    assert torch.equal(out.sample[3], out.mean[3].float())


def test_cps_flow_grpo_surrogate_log_prob() -> None:
    x, v, noise, t, t_next = _inputs(2)
    out = cps_step_with_logprob(x, v, t, t_next, noise=noise, log_prob_kind="flow_grpo")
    expected = -((out.sample - out.mean) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)
    assert out.log_prob[3] == 0  # last step: sample == mean


def test_noise_level_zero_equals_diffusers_euler_scheduler() -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    sigmas = sched.sigmas
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x_ode, x_sde, x_cps = x.clone(), x.clone(), x.clone()
    for i, timestep in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        x = sched.step(v, timestep, x).prev_sample
        x_ode = ode_step(x_ode, v, sigmas[i], sigmas[i + 1])
        x_sde = sde_step_with_logprob(x_sde, v, sigmas[i], sigmas[i + 1], 0.0).sample
        x_cps = cps_step_with_logprob(x_cps, v, sigmas[i], sigmas[i + 1], 0.0).sample
        for ours in (x_ode, x_sde, x_cps):
            torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert sched.step_index == 10


def test_deterministic_step_has_nan_log_prob_and_no_noise() -> None:
    x, v, noise, t, t_next = _inputs()
    out = sde_step_with_logprob(x, v, t, t_next, 0.0, noise=noise)
    assert torch.isnan(out.log_prob).all()
    torch.testing.assert_close(out.sample, ode_step(x, v, t, t_next))


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_log_prob_matches_torch_normal(step) -> None:
    x, v, _, t, t_next = _inputs(4)
    t_next = t_next.clamp_min(0.05)  # keep CPS's last step stochastic
    gen = torch.Generator().manual_seed(5)
    out_sum = step(x, v, t, t_next, generator=gen, reduction="sum")
    expected = torch.distributions.Normal(out_sum.mean, out_sum.std).log_prob(out_sum.sample).sum(dim=(1, 2, 3))
    torch.testing.assert_close(out_sum.log_prob, expected, rtol=1e-5, atol=1e-3)
    out_mean = step(x, v, t, t_next, prev_sample=out_sum.sample, reduction="mean")
    torch.testing.assert_close(out_mean.log_prob, out_sum.log_prob / D, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_prev_sample_path_reproduces_sampled_log_prob(step) -> None:
    x, v, _, t, t_next = _inputs(6)
    sampled = step(x, v, t, t_next, generator=torch.Generator().manual_seed(0))
    again = step(x, v, t, t_next, prev_sample=sampled.sample)
    assert torch.equal(again.sample, sampled.sample)
    torch.testing.assert_close(again.log_prob, sampled.log_prob, equal_nan=True, rtol=0, atol=0)


def test_bf16_inputs_are_computed_in_float32() -> None:
    x, v, noise, t, t_next = _inputs(7)
    xb, vb = x.bfloat16(), v.bfloat16()
    out = sde_step_with_logprob(xb, vb, t, t_next, noise=noise)
    ref = sde_step_with_logprob(xb.float(), vb.float(), t, t_next, noise=noise)
    assert out.sample.dtype == torch.bfloat16
    assert out.mean.dtype == out.log_prob.dtype == out.std.dtype == torch.float32
    torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=0)
    torch.testing.assert_close(out.sample, ref.sample.bfloat16(), rtol=0, atol=0)
    # The log-prob is that of the returned bf16 sample, so evaluating it again gives ratio 1 exactly.
    again = sde_step_with_logprob(xb, vb, t, t_next, prev_sample=out.sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_per_sample_generators_make_draws_batch_independent() -> None:
    x, v, _, t, t_next = _inputs(8)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    batch = sde_step_with_logprob(x, v, t, t_next, generator=gens)
    alone = sde_step_with_logprob(x[2:3], v[2:3], t[2:3], t_next[2:3], generator=[torch.Generator().manual_seed(102)])
    torch.testing.assert_close(batch.sample[2:3], alone.sample)


def test_gradient_reaches_log_prob_through_mean_only() -> None:
    x, v, _, t, t_next = _inputs(9)
    target = sde_step_with_logprob(x, v, t, t_next, generator=torch.Generator().manual_seed(1)).sample
    w = torch.tensor(1.0, requires_grad=True)
    prev = target.clone().requires_grad_(True)
    out = sde_step_with_logprob(x, w * v, t, t_next, prev_sample=prev)
    out.log_prob.sum().backward()
    assert w.grad is not None and w.grad.abs() > 0
    assert prev.grad is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_kl_equals_time_weighted_velocity_distance(dtype: torch.dtype) -> None:
    x, v_s, noise, t, t_next = _inputs(10)
    v_t = v_s + 0.3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    x, v_s, v_t = x.to(dtype), v_s.to(dtype), v_t.to(dtype)
    a = 0.7
    s = sde_step_with_logprob(x, v_s, t, t_next, a, noise=noise)
    te = sde_step_with_logprob(x, v_t, t, t_next, a, noise=noise)
    torch.testing.assert_close(s.std, te.std)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for reduction in ("sum", "mean"):
        kl_means = kernel_kl(s.mean, te.mean, s.std, reduction)
        kl_vel = velocity_kl(v_s, v_t, t, t_next, a, reduction)
        torch.testing.assert_close(kl_means, kl_vel, rtol=tol, atol=0)
    # Closed form of w(t) for t < 1 (METHOD.md s.3), and ||.||^2 scaling by hand.
    tt = t[1:].double()
    w_closed = (1 + a**2 / 2) ** 2 * (1 - tt) / (2 * a**2 * tt)
    torch.testing.assert_close(kl_time_weight(tt, a), w_closed)
    by_hand = w_closed * (t[1:] - t_next[1:]).double() * ((v_s - v_t).double() ** 2).sum(dim=(1, 2, 3))[1:]
    torch.testing.assert_close(velocity_kl(v_s, v_t, t, t_next, a)[1:].double(), by_hand, rtol=tol, atol=0)


def test_kernel_kl_is_the_gaussian_kl() -> None:
    x, v, noise, t, t_next = _inputs(12)
    a = sde_step_with_logprob(x, v, t, t_next, noise=noise)
    b = sde_step_with_logprob(x, v + 0.1, t, t_next, noise=noise)
    p = torch.distributions.Normal(a.mean.double(), a.std.double().expand(SHAPE))
    q = torch.distributions.Normal(b.mean.double(), b.std.double().expand(SHAPE))
    expected = torch.distributions.kl_divergence(p, q).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kernel_kl(a.mean, b.mean, a.std).double(), expected, rtol=1e-4, atol=0)


def test_sigma_t_guard_and_errors() -> None:
    assert sigma_t(0.5, 0.7).item() == pytest.approx(0.7)
    assert sigma_t(torch.tensor([1.0, 0.5]), 0.7, t_guard=0.96)[0].item() == pytest.approx(0.7 / math.sqrt(0.04))
    with pytest.raises(ValueError, match="t_guard"):
        sigma_t(1.0, 0.7)
    with pytest.raises(ValueError, match="t_next < t"):
        sde_step_with_logprob(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.6)
    with pytest.raises(ValueError, match="not both"):
        sde_step_with_logprob(
            torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.4, noise=torch.zeros(1, 2), prev_sample=torch.zeros(1, 2)
        )
