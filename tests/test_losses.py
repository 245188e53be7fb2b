"""GRPO/OPD losses: advantage invariants (hypothesis), hand-computed surrogates, gradient routing of OPD modes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowopd.sde import kernel_kl, sde_step_with_logprob
from flowopd.train.losses import (
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    opd_advantages,
    opd_loss,
    reference_kl,
)

# Batches of 2-6 groups of 2-5 rewards; rewards on a coarse grid so that equal-reward groups occur.
groups_strategy = st.lists(
    st.lists(st.integers(-20, 20).map(lambda k: k / 4), min_size=2, max_size=5), min_size=2, max_size=6
)


def _flatten(groups: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.tensor([r for g in groups for r in g], dtype=torch.float64)
    ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    return rewards, ids


@settings(max_examples=60, deadline=None)
@given(groups=groups_strategy, std=st.sampled_from(["batch", "group"]))
def test_advantages_have_zero_mean_per_kept_group_and_drop_flat_groups(groups, std) -> None:
    rewards, ids = _flatten(groups)
    adv, keep = group_advantages(rewards, ids, clip=math.inf, std=std)
    for i, g in enumerate(groups):
        in_group = ids == i
        if len(set(g)) == 1:
            assert not keep[in_group].any()
            assert (adv[in_group] == 0).all()
        else:
            assert keep[in_group].all()
            assert abs(float(adv[in_group].double().mean())) < 1e-5
            assert adv[in_group].abs().max() > 0


@settings(max_examples=60, deadline=None)
@given(
    groups=groups_strategy,
    shift=st.floats(-1e3, 1e3),
    scale=st.floats(0.1, 100.0),
    std=st.sampled_from(["batch", "group"]),
)
def test_advantages_are_shift_and_scale_invariant(groups, shift, scale, std) -> None:
    rewards, ids = _flatten(groups)
    adv, keep = group_advantages(rewards, ids, eps=0.0, clip=math.inf, std=std)
    adv2, keep2 = group_advantages(rewards * scale + shift, ids, eps=0.0, clip=math.inf, std=std)
    assert torch.equal(keep, keep2)
    torch.testing.assert_close(adv, adv2, rtol=1e-5, atol=1e-5)
    # With the default eps the shift still cancels exactly; scaling changes only the eps term.
    a_eps, _ = group_advantages(rewards, ids)
    a_shift, _ = group_advantages(rewards + shift, ids)
    torch.testing.assert_close(a_eps, a_shift, rtol=1e-5, atol=1e-5)


def test_advantages_by_hand_batch_std_and_clip() -> None:
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 2.0])
    ids = torch.tensor([7, 7, 3, 3, 9, 9])
    adv, keep = group_advantages(rewards, ids, eps=0.0)
    batch_std = float(torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 2.0]).std(unbiased=False))
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]) / batch_std
    torch.testing.assert_close(adv, expected)
    assert keep.tolist() == [True, True, False, False, True, True]
    clipped, _ = group_advantages(rewards, ids, eps=0.0, clip=0.5)
    torch.testing.assert_close(clipped, expected.clamp(-0.5, 0.5))
    per_group, _ = group_advantages(rewards, ids, eps=0.0, std="group")
    torch.testing.assert_close(per_group, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_clipped_surrogate_by_hand() -> None:
    eps = 0.1
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.05, 1.3, 0.8, 1.3]))
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0])
    # max(-A r, -A clip(r)): 1.05 inside; A>0, r=1.3 -> -1.1; A>0, r=0.8 -> -0.8 (unclipped is larger);
    # A<0, r=1.3 -> 2 * 1.3 = 2.6 (unclipped is larger).
    expected = (-1.05 - 1.1 - 0.8 + 2.6) / 4
    loss, stats = clipped_surrogate(new, old, adv, eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.75)
    assert stats["ratio_max"].item() == pytest.approx(1.3)
    assert stats["ratio_min"].item() == pytest.approx(0.8)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * float((new**2).mean()), rel=1e-6)


def test_clipped_surrogate_gradient_vanishes_when_clipped_in_the_direction_of_a() -> None:
    eps = 1e-4
    old = torch.zeros(4)
    # A > 0 with ratio above 1 + eps, A < 0 with ratio below 1 - eps: clipped, no gradient;
    # A > 0 with ratio below 1 - eps: unclipped branch, gradient -A r / N.
    new = torch.tensor([0.01, -0.01, -0.01, 0.01], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, _ = clipped_surrogate(new, old, adv, eps)
    loss.backward()
    ratio = new.detach().exp()
    assert new.grad[0] == 0 and new.grad[1] == 0
    torch.testing.assert_close(new.grad[2:], -adv[2:] * ratio[2:] / 4)


def test_reference_kl_matches_flow_grpo_formula_and_kernel_kl() -> None:
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t, t_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    s = sde_step_with_logprob(x, v, t, t_next, generator=g)
    r = sde_step_with_logprob(x, v_ref, t, t_next, prev_sample=s.sample)
    per_sample = reference_kl(s.mean, r.mean, s.sigma, reduction="none")
    by_hand = ((s.mean - r.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * s.sigma.flatten() ** 2)
    torch.testing.assert_close(per_sample, by_hand)
    assert reference_kl(s.mean, r.mean, s.sigma).item() == pytest.approx(by_hand.mean().item(), rel=1e-6)
    # sigma_t instead of the kernel std: the per-element kernel KL times |dt|.
    exact_per_element = kernel_kl(s.mean, r.mean, s.std, "mean")
    torch.testing.assert_close(per_sample, exact_per_element * (t - t_next), rtol=1e-4, atol=0)
    torch.testing.assert_close(reference_kl(s.mean, r.mean, s.std, "none"), exact_per_element, rtol=1e-5, atol=0)


def test_grpo_loss_adds_beta_times_kl() -> None:
    lp_new, lp_old = torch.tensor([0.0, 1e-5]), torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])
    kl = torch.tensor([0.2, 0.4])
    loss, stats = grpo_loss(lp_new, lp_old, adv, kl=kl, beta=0.04)
    policy, _ = clipped_surrogate(lp_new, lp_old, adv)
    assert loss.item() == pytest.approx(policy.item() + 0.04 * 0.3, rel=1e-6)
    assert stats["kl_loss"].item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="kl"):
        grpo_loss(lp_new, lp_old, adv, beta=0.04)
    no_kl, _ = grpo_loss(lp_new, lp_old, adv * 10, beta=0.0, adv_clip=5.0)
    assert no_kl.item() == pytest.approx(clipped_surrogate(lp_new, lp_old, (adv * 10).clamp(-5, 5))[0].item())


def _student_teacher_step(weight: torch.Tensor):
    """One SDE step whose student velocity depends on ``weight``; the teacher's is fixed."""
    g = torch.Generator().manual_seed(1)
    x, v, v_teacher = (torch.randn(4, 2, 4, 4, generator=g) for _ in range(3))
    t, t_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.4, 0.2])
    old = sde_step_with_logprob(x, v, t, t_next, generator=g)
    student = sde_step_with_logprob(x, weight * v, t, t_next, prev_sample=old.sample)
    teacher = sde_step_with_logprob(x, v_teacher, t, t_next, prev_sample=old.sample)
    kl_t = reference_kl(student.mean, teacher.mean, student.sigma, reduction="none")
    return student, old, kl_t


