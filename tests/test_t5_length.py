"""T5 prompt length 128 (the public Flow-GRPO / Flow-OPD encoding) as a generation setting (issue 18, point 6)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from _tiny_sd3 import tiny_sd3_pipeline

from flowopd.bench.images import apply_generation_settings, image_set_key
from flowopd.bench.spec import GenerationSpec, SpecError, all_specs, parse_spec
from flowopd.models.sd3 import SD3Policy
from flowopd.train.config import ConfigError, load_config
from flowopd.train.grpo import GRPOConfig
from flowopd.train.runtime import prepare_policy

ROOT = Path(__file__).resolve().parents[1]


def test_every_sd35m_spec_and_recipe_encodes_at_128():
    sd35m = [s for s in all_specs().values() if s.scale_name == "sd35m"]
    assert len(sd35m) >= 15
    assert {s.name: s.generation.max_sequence_length for s in sd35m} == {s.name: 128 for s in sd35m}
    mini = [s for s in all_specs().values() if s.scale_name == "mini"]
    assert mini and all(s.generation.max_sequence_length is None for s in mini)
    for recipe in sorted((ROOT / "training" / "configs").glob("*.toml")):
        text = recipe.read_text()
        if 'model = "stabilityai/stable-diffusion-3.5-medium"' in text:
            assert "\nmax_sequence_length = 128" in text, recipe.name
    assert GRPOConfig().max_sequence_length == 128


def test_the_length_is_in_the_record_and_the_image_key_but_unset_is_left_out():
    base = GenerationSpec()
    assert "max_sequence_length" not in base.record()  # records made before the setting still compare equal
    long_, short = (dataclasses.replace(base, max_sequence_length=n) for n in (256, 128))
    assert short.record()["max_sequence_length"] == 128
    keys = [image_set_key({"id": "x"}, "geneval", "0" * 64, g, "x") for g in (base, long_, short)]
    assert keys[0] != keys[1] != keys[2] != keys[0]  # images made at 256 tokens never serve 128


def test_a_bad_length_in_a_spec_is_refused():
    data = {"name": "x", "version": "1", "description": "", "scorer": "ocr",
            "prompts": {"format": "lines", "path": "flowgrpo/ocr/test.txt"},
            "generation": {"max_sequence_length": 0}}
    with pytest.raises(SpecError, match="max_sequence_length"):
        parse_spec(data, "x.toml")
    with pytest.raises(ConfigError, match="max_sequence_length"):
        load_config(GRPOConfig, None, ["max_sequence_length=-3"])


def test_the_length_reaches_the_t5_encoder(tmp_path):
    policy = SD3Policy(tiny_sd3_pipeline(tmp_path))
    lengths = {}
    for n in (128, 256):
        apply_generation_settings(policy, GenerationSpec(max_sequence_length=n))
        assert policy.max_sequence_length == n
        lengths[n] = policy.encode_prompts(["a red cube"])["embeds"].shape[1]
    assert lengths[256] - lengths[128] == 128  # CLIP's 77 tokens + T5's max_sequence_length
    config = load_config(GRPOConfig, None, ["max_sequence_length=128"])
    policy.max_sequence_length = 256
    prepare_policy(policy, config)  # the trainers set it on the policy they train
    assert policy.max_sequence_length == 128


def test_a_length_for_a_policy_without_t5_is_refused():
    from flowopd.models.mini import load_mini

    policy = load_mini("mini:base")
    apply_generation_settings(policy, GenerationSpec())  # unset: nothing to do
    with pytest.raises(ValueError, match="max_sequence_length"):
        apply_generation_settings(policy, GenerationSpec(max_sequence_length=128))
    assert torch.is_tensor(policy.initial_noise([0], 32, 32))
