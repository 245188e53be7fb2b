"""One base config (issue 21): the fields GRPO, OPD and SFT share are declared once, in TrainConfig; a recipe's
config re-declares a shared field only to give it a default (or a meaning) of its own; every field rule applies
to inherited fields; ``--help`` lists the shared fields first, in TrainConfig's order."""

from __future__ import annotations

import dataclasses

import pytest

from flowopd.rewards import ANY_TASK
from flowopd.train.config import ConfigError, RewardConfig, TrainConfig, describe_fields, load_config
from flowopd.train.grpo import GRPOConfig
from flowopd.train.opd import OPDConfig
from flowopd.train.sft import SFTConfig

RECIPES = [GRPOConfig, OPDConfig, SFTConfig]
SHARED = [f.name for f in dataclasses.fields(TrainConfig)]


def _default(f: dataclasses.Field) -> object:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_a_shared_field_is_redeclared_only_to_change_it(cls):
    assert issubclass(cls, TrainConfig)
    base = {f.name: f for f in dataclasses.fields(cls.__mro__[1])}
    for name in cls.__dict__.get("__annotations__", {}):
        if name in base:
            mine = cls.__dataclass_fields__[name]
            changed = (_default(mine) != _default(base[name]), mine.metadata["help"] != base[name].metadata["help"])
            assert any(changed), f"{cls.__name__}.{name} repeats its base's declaration"


def test_sft_has_the_shared_fields_and_its_own_only():
    own = [f.name for f in dataclasses.fields(SFTConfig) if f.name not in SHARED]
    assert own == ["data", "teachers", "best_of_n", "sample_steps", "train_batch_size", "epochs_per_iteration",
                   "anchor_weight", "time_sampling", "logit_mean", "logit_std", "time_shift", "time_grid",
                   "data_noise_level", "loss_guidance_scale"]
    defaults = {f.name: _default(f) for f in dataclasses.fields(SFTConfig)}
    assert (defaults["learning_rate"], defaults["ema"], defaults["mix"], defaults["output_dir"]) == (
        1e-4, False, "prompt", "runs/sft")


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_help_lists_the_shared_fields_first(cls):
    keys = [line.split(" = ")[0].strip() for line in describe_fields(cls).splitlines()[1:]]
    assert keys[: len(SHARED)] == SHARED and len(keys) == len(set(keys)) == len(dataclasses.fields(cls))


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("override", "message"), [
    ("mix=sometimes", r"'mix' must be one of \['iteration', 'prompt'\], got 'sometimes'"),
    ("lora_rank=0", r"'lora_rank' must be an integer >= 1, got 0"),
    ("prompts=[{task='x', weight=-1}]", r"'prompts\[0\]\.weight' must be a finite number > 0, got -1"),
])
def test_the_rules_of_shared_fields_hold_in_every_recipe(cls, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cls, None, [override])


def test_reward_terms_by_task():
    assert not RewardConfig().is_set()
    reward = RewardConfig(weights={"mini-ocr": 1.0}, tasks={"geneval": {"mini-geneval": 0.8, "mini-quality": 0.2}})
    assert reward.is_set() and RewardConfig(tasks={"ocr": {"mini-ocr": 1.0}}).is_set()
    terms = reward.terms_by_task()
    assert terms == {"geneval": {"mini-geneval": 0.8, "mini-quality": 0.2}, ANY_TASK: {"mini-ocr": 1.0}}
    terms["geneval"]["mini-geneval"] = 0.0  # a copy: the config is left as it was
    assert reward.tasks["geneval"]["mini-geneval"] == 0.8
