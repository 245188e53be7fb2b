"""benchmarks/perf/sd35m_perf.py: a tiny CPU run of the whole script, its CPU guard, and the SD3.5-M sizes.

The script's numbers are meant for a GPU (reports/perf.md); here only its plumbing is checked: both samplers
and a GRPO step run, the report says what ran where, and the step trains the adapter and nothing else.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "sd35m_perf.py"

TINY_ARGS = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--repeats", "1",
             "--warmup", "0", "--batch", "2", "--resolution", "32", "--grpo-group", "2", "--grpo-steps", "3"]

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json, written out independently of the script.
PUBLISHED_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("sd35m_perf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sd35m_perf"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("sd35m_perf", None)


def _row(markdown: str, start: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_tiny_run_times_both_samplers_and_trains_only_the_adapter(perf, tmp_path, monkeypatch, one_thread, capsys):
    results = []
    real_run = perf.run
    monkeypatch.setattr(perf, "run", lambda args: results.append(real_run(args)) or results[-1])
    out = tmp_path / "reports" / "perf.md"

    assert perf.main([*TINY_ARGS, "--out", str(out)]) == 0
    (result,) = results
    md = out.read_text()
    assert md == result.markdown and md in capsys.readouterr().out
    m = result.measurements

    assert "- Device: **cpu** (`cpu`" in md
    assert f"torch {torch.__version__}" in md and "--config tiny" in md and "fp32" in md
    assert "python benchmarks/perf/sd35m_perf.py --config tiny --device cpu" in md
    assert "## Sampling: 2 steps, CFG 4.5, 32x32, batch 2" in md
    ours, stock = _row(md, "| ours"), _row(md, "| diffusers")
    assert float(ours[2]) > 0 and float(stock[2]) > 0  # images / s
    assert float(ours[1]) > 0 and float(stock[1]) > 0  # s / batch
    ratio = float(re.search(r"Ratio ours / stock \(images/s\): ([0-9.eE+-]+)", md).group(1))
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(m["ours_images_per_s"] / m["stock_images_per_s"], rel=1e-2)
    # the same denoising + decode work: in float32 both samplers give the same images from the same noise
    assert m["max_abs_image_diff"] < 1e-4

    rollout, train = _row(md, "| rollout"), _row(md, "| training step")
    assert float(rollout[1]) > 0 and float(train[1]) > 0
    assert m["grpo_trained_steps"] == 2  # int(3 x 0.99) of 3 SDE steps, as GRPOConfig.timestep_fraction says
    assert math.isfinite(m["train_loss"]) and m["train_grad_norm"] > 0

    # exactly one optimizer step ran (warm-up 0, 1 repeat): the adapter moved, the base weights did not
    model = result.policy.transformer
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(bool(p.ne(0).any()) for n, p in lora.items() if "lora_B" in n)  # gaussian init: B starts at 0
    assert m["lora_update_max_abs"] > 0
    fresh = perf.build_pipeline(perf.SIZES["tiny"], torch.device("cpu"), torch.float32, seed=0).transformer
    expected = dict(fresh.named_parameters())
    base = {re.sub(r"^.*?base_model\.model\.", "", n).replace(".base_layer", ""): p
            for n, p in model.named_parameters() if "lora_" not in n}
    assert sorted(base) == sorted(expected)
    changed = [n for n, p in base.items() if not torch.equal(p, expected[n])]
    assert not changed and not any(p.requires_grad for p in base.values())


def test_sd35m_on_cpu_needs_allow_cpu(perf, capsys):
    with pytest.raises(SystemExit) as exit_info:
        perf.main(["--config", "sd35m", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--config sd35m on cpu would take hours" in err and "--allow-cpu" in err and "--config tiny" in err
    args = perf.parse_args(["--config", "sd35m", "--device", "cpu", "--allow-cpu"])  # allowed when asked
    assert (args.batch, args.resolution, args.steps, args.guidance, args.grpo_steps) == (8, 512, 40, 4.5, 10)


def test_sd35m_sizes_are_the_published_ones(perf):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from flowopd.train.lora import add_lora

    assert perf.SD35M_TRANSFORMER == PUBLISHED_TRANSFORMER
    assert set(perf.SD35M_TRANSFORMER) <= set(inspect.signature(SD3Transformer2DModel.__init__).parameters)
    assert perf.SD3_TEXT_TOKENS == 333

    transformer = perf.build_transformer(perf.SIZES["sd35m"], "meta")  # allocates nothing
    assert all(p.is_meta for p in transformer.parameters())
    built = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in transformer.config.items()}
    assert {k: built[k] for k in PUBLISHED_TRANSFORMER} == PUBLISHED_TRANSFORMER
    n = sum(p.numel() for p in transformer.parameters())
    assert 2.2e9 < n < 2.3e9, n  # SD3.5-M's transformer: ~2.24 B parameters
    assert [i for i, b in enumerate(transformer.transformer_blocks) if b.attn2 is not None] == list(range(13))
    # the published LoRA targets adapt the joint attention of all 24 blocks and none of the 13 attn2 modules:
    # 24 x (to_q, to_k, to_v, to_out.0, add_q/k/v_proj) + 23 to_add_out (the last block has no context output)
    adapted = add_lora(transformer)
    n_lora = sum(p.numel() for n, p in adapted.named_parameters() if p.requires_grad)
    assert n_lora == (24 * 7 + 23) * 32 * (1536 + 1536)
    assert not any("attn2" in n for n, p in adapted.named_parameters() if p.requires_grad)

    with torch.device("meta"):
        vae = AutoencoderKL(**perf.SD35M_VAE)
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (16, 1.5305, 0.0609)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 90e6  # SD3's VAE: ~84 M parameters
