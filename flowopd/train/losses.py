"""Flow-GRPO and Flow-OPD losses as pure functions on tensors (METHOD.md s.3).

Every function takes per-sample tensors of one trained step (shape (N,)) and returns a scalar loss plus
a dict of detached 0-d tensors for logging (call ``.item()`` when logging, not here, to avoid syncs).

Scales of the KL terms, which differ between the paper and the public code:

- exact kernel KL of the SDE step: ``sde.kernel_kl(mean_a, mean_b, step.std, "sum")``
  ``= w(t) |dt| ||v_a - v_b||^2``; ``reduction="mean"`` divides it by the number of elements D.
- the public code (Flow-GRPO's ``train_sd3.py`` ``kl_loss`` and Flow-OPD's ``train_sd3_opd_mix.py``
  ``kl_reward``/``kl_loss``): ``mean over elements of (mean_a - mean_b)^2 / (2 std_dev_t^2)`` with
  ``std_dev_t = sigma_t`` (not the kernel std ``sigma_t sqrt(|dt|)``), i.e. the per-element kernel KL
  times ``|dt|``. That is :func:`reference_kl` with ``sigma = StepOutput.sigma``.
"""

from __future__ import annotations

from typing import Literal

import torch

Stats = dict[str, torch.Tensor]
OPDMode = Literal["kl_only", "pathwise", "gkd", "mixed"]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-4,
    clip: float = 5.0,
    std: Literal["batch", "group"] = "batch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalised GRPO advantages (METHOD.md s.3).

    ``A_i = (r_i - mean of i's group) / (std + eps)``, clipped to ``+-clip``. ``std="batch"`` (default,
    Flow-GRPO's ``global_std=True``) is the std over all rewards of the batch; ``std="group"`` the std of
    each group. Both are population stds (``ddof = 0``), as Flow-GRPO's ``PerPromptStatTracker``
    (``np.std``). Groups whose rewards are all equal carry no signal: their advantages are 0 and
    ``keep_mask`` is False for their samples.

    Args:
        rewards: (N,) rewards of the batch, gathered over all processes.
        group_ids: (N,) integer id of each sample's prompt group.

    Returns:
        ``(advantages, keep_mask)``: float32 (N,) and bool (N,).
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_advantages: rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
            "must be 1-D of equal length"
        )
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"group_advantages: non-finite rewards at indices {bad[:10]}; filter or impute them first")
    # float64 so that a shift of all rewards by a large constant does not eat the differences
    r = rewards.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    counts = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    means = torch.zeros_like(counts).index_add_(0, inv, r) / counts
    centered = r - means[inv]
    if std == "batch":
        scale = r.std(unbiased=False) + eps
    elif std == "group":
        var = torch.zeros_like(counts).index_add_(0, inv, centered**2) / counts
        scale = var.sqrt()[inv] + eps
    else:
        raise ValueError(f"group_advantages: std must be 'batch' or 'group', got {std!r}")
    g_max = torch.full_like(counts, -torch.inf).scatter_reduce(0, inv, r, reduce="amax")
    g_min = torch.full_like(counts, torch.inf).scatter_reduce(0, inv, r, reduce="amin")
    keep = (g_max > g_min)[inv]
    adv = torch.where(keep, (centered / scale).clamp(-clip, clip), torch.zeros_like(r))
    return adv.float(), keep