def test_opd_kl_only_sends_no_gradient_through_the_kl_advantage() -> None:
    w = torch.tensor(1.0, requires_grad=True)
    student, old, kl_t = _student_teacher_step(w)
    assert kl_t.requires_grad
    # With constant log-probs only the advantage could carry a gradient: in kl_only it must not.
    const = old.log_prob.detach()
    loss, _ = opd_loss(const, const, kl_t, mode="kl_only")
    assert not loss.requires_grad
    path_loss, _ = opd_loss(const, const, kl_t, mode="pathwise")
    (grad,) = torch.autograd.grad(path_loss, w, retain_graph=True)
    assert grad.abs() > 0
    # Pathwise at ratio 1 is the gradient of mean(KL) (clip not active: KL < 5).
    (grad_kl,) = torch.autograd.grad(kl_t.mean(), w)
    torch.testing.assert_close(grad, grad_kl)


def test_opd_kl_only_gradient_is_the_surrogate_with_constant_advantage() -> None:
    w = torch.tensor(1.0, requires_grad=True)
    student, old, kl_t = _student_teacher_step(w)
    loss, stats = opd_loss(student.log_prob, old.log_prob, kl_t, mode="kl_only", clip_range=1.0)
    (grad,) = torch.autograd.grad(loss, w, retain_graph=True)
    const_adv = -kl_t.detach()
    ref, _ = clipped_surrogate(student.log_prob, old.log_prob, const_adv, clip_range=1.0)
    (grad_ref,) = torch.autograd.grad(ref, w, retain_graph=True)
    torch.testing.assert_close(grad, grad_ref)
    path, _ = opd_loss(student.log_prob, old.log_prob, kl_t, mode="pathwise", clip_range=1.0)
    (grad_path,) = torch.autograd.grad(path, w)
    assert not torch.allclose(grad_path, grad)
    assert stats["advantage_mean"].item() == pytest.approx(const_adv.mean().item())


def test_opd_advantages_clip_and_modes() -> None:
    kl = torch.tensor([0.5, 7.0], requires_grad=True)
    adv = opd_advantages(kl, clip=5.0, mode="kl_only")
    assert adv.tolist() == [-0.5, -5.0] and not adv.requires_grad
    assert opd_advantages(kl).requires_grad  # the default is the public code's attached (pathwise) advantage
    with pytest.raises(ValueError):
        opd_advantages(kl, mode="gkd")


def test_opd_gkd_mixed_and_mar() -> None:
    kl = torch.tensor([0.2, 0.6], requires_grad=True)
    mar = torch.tensor([1.0, 3.0], requires_grad=True)
    loss, stats = opd_loss(None, None, kl, mode="gkd", mar_kl=mar, mar_weight=0.04)
    assert loss.item() == pytest.approx(0.4 + 0.04 * 2.0)
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(mar.grad, torch.tensor([0.02, 0.02]))
    assert "gkd_loss" in stats and "mar_kl" in stats
    # mixed: A = clip(clip(task) - KL); ratio 1 so the loss is -mean(A).
    lp = torch.zeros(2)
    task = torch.tensor([6.0, -1.0])
    mixed, _ = opd_loss(lp, lp, kl.detach(), mode="mixed", task_advantages=task)
    assert mixed.item() == pytest.approx(-((5.0 - 0.2) + (-1.0 - 0.6)) / 2)
    with pytest.raises(ValueError, match="task_advantages"):
        opd_loss(lp, lp, kl, mode="mixed")
    with pytest.raises(ValueError, match="kl_grad"):
        opd_loss(lp, lp, kl, mode="kl_only", kl_grad="pathwise")
    k2 = kl.detach().clone().requires_grad_(True)
    assert not opd_loss(lp, lp, k2, mode="mixed", task_advantages=task)[0].requires_grad
    assert opd_loss(lp, lp, k2, mode="mixed", task_advantages=task, kl_grad="pathwise")[0].requires_grad
