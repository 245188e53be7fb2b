"""The OPD estimators of METHOD.md s.3, proven on a small Gaussian policy by Monte Carlo (issue 18).

A two-step linear-Gaussian "denoiser": ``x_{j+1} ~ N(a x_j + b, s^2 I)`` for the student, ``N(0.5 x_j + 0.4, s^2 I)``
for the teacher, ``x_0 ~ N(0, I)``. The objective is ``J(a, b) = E[KL_0 + KL_1]`` with ``KL_j`` the kernel KL at the
student's state ``x_j``. Its true gradient is the reparameterised one (``x_1`` depends on ``(a, b)`` through the
student's mean); the local part alone is the same with ``x_1`` held fixed. Each estimator's surrogate gradient,
through :func:`flowopd.train.losses.opd_loss` exactly as the trainer calls it (ratio 1 at the first update), is
averaged over many trajectories in chunks, and its mean is compared with zero and with the true gradients.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from flowopd.sde import kernel_kl, kernel_log_ratio
from flowopd.train.config import load_config
from flowopd.train.losses import opd_loss, zero_mean_kl_gradient
from flowopd.train.opd import OPDConfig, check_config, kernel_step_kl, sampled_step_kl, zero_gradient_warning

D, STD, CHUNKS, PER_CHUNK = 2, 0.6, 40, 5000
TEACHER = (0.5, 0.4)
ROOT = Path(__file__).resolve().parents[1]

# name -> (mode, kl_estimator, kl_advantage)
ESTIMATORS = {
    "kl_only+step": ("kl_only", "analytic", "step"),
    "kl_only+to_go": ("kl_only", "analytic", "to_go"),
    "sample": ("kl_only", "sample", "step"),
    "sample+to_go": ("kl_only", "sample", "to_go"),
    "pathwise": ("pathwise", "analytic", "step"),
    "pathwise+to_go": ("pathwise", "analytic", "to_go"),
    "gkd": ("gkd", "analytic", "step"),
}


def _teacher_mean(x: torch.Tensor) -> torch.Tensor:
    return TEACHER[0] * x + TEACHER[1]


def _log_prob(x_next: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return (-((x_next - mean) ** 2) / (2 * STD**2) - math.log(STD) - 0.5 * math.log(2 * math.pi)).sum(1)


def _chunk_gradients(name: str, theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(2,) surrogate gradient of one chunk of trajectories for estimator ``name``, plus the two true ones."""
    mode, estimator, advantage = ESTIMATORS[name] if name in ESTIMATORS else (None, None, None)
    a, b = theta[0], theta[1]
    x0 = torch.randn(PER_CHUNK, D, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, PER_CHUNK, D, generator=generator, dtype=torch.float64)
    if name in ("true", "true_local"):
        x1 = a * x0 + b + STD * eps[0]  # reparameterised: x_1 carries the gradient of the first action
        if name == "true_local":
            x1 = x1.detach()
        total = sum(kernel_kl(a * x + b, _teacher_mean(x), STD, "sum").mean() for x in (x0, x1))
        return torch.autograd.grad(total, theta)[0]
    with torch.no_grad():  # the recorded trajectory
        x1 = a * x0 + b + STD * eps[0]
        x2 = a * x1 + b + STD * eps[1]
        later = [kernel_kl(a * x1 + b, _teacher_mean(x1), STD, "sum"), torch.zeros(PER_CHUNK, dtype=torch.float64)]
    loss = torch.zeros((), dtype=torch.float64)
    for j, (x, x_next) in enumerate(((x0, x1), (x1, x2))):
        mean = a * x + b
        new = _log_prob(x_next, mean)
        kl_t = kernel_kl(mean, _teacher_mean(x), STD, "sum")
        sample_kl = kernel_log_ratio(x_next, mean.detach(), _teacher_mean(x), STD, "sum")
        step_loss, _ = opd_loss(new, new.detach(), kl_t, mode, clip_range=0.2, mar_kl=None, adv_clip=1e9,
                                kl_estimator=estimator, sample_kl=sample_kl,
                                later_kl=later[j] if advantage == "to_go" else None)
        loss = loss + step_loss
    return torch.autograd.grad(loss, theta)[0]


