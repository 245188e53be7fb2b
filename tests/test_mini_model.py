"""The mini world's policy: tokenizer, shapes, CFG, the Policy contract, save/load, LoRA injection."""

from __future__ import annotations

import json

import pytest
import torch

from flowopd.models.mini import (
    BOS_ID,
    LORA_TARGET_MODULES,
    PAD_ID,
    QUOTE_ID,
    UNK_ID,
    MiniPolicy,
    MiniTokenizer,
    build_mini,
    load_mini,
    save_mini,
)
from flowopd.models.policy import Policy, index_cond
from flowopd.sampling import sample_ode

SMALL = {"channels": [8, 16, 16], "text_dim": 16, "text_layers": 1, "heads": 2, "cond_dim": 16, "groups": 4}


@pytest.fixture(scope="module")
def tokenizer() -> MiniTokenizer:
    return MiniTokenizer.from_grammar(max_length=20)


@pytest.fixture
def policy(tokenizer: MiniTokenizer) -> MiniPolicy:
    torch.manual_seed(0)
    p = build_mini(tokenizer, **SMALL)
    with torch.no_grad():  # the output conv starts at zero; perturb it so outputs depend on every input
        p.net.conv_out.weight.normal_(std=0.1)
    return p.eval()


def test_tokenizer_words_quotes_and_unknowns(tokenizer: MiniTokenizer) -> None:
    tokens, mask = tokenizer(['a sign that says "B7"', "a photo of a zebra", ""])
    assert tokens.shape == mask.shape == (3, 20)
    sign = [tokenizer.tokens[i] for i in tokens[0, : int(mask[0].sum())]]
    assert sign == ["<bos>", "a", "sign", "that", "says", "<q>", "c:B", "c:7", "<q>"]
    assert tokens[0, 5] == tokens[0, 8] == QUOTE_ID
    assert tokens[1, 5] == UNK_ID  # "zebra" is not in the grammar
    assert tokens[2, 0] == BOS_ID and mask[2].sum() == 1  # the empty prompt keeps <bos>
    assert (tokens[~mask] == PAD_ID).all()
    # words are case-insensitive, quoted characters are not
    assert tokenizer.encode("A Photo") == tokenizer.encode("a photo")
    assert tokenizer.encode('"b"')[2] == UNK_ID


def test_tokenizer_covers_every_grammar_prompt(tokenizer: MiniTokenizer) -> None:
    from flowopd.world.grammar import prompt_set

    for task, split in [("geneval", "test"), ("geneval", "heldout"), ("ocr", "test"), ("compbench", "heldout")]:
        for meta in prompt_set(task, split):
            ids = [tokenizer.index.get(t, UNK_ID) for t in tokenizer.tokenize(meta["prompt"])]
            assert UNK_ID not in ids, meta["prompt"]
            assert len(ids) + 1 <= tokenizer.max_length, meta["prompt"]


def test_forward_shapes_and_default_size(tokenizer: MiniTokenizer) -> None:
    full = build_mini(tokenizer)
    n_params = sum(p.numel() for p in full.parameters())
    assert 1.0e6 < n_params < 3.0e6
    cond = full.encode_prompts(["a photo of a red circle", 'a sign that says "BC"'])
    x = torch.randn(2, 3, 32, 32)
    v = full(x, torch.tensor([0.3, 0.9]), cond["tokens"], cond["mask"])
    assert v.shape == (2, 3, 32, 32) and v.dtype == torch.float32
    assert set(cond) == {"tokens", "mask", "negative_tokens", "negative_mask"}
    assert all(c.shape[0] == 2 for c in cond.values())


def test_cfg_combines_conditional_and_unconditional(policy: MiniPolicy) -> None:
    cond = policy.encode_prompts(["a photo of two squares", "a photo of a blue triangle"])
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 0.2])
    with torch.no_grad():
        v_cond = policy(x, t, cond["tokens"], cond["mask"])
        v_uncond = policy(x, t, cond["negative_tokens"], cond["negative_mask"])
        assert torch.equal(policy.velocity(x, t, cond, 1.0), v_cond)
        torch.testing.assert_close(policy.velocity(x, t, cond, 4.0), v_uncond + 4.0 * (v_cond - v_uncond))
    assert not torch.allclose(v_cond, v_uncond)  # the prompt matters


