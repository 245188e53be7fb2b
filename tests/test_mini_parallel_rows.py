"""The mini model's sampling batch split across CPU threads (issue 23, flowopd.models.mini.parallel_rows) gives
the one-batch values bit for bit: images, rollout trajectories, with and without CFG, on the committed base and on
a small random model, for even and uneven shares."""

from __future__ import annotations

import pytest
import torch

from flowopd.models.mini import MiniTokenizer, build_mini, load_mini, parallel_rows, row_chunks
from flowopd.sampling import sample_ode
from flowopd.train.rollout import sample_sde_trajectory
from flowopd.world.grammar import prompt_set

SMALL = {"channels": [8, 16, 16], "text_dim": 16, "text_layers": 1, "heads": 2, "cond_dim": 16, "groups": 4}


def _prompts(n: int) -> list[str]:
    pool = [m["prompt"] for m in prompt_set("geneval", "test")] + [m["prompt"] for m in prompt_set("ocr", "test")]
    return [pool[(7 * i) % len(pool)] for i in range(n)]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=20), **SMALL)
    with torch.no_grad():
        policy.net.conv_out.weight.normal_(std=0.1)
    return policy.eval()


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n)
    torch.set_num_threads(previous)


def test_row_chunks_split_only_whole_shares():
    assert row_chunks(64, 2) == [(0, 32), (32, 64)]
    assert row_chunks(37, 2) == [(0, 18), (18, 37)]
    assert row_chunks(31, 2) == [(0, 31)]  # under 2 x 16 samples: no split
    assert row_chunks(200, 3) == [(0, 66), (66, 133), (133, 200)]
    assert row_chunks(40, 8) == [(0, 20), (20, 40)]  # at most one share per 16 samples
    assert row_chunks(5, 1) == [(0, 5)]


def test_parallel_rows_restores_the_thread_count_even_on_error(threads):
    threads(2)
    seen = []
    assert [t.tolist() for t in parallel_rows(lambda a, b: seen.append(torch.get_num_threads()) or
                                              torch.arange(a, b), [(0, 2), (2, 3)])] == [[0, 1], [2]]
    assert seen == [1, 1] and torch.get_num_threads() == 2

    def boom(a, b):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        parallel_rows(boom, [(0, 1), (1, 2)])
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("model", ["small", "base"])
@pytest.mark.parametrize(("n", "n_threads", "guidance_scale"), [(40, 2, 4.0), (37, 2, 1.0), (50, 3, 4.0)])
def test_split_sampling_is_the_one_batch_reference(request, threads, model, n, n_threads, guidance_scale):
    """The split gives one batch's values at one intra-op thread; at two threads (the machine every committed
    record and CPU recipe was made on) those are also the one-batch values. (At three threads torch's own
    one-batch result differs from one thread's for some shapes, e.g. the small model: there the split keeps
    the one-thread values.)"""
    policy = request.getfixturevalue("small") if model == "small" else load_mini("mini:base")
    assert len(row_chunks(n, n_threads)) == n_threads  # the fast path really splits this batch
    cond = policy.encode_prompts(_prompts(n))
    noise = policy.initial_noise(range(n), 32, 32)

    def rollout(reference: bool):
        generators = [torch.Generator().manual_seed(500 + i) for i in range(n)]
        return sample_sde_trajectory(policy, cond, noise, 4, guidance_scale, 0.7, sde_steps=[1, 2],
                                     generator=generators, reference=reference)

    names = ("states", "next_states", "log_probs", "means", "stds", "latents", "images")
    reference_threads = [1, 2] if n_threads == 2 else [1]
    threads(n_threads)
    images, trajectory = sample_ode(policy, cond, noise, 3, guidance_scale), rollout(False)
    for count in reference_threads:
        threads(count)
        assert torch.equal(images, sample_ode(policy, cond, noise, 3, guidance_scale, reference=True)), count
        slow = rollout(True)
        for name in names:
            assert torch.equal(getattr(trajectory, name), getattr(slow, name)), (count, name)
