"""flowopd.train.rollout on real policies with tiny random weights (a mini UNet and a tiny SD3 pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowopd.models.mini import MiniTokenizer, build_mini
from flowopd.sampling import sample_ode
from flowopd.train.rollout import (
    concat_trajectories,
    guided_velocity,
    sample_sde_trajectory,
    sde_window,
    step_log_prob,
    trained_positions,
    unconditional,
)

PROMPTS = ["a photo of a red circle", 'a sign that says "AB"', "a photo of two squares", "a photo of a green circle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many times faster on one thread when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=12), image_size=16, channels=[8, 16, 16], text_dim=16,
                        text_layers=1, heads=2, cond_dim=16, groups=4)
    torch.nn.init.normal_(policy.net.conv_out.weight, std=0.1)  # zero-initialised: v would be 0 everywhere
    return policy.eval()


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from _tiny_sd3 import tiny_sd3_pipeline

    from flowopd.models.sd3 import SD3Policy

    return SD3Policy(tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3")))


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_recomputed_log_prob_of_the_recorded_step_equals_the_recorded_one(mini, sde_type):
    cond = mini.encode_prompts(PROMPTS)
    noise = mini.initial_noise([1, 2, 3, 4], 16, 16)
    traj = sample_sde_trajectory(mini, cond, noise, 4, 4.0, 0.7, sde_steps=[0, 1, 2],
                                 generator=_generators([5, 6, 7, 8]), sde_type=sde_type)
    assert traj.states.shape == (4, 3, 3, 16, 16) and traj.log_probs.shape == (4, 3)
    assert traj.step_indices.tolist() == [0, 1, 2] and traj.images.shape == (4, 3, 16, 16)
    assert torch.isfinite(traj.log_probs).all()
    times = mini.timesteps(4)
    assert torch.equal(traj.times, times[:3]) and torch.equal(traj.next_times, times[1:4])
    # the chain: each step starts where the previous one ended
    assert torch.equal(traj.states[:, 1:], traj.next_states[:, :-1])
    for j in range(3):
        with torch.no_grad():
            again = step_log_prob(mini, traj.states[:, j], traj.times[j], traj.next_times[j], traj.next_states[:, j],
                                  cond, 4.0, 0.7, sde_type)
        assert torch.equal(again.log_prob, traj.log_probs[:, j])
        assert torch.equal(again.mean, traj.means[:, j])
        assert torch.equal(again.std.reshape(-1), traj.stds[:, j])


def test_noise_level_zero_rollout_is_the_ode_sampler(mini, sd3):
    for policy, size in ((mini, 16), (sd3, 8)):
        cond = policy.encode_prompts(PROMPTS[:2])
        noise = policy.initial_noise([11, 12], size, size)
        traj = sample_sde_trajectory(policy, cond, noise, 3, 4.5, noise_level=0.0, generator=_generators([1, 2]))
        assert torch.equal(traj.images, sample_ode(policy, cond, noise, 3, 4.5))
        assert torch.isnan(traj.log_probs).all()  # a point mass has no density


def test_sd3_rollout_log_probs_recompute_exactly(sd3):
    cond = sd3.encode_prompts(PROMPTS[:2])
    noise = sd3.initial_noise([3, 4], 8, 8)
    traj = sample_sde_trajectory(sd3, cond, noise, 3, 4.5, 0.7, generator=_generators([9, 10]))
    assert traj.states.dtype == torch.float32 and traj.states.shape == (2, 3, 4, 8, 8)
    with torch.no_grad():
        again = step_log_prob(sd3, traj.states[:, 0], traj.times[0], traj.next_times[0], traj.next_states[:, 0], cond,
                              4.5, 0.7)
    assert torch.equal(again.log_prob, traj.log_probs[:, 0])


def test_per_sample_generators_make_samples_independent_of_their_batch(mini):
    cond = mini.encode_prompts(PROMPTS)
    noise = mini.initial_noise([1, 2, 3, 4], 16, 16)
    whole = sample_sde_trajectory(mini, cond, noise, 3, 4.0, generator=_generators([5, 6, 7, 8]))
    half = sample_sde_trajectory(mini, {k: v[2:] for k, v in cond.items()}, noise[2:], 3, 4.0,
                                 generator=_generators([7, 8]))
    torch.testing.assert_close(half.next_states, whole.next_states[2:], rtol=1e-5, atol=1e-5)
    joined = concat_trajectories([whole, half])
    assert joined.states.shape[0] == 6 and torch.equal(joined.log_probs[4:], half.log_probs)


def test_sde_window_records_only_its_steps(mini):
    rng = np.random.default_rng(0)
    starts = {sde_window(10, 3, (2, 8), rng)[0] for _ in range(200)}
    assert starts == set(range(2, 6))  # start in lo .. hi - size
    assert sde_window(10, 0, (0, 10), rng) == list(range(10))
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(10, 4, (0, 3), rng)
    assert trained_positions(10, 10, 0.99, windowed=False) == list(range(9))  # Flow-GRPO: 9 of 10
    assert trained_positions(10, 3, 0.99, windowed=True) == [0, 1, 2]
    with pytest.raises(ValueError, match="no trained step"):
        trained_positions(10, 10, 0.05, windowed=False)

    cond = mini.encode_prompts(PROMPTS[:2])
    noise = mini.initial_noise([1, 2], 16, 16)
    traj = sample_sde_trajectory(mini, cond, noise, 5, 4.0, sde_steps=[1, 2], generator=_generators([3, 4]))
    assert traj.step_indices.tolist() == [1, 2] and traj.states.shape[1] == 2
    # the steps before the window are Euler steps: the recorded start state is the ODE state after step 0
    times = mini.timesteps(5)
    v0 = mini.velocity(noise, times[0].expand(2), cond, 4.0)
    torch.testing.assert_close(traj.states[:, 0], noise + (times[1] - times[0]) * v0)
    with pytest.raises(ValueError, match="at least one step"):
        sample_sde_trajectory(mini, cond, noise, 5, 4.0, sde_steps=[7])


def test_detached_unconditional_branch_keeps_the_value_and_drops_its_gradient(mini):
    cond = mini.encode_prompts(PROMPTS[:2])
    x = mini.initial_noise([1, 2], 16, 16)
    t = torch.full((2,), 0.6)
    params = [p for p in mini.net.parameters()]
    full = guided_velocity(mini, x, t, cond, 4.0)
    detached = guided_velocity(mini, x, t, cond, 4.0, detach_uncond=True)
    torch.testing.assert_close(detached, full, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(full)
    g_detached = torch.autograd.grad((detached * weights).sum(), params, allow_unused=True)
    g_cond = torch.autograd.grad((4.0 * mini.velocity(x, t, cond, 1.0) * weights).sum(), params, allow_unused=True)
    g_full = torch.autograd.grad((full * weights).sum(), params, allow_unused=True)
    pairs = [(a, b, c) for a, b, c in zip(g_detached, g_cond, g_full) if a is not None]
    assert pairs and all(torch.allclose(a, b, atol=1e-6) for a, b, _ in pairs)
    assert any(not torch.allclose(a, c, atol=1e-6) for a, _, c in pairs)
    swapped = unconditional(cond)
    assert torch.equal(swapped["tokens"], cond["negative_tokens"])
    assert torch.equal(swapped["mask"], cond["negative_mask"])
    with pytest.raises(ValueError, match="negative-prompt"):
        unconditional({"embeds": cond["tokens"]})