def test_policy_protocol_and_sampling(policy: MiniPolicy) -> None:
    assert isinstance(policy, Policy)
    cond = policy.encode_prompts(["a photo of a circle", "a photo of three squares", 'a sign that says "TUX"'])
    images = sample_ode(policy, cond, policy.initial_noise([0, 1, 2], 32, 32), num_steps=4, guidance_scale=3.0)
    assert images.shape == (3, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    # a sample depends only on its own prompt and seed, not on its batch
    one = sample_ode(policy, index_cond(cond, [1]), policy.initial_noise([1], 32, 32), 4, 3.0)
    torch.testing.assert_close(one, images[1:2], atol=1e-5, rtol=0)


def test_initial_noise_batch_equals_one_by_one(policy: MiniPolicy) -> None:
    batch = policy.initial_noise([3, 7, 11], 32, 32)
    single = torch.cat([policy.initial_noise([s], 32, 32) for s in (3, 7, 11)])
    assert batch.shape == (3, 3, 32, 32) and torch.equal(batch, single)
    assert not torch.equal(batch[0], batch[1])


def test_timesteps_and_decode(policy: MiniPolicy) -> None:
    times = policy.timesteps(20)
    assert times.shape == (21,) and times.dtype == torch.float32
    assert times[0] == 1.0 and times[-1] == 0.0 and (times.diff() < 0).all()
    policy.shift = 3.0
    shifted = policy.timesteps(4)
    torch.testing.assert_close(shifted[2], torch.tensor(3 * 0.5 / (1 + 2 * 0.5)))
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert policy.decode(x)[0, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_save_load_round_trip(policy: MiniPolicy, tmp_path) -> None:
    policy.shift = 2.0
    save_mini(policy, tmp_path / "ckpt", extra={"sampling": {"num_steps": 20}})
    loaded = load_mini(tmp_path / "ckpt")
    assert loaded.shift == 2.0 and loaded.tokenizer.tokens == policy.tokenizer.tokens
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["extra"]["sampling"]["num_steps"] == 20
    cond = policy.encode_prompts(["a photo of a red circle left of a square"])
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([0.7])
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, t, cond, 4.0), policy.velocity(x, t, cond, 4.0))
    # half-precision storage loads back as float32, close to the original
    save_mini(policy, tmp_path / "half", dtype=torch.float16)
    half = load_mini(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    with torch.no_grad():
        torch.testing.assert_close(half.velocity(x, t, cond, 4.0), policy.velocity(x, t, cond, 4.0), atol=2e-2, rtol=0)


def test_load_missing_name_lists_available(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="available names"):
        load_mini("mini:no-such-model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_mini(tmp_path)


def test_lora_injection_trains_only_adapters(policy: MiniPolicy) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    cond = policy.encode_prompts(["a photo of a green square"])
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([0.5])
    with torch.no_grad():
        before = policy.velocity(x, t, cond, 4.0)
    net = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGET_MODULES)), policy.net)
    assert net is policy.net
    lora_modules = {name.rsplit(".lora_", 1)[0] for name, _ in net.named_parameters() if ".lora_" in name}
    # every joint attention block got all eight projections; the text encoder got none
    assert len(lora_modules) == 3 * len(LORA_TARGET_MODULES)
    assert not any(name.startswith("text_encoder") for name in lora_modules)
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)

    with torch.no_grad():  # lora_B starts at zero: the adapted model starts as the base
        torch.testing.assert_close(policy.velocity(x, t, cond, 4.0), before)
    policy.velocity(x, t, cond, 4.0).pow(2).mean().backward()
    grads = {name for name, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".lora_B" in name for name in grads) and all(".lora_" in name for name in grads)
