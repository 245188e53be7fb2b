"""LoRA merges: factor mean parity, delta merges through peft's merge_utils, SVD back to LoRA factors."""

from __future__ import annotations

import pytest
import torch

from flowopd.train.merge import delta_weights, deltas_to_lora, factor_mean, merge_deltas

MODULES = {"transformer_blocks.0.attn.to_q": (12, 10), "transformer_blocks.0.attn.to_out.0": (10, 12)}


def _adapter(seed: int, rank: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (fan_out, fan_in) in MODULES.items():
        out[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g)
        out[f"base_model.model.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g)
    return out


def test_factor_mean_is_the_elementwise_mean() -> None:
    adapters = [_adapter(i) for i in range(3)]
    merged = factor_mean(adapters)
    for key in adapters[0]:
        torch.testing.assert_close(merged[key], torch.stack([a[key] for a in adapters]).mean(0))
    weighted = factor_mean(adapters[:2], weights=[3.0, 1.0])
    key = next(iter(adapters[0]))
    torch.testing.assert_close(weighted[key], 0.75 * adapters[0][key] + 0.25 * adapters[1][key])
    with pytest.raises(ValueError, match="different keys"):
        factor_mean([adapters[0], {"x.lora_A.weight": torch.zeros(1)}])


def test_factor_mean_is_not_the_mean_of_updates() -> None:
    adapters = [_adapter(0), _adapter(1)]
    from_factors = delta_weights(factor_mean(adapters), 2.0)
    from_deltas = merge_deltas([delta_weights(a, 2.0) for a in adapters], "linear")
    module = next(iter(from_factors))
    assert not torch.allclose(from_factors[module], from_deltas[module], atol=1e-3)


def test_delta_weights_is_scaled_b_at_a_and_accepts_adapter_names() -> None:
    adapter = _adapter(4)
    deltas = delta_weights(adapter, 2.0)
    assert set(deltas) == {f"base_model.model.{m}" for m in MODULES}
    m = "base_model.model.transformer_blocks.0.attn.to_q"
    torch.testing.assert_close(deltas[m], 2.0 * adapter[f"{m}.lora_B.weight"] @ adapter[f"{m}.lora_A.weight"])
    in_memory = {k.replace(".weight", ".default.weight"): v for k, v in adapter.items()}
    torch.testing.assert_close(delta_weights(in_memory, 2.0)[m], deltas[m])
    with pytest.raises(ValueError, match="lora_B"):
        delta_weights({f"{m}.lora_A.weight": adapter[f"{m}.lora_A.weight"]}, 1.0)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merging_identical_adapters_reproduces_the_delta(method: str) -> None:
    delta = delta_weights(_adapter(5), 2.0)
    merged = merge_deltas([delta, delta, delta], method, density=1.0)
    for module in delta:
        torch.testing.assert_close(merged[module], delta[module])


def test_linear_merge_is_the_weighted_sum() -> None:
    d1, d2 = delta_weights(_adapter(6), 1.0), delta_weights(_adapter(7), 1.0)
    merged = merge_deltas([d1, d2], "linear", weights=[0.3, 1.5])
    for module in d1:
        torch.testing.assert_close(merged[module], 0.3 * d1[module] + 1.5 * d2[module])


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_pruning_merges_shapes_and_seed_determinism(method: str) -> None:
    deltas = [delta_weights(_adapter(i), 2.0) for i in range(3)]
    a = merge_deltas(deltas, method, density=0.5, seed=7)
    b = merge_deltas(deltas, method, density=0.5, seed=7)
    for module, (fan_out, fan_in) in MODULES.items():
        key = f"base_model.model.{module}"
        assert a[key].shape == (fan_out, fan_in)
        assert torch.equal(a[key], b[key])
        assert torch.isfinite(a[key]).all()
    if method.startswith("dare"):
        c = merge_deltas(deltas, method, density=0.5, seed=8)
        assert any(not torch.equal(a[k], c[k]) for k in a)
    state = torch.random.get_rng_state()
    merge_deltas(deltas, method, density=0.5, seed=9)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG stream is untouched


def test_deltas_to_lora_round_trip_at_sum_of_ranks_is_exact() -> None:
    adapters = [_adapter(i, rank=3) for i in range(3)]
    merged = merge_deltas([delta_weights(a, 2.0) for a in adapters], "linear", weights=[1.0, 0.5, 2.0])
    lora = deltas_to_lora(merged, rank=9, scaling=2.0)
    back = delta_weights(lora, 2.0)
    for module, delta in merged.items():
        assert lora[f"{module}.lora_A.weight"].shape == (9, delta.shape[1])
        assert lora[f"{module}.lora_B.weight"].shape == (delta.shape[0], 9)
        torch.testing.assert_close(back[module], delta, rtol=1e-5, atol=1e-5)
    # A smaller rank is the best rank-k approximation: its error is the tail of the singular values.
    low = delta_weights(deltas_to_lora(merged, rank=4, scaling=2.0), 2.0)
    module = next(iter(merged))
    s = torch.linalg.svdvals(merged[module])
    err = torch.linalg.matrix_norm(low[module] - merged[module])
    assert err.item() == pytest.approx(s[4:].norm().item(), rel=1e-4)


def test_deltas_to_lora_pads_small_modules_to_the_rank() -> None:
    delta = {"m": torch.randn(3, 5, generator=torch.Generator().manual_seed(0))}
    lora = deltas_to_lora(delta, rank=8)
    assert lora["m.lora_A.weight"].shape == (8, 5) and lora["m.lora_B.weight"].shape == (3, 8)
    torch.testing.assert_close(lora["m.lora_B.weight"] @ lora["m.lora_A.weight"], delta["m"], rtol=1e-5, atol=1e-5)
