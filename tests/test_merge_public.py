"""`merge --method average|sum|weighted`: the public Flow-OPD scripts/merge.py modes (issue 18, point 6).

The public script (Flow-OPD 434ab16, ``merge_lora_weights``) combines, per key of ``adapter_model.safetensors``,
``torch.stack(tensors).mean(0)`` (average), ``.sum(0)`` (sum) or ``sum(t * w_k)`` with ``w = w / w.sum()``
(weighted), needs at least two adapters, and copies the first adapter's ``adapter_config.json``. Those lines
are the reference below, applied to the same small float32 adapters as our CLI.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from _fixtures import MINI_SMALL
from safetensors.torch import load_file

from flowopd.train.__main__ import main as train_main
from flowopd.train.lora import add_lora, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    from flowopd.models.mini import MiniTokenizer, build_mini, load_mini, save_mini

    root = tmp_path_factory.mktemp("merge_public")
    torch.manual_seed(0)
    save_mini(build_mini(MiniTokenizer.from_grammar(max_length=20), **MINI_SMALL), root / "base")
    out = {"base": root / "base"}
    for i, name in enumerate("abc"):
        torch.manual_seed(70 + i)
        model = add_lora(load_mini(root / "base").net, 4, 8, init=False, base_model=str(root / "base"))
        out[name] = save_adapter(model, root / name)
    return out


def _public(tensors: list[dict[str, torch.Tensor]], mode: str, weights: list[float] | None = None):
    merged = {}
    for key in tensors[0]:
        stack = [t[key] for t in tensors]
        if mode == "average":
            merged[key] = torch.stack(stack).mean(dim=0)
        elif mode == "sum":
            merged[key] = torch.stack(stack).sum(dim=0)
        else:
            w = torch.tensor(weights, dtype=torch.float32)
            w = w / w.sum()
            merged[key] = sum(t * w[i] for i, t in enumerate(stack))
    return merged


@pytest.mark.parametrize("mode, weights", [("average", None), ("sum", None), ("weighted", ["3", "1", "0.5"])])
def test_the_public_modes_match_the_public_script(adapters, tmp_path, mode, weights, caplog):
    out = tmp_path / mode
    args = ["merge", "--adapters", *(str(adapters[k]) for k in "abc"), "--method", mode, "--out", str(out)]
    with caplog.at_level(logging.WARNING):
        assert train_main([*args, *(["--weights", *weights] if weights else [])]) == 0
    ours = load_file(out / "adapter_model.safetensors")
    inputs = [load_file(adapters[k] / "adapter_model.safetensors") for k in "abc"]
    reference = _public(inputs, mode, [float(w) for w in weights] if weights else None)
    assert ours.keys() == reference.keys()
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in ours)
    assert worst <= 1e-7, worst  # float32 in and out: the same sums up to rounding order
    assert all(ours[k].dtype == reference[k].dtype == torch.float32 for k in ours)
    config, first = (json.loads((d / "adapter_config.json").read_text()) for d in (out, adapters["a"]))
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        first["r"], first["lora_alpha"], first["target_modules"])
    warned = any("n^2" in r.getMessage() or "9 x their update" in r.getMessage() for r in caplog.records)
    assert warned == (mode == "sum")


@pytest.mark.parametrize("args, message", [
    (["--method", "average", "--weights", "1", "2"], "takes no --weights"),
    (["--method", "sum", "--weights", "1", "2"], "takes no --weights"),
    (["--method", "weighted"], "needs --weights"),
    (["--method", "weighted", "--weights", "1"], "2 adapters"),
])
def test_bad_public_merge_arguments_are_refused_in_one_line(adapters, tmp_path, capsys, args, message):
    two = [str(adapters["a"]), str(adapters["b"])]
    code = train_main(["merge", "--adapters", *two, "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_single_adapter_is_refused_by_the_public_modes(adapters, tmp_path, capsys):
    code = train_main(["merge", "--adapters", str(adapters["a"]), "--method", "average", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "at least 2 adapters" in err and "Traceback" not in err