@pytest.fixture(scope="module")
def gradients() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (mean gradient, standard error) over CHUNKS x PER_CHUNK trajectories, common random numbers."""
    theta = torch.tensor([0.8, 0.0], dtype=torch.float64, requires_grad=True)
    out = {}
    for name in [*ESTIMATORS, "true", "true_local"]:
        g = torch.Generator().manual_seed(1234)
        chunks = torch.stack([_chunk_gradients(name, theta, g) for _ in range(CHUNKS)])
        out[name] = (chunks.mean(0), chunks.std(0) / math.sqrt(CHUNKS))
    return out


def test_the_detached_step_advantage_has_a_zero_mean_gradient(gradients):
    true_local, _ = gradients["true_local"]
    mean, se = gradients["kl_only+step"]
    # the interval is far below the size of the gradient it would have to find
    assert bool((1.96 * se < 0.05 * true_local.abs()).all()), (se, true_local)
    assert bool((mean.abs() < 4 * se).all()), (mean, se)


@pytest.mark.parametrize("name", ["kl_only+to_go", "sample", "sample+to_go", "pathwise", "pathwise+to_go", "gkd"])
def test_every_other_estimator_has_a_clearly_non_zero_gradient(gradients, name):
    mean, se = gradients[name]
    assert bool((mean.abs() > 8 * se).any()), (name, mean, se)


@pytest.mark.parametrize("name", ["pathwise", "sample", "gkd"])
def test_local_estimators_estimate_the_local_gradient(gradients, name):
    mean, se = gradients[name]
    true_local, se_true = gradients["true_local"]
    assert bool(((mean - true_local).abs() < 4 * (se + se_true)).all()), (name, mean, true_local, se)


@pytest.mark.parametrize("name", ["pathwise+to_go", "sample+to_go"])
def test_complete_estimators_estimate_the_true_gradient(gradients, name):
    mean, se = gradients[name]
    true, se_true = gradients["true"]
    assert not torch.allclose(true, gradients["true_local"][0], rtol=0.05)  # to_go matters in this example
    assert bool(((mean - true).abs() < 4 * (se + se_true)).all()), (name, mean, true, se)


def test_kl_only_to_go_is_the_future_part_alone(gradients):
    future = gradients["true"][0] - gradients["true_local"][0]
    mean, se = gradients["kl_only+to_go"]
    assert bool(((mean - future).abs() < 4 * (se + gradients["true"][1] + gradients["true_local"][1])).all())


@pytest.mark.parametrize("scale", ["sum", "mean", "public"])
def test_the_sampled_log_ratio_has_the_analytic_kl_as_its_mean(scale):
    g = torch.Generator().manual_seed(0)
    n, reps = 4, 200_000
    mean = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    other = mean + 0.3 * torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    dt = torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64).reshape(-1, 1, 1, 1)
    sigma = torch.tensor([0.5, 0.9, 1.3, 0.7], dtype=torch.float64).reshape(-1, 1, 1, 1)
    std = sigma * dt.sqrt()
    analytic = kernel_step_kl(mean, other, std, sigma, scale)
    draws = mean.unsqueeze(0) + std.unsqueeze(0) * torch.randn(reps, *mean.shape, generator=g, dtype=torch.float64)
    sampled = sampled_step_kl(draws.flatten(0, 1), mean.repeat(reps, 1, 1, 1), other.repeat(reps, 1, 1, 1),
                              std.repeat(reps, 1, 1, 1), sigma.repeat(reps, 1, 1, 1), scale).reshape(reps, n)
    se = sampled.std(0) / math.sqrt(reps)
    assert bool(((sampled.mean(0) - analytic).abs() < 4 * se).all()), (sampled.mean(0), analytic, se)
    assert bool((se < 0.05 * analytic).all())
    with pytest.raises(ValueError, match="scale"):
        sampled_step_kl(mean, mean, other, std, sigma, "nats")


def test_zero_mean_configurations_are_named():
    assert zero_mean_kl_gradient("kl_only") is not None
    assert zero_mean_kl_gradient("mixed", kl_grad="detached") is not None
    for args in [("pathwise",), ("gkd",), ("kl_only", "sample"), ("kl_only", "analytic", "to_go"),
                 ("mixed", "analytic", "step", "pathwise"), ("mixed", "sample", "step", "detached")]:
        assert zero_mean_kl_gradient(*args) is None, args


def test_defaults_distill_and_the_ablation_is_warned():
    default = OPDConfig()
    assert (default.mode, default.kl_scale, default.kl_estimator, default.kl_advantage) == (
        "pathwise", "public", "analytic", "step")
    assert zero_gradient_warning(default) is None
    message = zero_gradient_warning(OPDConfig(mode="kl_only"))
    assert message is not None and "kl_only" in message and "\n" not in message
    assert "kl_grad 'detached'" in zero_gradient_warning(OPDConfig(mode="mixed"))


@pytest.mark.parametrize("recipe", sorted((ROOT / "training" / "configs").glob("*opd*.toml")), ids=lambda p: p.stem)
def test_no_shipped_opd_recipe_has_a_zero_mean_kl_term(recipe):
    config = load_config(OPDConfig, recipe, [])
    assert zero_gradient_warning(config) is None, recipe.name


def test_sample_estimator_refuses_an_attached_kl():
    from flowopd.train.config import ConfigError

    base = ["teachers.geneval=x"]
    with pytest.raises(ConfigError, match="kl_estimator"):
        check_config(load_config(OPDConfig, None, ["kl_estimator=sample", "mode=pathwise", *base]))
    with pytest.raises(ConfigError, match="kl_estimator"):
        check_config(load_config(OPDConfig, None, ["kl_estimator=exact", "mode=kl_only", *base]))
    check_config(load_config(OPDConfig, None, ["kl_estimator=sample", "mode=kl_only", *base]))
    lp = torch.zeros(2)
    with pytest.raises(ValueError, match="sample_kl"):
        opd_loss(lp, lp, torch.ones(2), "kl_only", kl_estimator="sample")
    with pytest.raises(ValueError, match="score-function"):
        opd_loss(lp, lp, torch.ones(2), "pathwise", kl_estimator="sample", sample_kl=torch.ones(2))


def test_the_warning_reaches_the_log_at_start_up(caplog, monkeypatch):
    from flowopd.train import opd

    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(opd, "trained_positions", stop)  # right after the start-up checks, before accelerate
    config = load_config(OPDConfig, None, ["teachers.geneval=x", "mode=kl_only", "cpu=true"])
    with caplog.at_level(logging.WARNING, logger="flowopd.train.opd"), pytest.raises(Stop):
        opd.train(config)
    assert any("expected policy gradient is zero" in r.getMessage() for r in caplog.records)
