"""Issue 23's speed-ups change no result: the fast sampling path (flowopd.sampling.step_velocity ->
MiniPolicy.sampling_velocity) gives the reference path's images and trajectories bit for bit, and the mini
scorers' shortcuts give the same scores as measuring every image afresh."""

from __future__ import annotations

import math
import platform

import numpy as np
import pytest
import torch

from flowopd.models.mini import MiniPolicy, MiniTokenizer, build_mini, keep_freed_memory, load_mini
from flowopd.sampling import sample_ode, step_velocity
from flowopd.scorers.base import to_uint8_hwc
from flowopd.train.rollout import sample_sde_trajectory
from flowopd.world import scorers
from flowopd.world.grammar import prompt_set
from flowopd.world.render import render_batch

SMALL = {"channels": [8, 16, 16], "text_dim": 16, "text_layers": 1, "heads": 2, "cond_dim": 16, "groups": 4}
PROMPTS = [m["prompt"] for m in prompt_set("geneval", "test")[::16]] + ['a sign that says "B7"']  # 7 prompts


@pytest.fixture(scope="module")
def small() -> MiniPolicy:
    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=20), **SMALL)
    with torch.no_grad():  # the output conv starts at zero; perturb it so outputs depend on every input
        policy.net.conv_out.weight.normal_(std=0.1)
    return policy.eval()


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_fast_sample_ode_is_the_reference_bit_for_bit(small, guidance_scale):
    cond = small.encode_prompts(PROMPTS)
    noise = small.initial_noise(range(len(PROMPTS)), 32, 32)
    reference = sample_ode(small, cond, noise, 4, guidance_scale, reference=True)
    fast = sample_ode(small, cond, noise, 4, guidance_scale)
    assert torch.equal(fast, reference)
    assert not torch.equal(reference[0], reference[1])  # a real comparison: the images differ between prompts


def test_committed_base_checkpoint_samples_the_same_uint8_images():
    base = load_mini("mini:base")
    cond = base.encode_prompts(PROMPTS)
    noise = base.initial_noise([11, 12, 13, 14, 15, 16, 17], 32, 32)
    fast = to_uint8_hwc(sample_ode(base, cond, noise, 3, 4.0))
    reference = to_uint8_hwc(sample_ode(base, cond, noise, 3, 4.0, reference=True))
    assert np.array_equal(fast, reference)


def test_fast_rollout_records_the_reference_trajectory(small):
    cond = small.encode_prompts(PROMPTS)
    noise = small.initial_noise(range(len(PROMPTS)), 32, 32)

    def rollout(reference: bool):
        generators = [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]
        return sample_sde_trajectory(small, cond, noise, 5, 4.0, 0.7, sde_steps=[1, 2], generator=generators,
                                     reference=reference)

    fast, reference = rollout(False), rollout(True)
    for name in ("states", "next_states", "log_probs", "means", "stds", "latents", "images"):
        assert torch.equal(getattr(fast, name), getattr(reference, name)), name


def test_fast_path_is_the_reference_velocity_under_autograd(small):
    cond = small.encode_prompts(PROMPTS[:2])
    x = small.initial_noise([1, 2], 32, 32)
    t = torch.full((2,), 0.5)
    with torch.enable_grad():
        v = step_velocity(small, cond, 4.0)(x, t)
    assert v.requires_grad  # the autograd graph is kept: this was policy.velocity, not the no-grad fast path
    assert torch.equal(v.detach(), small.velocity(x, t, cond, 4.0).detach())


def test_inference_denoise_is_forward_bit_for_bit(small):
    cond = small.encode_prompts(PROMPTS)
    x, t = small.initial_noise(range(len(PROMPTS)), 32, 32), torch.linspace(0.1, 0.9, len(PROMPTS))
    with torch.no_grad():
        text = small.net.encode_text(cond["tokens"], cond["mask"])
        fast = small.net.denoise(x, t, text, cond["mask"], inference=True)
        assert torch.equal(fast, small.net(x, t, cond["tokens"], cond["mask"]))


def test_keep_freed_memory_reports_whether_glibc_took_the_settings():
    assert keep_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_quality_and_pick_measure_each_image_once_and_score_as_measured(monkeypatch):
    metas = prompt_set("geneval", "test")[:6]
    images = render_batch(metas, np.random.default_rng(2323))
    images[3] = images[3] * 0.5 + 0.25  # a washed-out one: scores away from the renderer's best
    prompts = [m["prompt"] for m in metas]
    expected = [scorers.measure(a) for a in to_uint8_hwc(images)]
    calls = []
    monkeypatch.setattr(scorers, "measure", lambda image: calls.append(1) or expected[len(calls) - 1])
    pick = scorers.MiniPickScorer().score(images, prompts, metas)
    quality = scorers.MiniQualityScorer().score(images, prompts, metas)
    assert len(calls) == len(metas)  # the quality analogue reused the preference analogue's measurements
    assert quality.scores.tolist() == [1 + 4 * math.exp(-scorers.quality_penalty(m)) for m in expected]
    assert pick.details["vividness"] == [m.vividness for m in expected]
    assert len(set(quality.scores.tolist())) > 1