def clipped_surrogate(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))``, ``r = exp(new - old)``.

    ``advantages`` is used as given (not detached: OPD's pathwise mode differentiates through it).
    Stats: ``clip_frac`` (share with ``|r - 1| > eps``), ``approx_kl`` (``0.5 mean((new - old)^2)``, as
    Flow-GRPO logs it), ``ratio_mean/min/max``.
    """
    ratio = torch.exp(log_prob_new - log_prob_old.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * ((log_prob_new - log_prob_old) ** 2).mean(),
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
        }
    return loss, stats


def reference_kl(
    mean_theta: torch.Tensor,
    mean_ref: torch.Tensor,
    sigma: torch.Tensor | float,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Flow-GRPO's KL to a reference: ``mean over elements of (mean_theta - mean_ref)^2 / (2 sigma^2)``.

    METHOD.md s.3's ``L_kl``. Flow-GRPO (``scripts/train_sd3.py``) and Flow-OPD divide by
    ``std_dev_t^2`` with ``std_dev_t = sigma_t = a sqrt(t / (1 - t))``, not by the kernel variance
    ``sigma_t^2 |dt|``, and average over the latent elements: pass ``sigma = StepOutput.sigma`` for that
    parity. Passing ``StepOutput.std`` instead gives the exact per-element kernel KL.

    Args:
        sigma: scalar, (N,) or (N, 1, ..., 1).
        reduction: ``"mean"`` over the batch (a scalar, the loss) or ``"none"`` (per sample, (N,)).
    """
    diff = mean_theta.float() - mean_ref.float()
    s = torch.as_tensor(sigma, dtype=diff.dtype, device=diff.device)
    s = s.reshape(-1, *([1] * (diff.ndim - 1))) if s.ndim else s
    per_sample = (diff**2 / (2 * s**2)).mean(dim=tuple(range(1, diff.ndim)))
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reference_kl: reduction must be 'mean' or 'none', got {reduction!r}")


def grpo_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.04,
    clip_range: float = 1e-4,
    adv_clip: float = 5.0,
) -> tuple[torch.Tensor, Stats]:
    """Flow-GRPO loss of one trained step: ``L_policy + beta * L_kl`` (METHOD.md s.3).

    Args:
        advantages: (N,) group advantages (from :func:`group_advantages`), clipped again to ``+-adv_clip``
            as Flow-GRPO does at train time.
        kl: ``L_kl``, a scalar or per-sample (N,) KL to the reference policy (adapter disabled), usually
            ``reference_kl(step.mean, ref_step.mean, step.sigma)``; required when ``beta > 0``.
        beta: KL weight (0.04 GenEval/OCR, 0.01 PickScore).
        clip_range: PPO clip ``eps`` (1e-4 for the per-element-mean log-prob).
    """
    policy, stats = clipped_surrogate(log_prob_new, log_prob_old, advantages.clamp(-adv_clip, adv_clip), clip_range)
    if beta == 0:
        stats["loss"] = policy.detach()
        return policy, stats
    if kl is None:
        raise ValueError("grpo_loss: beta > 0 needs kl (e.g. reference_kl(step.mean, ref_step.mean, step.sigma))")
    kl_loss = kl.mean()
    loss = policy + beta * kl_loss
    stats["kl_loss"] = kl_loss.detach()
    stats["loss"] = loss.detach()
    return loss, stats


KLEstimator = Literal["analytic", "sample"]


def opd_advantages(
    kl_t: torch.Tensor, clip: float = 5.0, mode: Literal["kl_only", "pathwise"] = "pathwise"
) -> torch.Tensor:
    """Dense per-step OPD advantage ``A_t = clip(-KL_t, -clip, clip)`` (METHOD.md s.3).

    ``"pathwise"`` (the default; the public code, ``train_sd3_opd_mix.py`` with ``reward_mode="kl_only"``,
    ``kl_scale=-1``) leaves it attached, so ``-A * ratio`` carries the pathwise gradient of ``KL_t`` (ratio ~
    1). ``"kl_only"`` detaches it: the gradient then flows through the PPO ratio only, and since ``KL_t`` is a
    function of the state, not of the step's action, that gradient has zero mean - an ablation. The public
    ``KL_t`` is ``reference_kl(student.mean, teacher.mean, student.sigma, "none")``: mean over elements of the
    squared mean difference over ``2 sigma_t^2``, i.e. the per-element kernel KL times ``|dt|``.
    """
    if mode == "kl_only":
        kl_t = kl_t.detach()
    elif mode != "pathwise":
        raise ValueError(f"opd_advantages: mode must be 'kl_only' or 'pathwise', got {mode!r}")
    return (-kl_t).clamp(-clip, clip)


def zero_mean_kl_gradient(
    mode: str, kl_estimator: str = "analytic", kl_advantage: str = "step", kl_grad: str | None = None
) -> str | None:
    """Why the KL term of this OPD configuration has a zero expected gradient, or None when it has not.

    The analytic ``KL_t`` depends on the state ``x_t`` only; detached and used as the advantage of the action
    ``x_{t+1}`` alone (no return-to-go), its score-function gradient has mean 0 (METHOD.md s.3).
    """
    if kl_estimator != "analytic" or kl_advantage != "step":
        return None
    if mode == "kl_only":
        return "mode 'kl_only' with kl_estimator 'analytic' and kl_advantage 'step'"
    if mode == "mixed" and (kl_grad or "detached") == "detached":
        return "mode 'mixed' with kl_grad 'detached', kl_estimator 'analytic' and kl_advantage 'step' (its KL part)"
    return None


