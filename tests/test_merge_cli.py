"""The merge cold start through ``python -m flowopd.train merge`` (issue 7 point 1) on adapters saved to disk:
factor-mean is the element-wise mean of the factors; a linear merge of identical adapters reproduces their
weight update; the merged directory loads with load_policy; mismatched bases are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import MINI_SMALL
from safetensors.torch import load_file

from flowopd.train.__main__ import main as train_main
from flowopd.train.lora import add_lora, save_adapter
from flowopd.train.merge import delta_weights
from flowopd.train.merge_cli import lora_scaling

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A small random mini base and three random rank-4 adapters on it (B non-zero)."""
    from flowopd.models.mini import MiniTokenizer, build_mini, load_mini, save_mini

    root = tmp_path_factory.mktemp("merge_world")
    torch.manual_seed(0)
    policy = build_mini(MiniTokenizer.from_grammar(max_length=20), **MINI_SMALL)
    torch.nn.init.normal_(policy.net.conv_out.weight, std=0.1)
    save_mini(policy, root / "base")
    out = {"base": root / "base"}
    for i, name in enumerate(["a", "b", "c"]):
        torch.manual_seed(40 + i)
        model = add_lora(load_mini(root / "base").net, 4, 8, init=False, base_model=str(root / "base"))
        out[name] = save_adapter(model, root / name)
    return out


def _velocity(policy) -> torch.Tensor:
    cond = policy.encode_prompts(["two red circles", 'a sign that says "ab"'])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return policy.velocity(x, torch.tensor([0.7, 0.4]), cond, 4.0)


def test_factor_mean_is_the_elementwise_mean_of_a_and_b(world, tmp_path):
    out = tmp_path / "fm"
    assert train_main(["merge", "--adapters", str(world["a"]), str(world["b"]), "--method", "factor-mean",
                       "--out", str(out)]) == 0
    a, b = (load_file(world[k] / "adapter_model.safetensors") for k in "ab")
    merged = load_file(out / "adapter_model.safetensors")
    assert merged.keys() == a.keys() and any("lora_A" in k for k in a) and any("lora_B" in k for k in a)
    for k in a:
        assert torch.allclose(merged[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-7), k
    config, source = (json.loads((d / "adapter_config.json").read_text()) for d in (out, world["a"]))
    assert (config["r"], config["lora_alpha"]) == (source["r"], source["lora_alpha"])
    assert config["base_model_name_or_path"] == str(world["base"])
    assert json.loads((out / "merge.json").read_text())["method"] == "factor-mean"
    # weights are normalised to sum 1, as the public scripts/merge.py
    weighted = tmp_path / "weighted"
    assert train_main(["merge", "--adapters", str(world["a"]), str(world["b"]), "--method", "factor-mean",
                       "--weights", "3", "1", "--out", str(weighted)]) == 0
    merged = load_file(weighted / "adapter_model.safetensors")
    assert all(torch.allclose(merged[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-7) for k in a)


def test_linear_merge_of_identical_adapters_reproduces_the_update_and_loads(world, tmp_path):
    from flowopd.models.loading import load_policy

    out = tmp_path / "lin"
    assert train_main(["merge", "--adapters", str(world["a"]), str(world["a"]), "--method", "linear",
                       "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(world["base"])
    source = json.loads((world["a"] / "adapter_config.json").read_text())
    original = delta_weights(load_file(world["a"] / "adapter_model.safetensors"), lora_scaling(source))
    merged = delta_weights(load_file(out / "adapter_model.safetensors"), lora_scaling(config))
    assert merged.keys() == original.keys()
    for k in original:
        assert torch.allclose(merged[k], original[k], rtol=1e-4, atol=1e-6), k
    # the merged directory is a working adapter: same velocity as the source adapter, not the base's
    v_merged, v_source = _velocity(load_policy(str(out))), _velocity(load_policy(str(world["a"])))
    assert torch.allclose(v_merged, v_source, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(v_merged, _velocity(load_policy(str(world["base"]))), atol=1e-4)


def test_linear_merge_is_the_mean_update_and_ties_runs(world, tmp_path):
    lin, ties = tmp_path / "lin3", tmp_path / "ties"
    adapters = [str(world[k]) for k in "abc"]
    assert train_main(["merge", "--adapters", *adapters, "--method", "linear", "--out", str(lin)]) == 0
    assert train_main(["merge", "--adapters", *adapters, "--method", "ties", "--density", "0.5", "--rank", "6",
                       "--out", str(ties)]) == 0
    deltas = []
    for k in "abc":
        source = json.loads((world[k] / "adapter_config.json").read_text())
        deltas.append(delta_weights(load_file(world[k] / "adapter_model.safetensors"), lora_scaling(source)))
    config = json.loads((lin / "adapter_config.json").read_text())
    merged = delta_weights(load_file(lin / "adapter_model.safetensors"), lora_scaling(config))
    assert config["r"] == 12  # the sum of the ranks: exact
    for m in merged:
        assert torch.allclose(merged[m], sum(d[m] for d in deltas) / 3, rtol=1e-4, atol=1e-6), m
    t_config = json.loads((ties / "adapter_config.json").read_text())
    t_state = load_file(ties / "adapter_model.safetensors")
    assert t_config["r"] == 6 and all(v.shape[0 if "lora_A" in k else 1] == 6 for k, v in t_state.items())


def test_adapters_of_different_bases_are_refused(world, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((world["b"] / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "mini:elsewhere"}))
    (other / "adapter_model.safetensors").write_bytes((world["b"] / "adapter_model.safetensors").read_bytes())
    # python -m flowopd.train's error boundary: one line and exit status 2
    assert train_main(["merge", "--adapters", str(world["a"]), str(other), "--method", "linear", "--out",
                       str(tmp_path / "x")]) == 2
    assert "different bases" in capsys.readouterr().err
    assert train_main(["merge", "--adapters", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "no peft adapter" in capsys.readouterr().err