def opd_loss(
    log_prob_new: torch.Tensor | None,
    log_prob_old: torch.Tensor | None,
    kl_t: torch.Tensor,
    mode: OPDMode = "pathwise",
    clip_range: float = 1e-4,
    task_advantages: torch.Tensor | None = None,
    mar_kl: torch.Tensor | None = None,
    mar_weight: float = 0.04,
    *,
    adv_clip: float = 5.0,
    kl_grad: Literal["detached", "pathwise"] | None = None,
    kl_estimator: KLEstimator = "analytic",
    sample_kl: torch.Tensor | None = None,
    later_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Flow-OPD loss of one trained step (METHOD.md s.3).

    The dense reward of step t is ``-KL_t``; the gradient of ``E[sum_t KL_t]`` has a local part (the step's own
    KL, through the student's mean at ``x_t``) and a future part (the action ``x_{t+1}`` changes the later
    steps' KL). The pieces:

    - local term, ``kl_estimator``: ``"analytic"`` - ``kl_t`` itself, which carries a gradient only when it is
      left attached (``mode="pathwise"``, or ``"mixed"`` with ``kl_grad="pathwise"``); ``"sample"`` -
      ``sample_kl``, the log-ratio ``log pi_S(x_{t+1}|x_t) - log pi_T(x_{t+1}|x_t)`` of the sampled transition
      (detached, same scale as ``kl_t``), whose mean is ``KL_t`` and whose score-function gradient is an
      unbiased local ``grad KL_t`` (the estimator of on-policy distillation of language models);
    - future term, ``later_kl``: the return-to-go of the later recorded steps' KL (``kl_advantage = "to_go"``),
      detached, added to the advantage.

    Modes:
        ``"pathwise"`` (default): clipped surrogate with ``A_t = -(KL_t + later)``, ``KL_t`` attached.
        ``"kl_only"``: the same with everything detached; with the analytic ``KL_t`` and no ``later_kl`` its
            expected gradient is zero (see :func:`zero_mean_kl_gradient`): an ablation.
        ``"gkd"``: ``mean(KL_t)``, no ratio (log-probs may be None; no estimator or return-to-go).
        ``"mixed"``: ``A = clip(clip(task_advantages) - local - later)``, as the public ``reward_mode="mixed"``;
            the analytic local part is detached unless ``kl_grad="pathwise"``.
    MAR: when ``mar_kl`` (per-sample KL(student || anchor), attached) is given, ``mar_weight * mean(mar_kl)``
    is added in every mode (public default 0.04, its ``beta``).

    Args:
        kl_t: (N,) per-step KL between the student's and its routed teacher's kernels, attached to the
            student's graph (it is detached here where the mode says so); always logged as ``kl_t``.
        kl_grad: only for ``"mixed"``; the other modes fix it.
    """
    stats: Stats = {"kl_t": kl_t.detach().mean()}
    if kl_estimator not in ("analytic", "sample"):
        raise ValueError(f"opd_loss: kl_estimator must be 'analytic' or 'sample', got {kl_estimator!r}")
    if kl_estimator == "sample" and sample_kl is None:
        raise ValueError("opd_loss: kl_estimator 'sample' needs sample_kl (the sampled transition's log-ratio)")
    if mode == "gkd":
        if kl_estimator != "analytic" or later_kl is not None:
            raise ValueError("opd_loss: mode 'gkd' has no advantage: use kl_estimator 'analytic' and no later_kl")
        loss = kl_t.mean()
        stats["gkd_loss"] = loss.detach()
    else:
        if mode not in ("kl_only", "pathwise", "mixed"):
            raise ValueError(f"opd_loss: mode must be one of kl_only, pathwise, gkd, mixed; got {mode!r}")
        if log_prob_new is None or log_prob_old is None:
            raise ValueError(f"opd_loss: mode {mode!r} needs log_prob_new and log_prob_old")
        if mode != "mixed" and kl_grad is not None:
            raise ValueError(f"opd_loss: kl_grad is fixed by mode {mode!r}; use it only with mode='mixed'")
        if mode == "mixed" and task_advantages is None:
            raise ValueError("opd_loss: mode 'mixed' needs task_advantages (from group_advantages)")
        grad = "pathwise" if mode == "pathwise" else "detached" if mode == "kl_only" else kl_grad or "detached"
        if grad not in ("detached", "pathwise"):
            raise ValueError(f"opd_loss: kl_grad must be 'detached' or 'pathwise', got {kl_grad!r}")
        if kl_estimator == "sample":
            if grad == "pathwise":
                raise ValueError(f"opd_loss: kl_estimator 'sample' is a score-function estimator; it does not go "
                                 f"with an attached KL (mode {mode!r}, kl_grad {grad!r})")
            local = sample_kl.detach()
            stats["sample_kl"] = local.mean()
        else:
            local = kl_t if grad == "pathwise" else kl_t.detach()
        kl_adv = local if later_kl is None else local + later_kl.detach()
        task = 0.0 if task_advantages is None else task_advantages.detach().clamp(-adv_clip, adv_clip)
        adv = (task - kl_adv).clamp(-adv_clip, adv_clip)
        loss, policy_stats = clipped_surrogate(log_prob_new, log_prob_old, adv, clip_range)
        stats.update(policy_stats)
        stats["advantage_mean"] = adv.detach().mean()
    if mar_kl is not None:
        mar = mar_kl.mean()
        loss = loss + mar_weight * mar
        stats["mar_kl"] = mar.detach()
    stats["loss"] = loss.detach()
    return loss, stats
