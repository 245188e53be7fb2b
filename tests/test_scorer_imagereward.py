"""ImageRewardScorer: a tiny checkpoint with the OFFICIAL key names, loaded through the key mapping, checked against
a direct computation of the official BLIP ViT + med.py BERT + MLP forward written from ImageReward's source."""

from __future__ import annotations

import math
from copy import deepcopy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowopd.scorers.clip_common import clip_pixel_values
from flowopd.scorers.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardScorer,
    convert_official_state_dict,
    load_imagereward,
    official_key_to_ours,
)

VW, VP, VDEPTH, VHEADS, IMG = 48, 8, 2, 4, 32  # vision width, patch, depth, heads, image size
TH, TLAYERS, THEADS, TMAXPOS = 32, 2, 4, 64  # text hidden, layers, heads, max positions
WORDS = ["a", "red", "cube", "two", "dogs", "playing", "in", "the", "snow", "at", "night", "cat", "photo", "of"]


def tiny_bert_tokenizer():
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokens += [c for c in "bcdefghijklmnopqrstuvwxyz" if c not in tokens]
    tokens += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP does
    return tokenizer


def official_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named as the official ImageReward.pt (ImageReward -> BLIP_Pretrain/VisionTransformer/med.py)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    ve = "blip.visual_encoder."
    sd = {
        ve + "cls_token": r(1, 1, VW), ve + "pos_embed": r(1, (IMG // VP) ** 2 + 1, VW),
        ve + "patch_embed.proj.weight": r(VW, 3, VP, VP, scale=0.05), ve + "patch_embed.proj.bias": r(VW),
        ve + "norm.weight": 1 + r(VW), ve + "norm.bias": r(VW),
        "blip.vision_proj.weight": r(256, VW), "blip.vision_proj.bias": r(256),
        "blip.text_proj.weight": r(256, TH), "blip.text_proj.bias": r(256),
    }
    for i in range(VDEPTH):
        b = f"{ve}blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(VW), b + "norm1.bias": r(VW),
            b + "norm2.weight": 1 + r(VW), b + "norm2.bias": r(VW),
            b + "attn.qkv.weight": r(3 * VW, VW), b + "attn.qkv.bias": r(3 * VW),
            b + "attn.proj.weight": r(VW, VW), b + "attn.proj.bias": r(VW),
            b + "mlp.fc1.weight": r(4 * VW, VW), b + "mlp.fc1.bias": r(4 * VW),
            b + "mlp.fc2.weight": r(VW, 4 * VW), b + "mlp.fc2.bias": r(VW),
        })
    te = "blip.text_encoder."
    sd.update({
        te + "embeddings.word_embeddings.weight": r(vocab, TH),
        te + "embeddings.position_embeddings.weight": r(TMAXPOS, TH),
        te + "embeddings.LayerNorm.weight": 1 + r(TH), te + "embeddings.LayerNorm.bias": r(TH),
        te + "embeddings.position_ids": torch.arange(TMAXPOS).unsqueeze(0),
    })
    for i in range(TLAYERS):
        b = f"{te}encoder.layer.{i}."
        for att, kv_width in (("attention", TH), ("crossattention", VW)):
            sd.update({
                f"{b}{att}.self.query.weight": r(TH, TH), f"{b}{att}.self.query.bias": r(TH),
                f"{b}{att}.self.key.weight": r(TH, kv_width), f"{b}{att}.self.key.bias": r(TH),
                f"{b}{att}.self.value.weight": r(TH, kv_width), f"{b}{att}.self.value.bias": r(TH),
                f"{b}{att}.output.dense.weight": r(TH, TH), f"{b}{att}.output.dense.bias": r(TH),
                f"{b}{att}.output.LayerNorm.weight": 1 + r(TH), f"{b}{att}.output.LayerNorm.bias": r(TH),
            })
        sd.update({
            b + "intermediate.dense.weight": r(4 * TH, TH), b + "intermediate.dense.bias": r(4 * TH),
            b + "output.dense.weight": r(TH, 4 * TH), b + "output.dense.bias": r(TH),
            b + "output.LayerNorm.weight": 1 + r(TH), b + "output.LayerNorm.bias": r(TH),
        })
    dims = [TH, 1024, 128, 64, 16, 1]
    for j, i in enumerate((0, 2, 4, 6, 7)):
        sd[f"mlp.layers.{i}.weight"] = r(dims[j + 1], dims[j], scale=1 / math.sqrt(dims[j]))
        sd[f"mlp.layers.{i}.bias"] = r(dims[j + 1])
    return sd


# --- the official forward, written from ImageReward/models/BLIP/{vit,med}.py and ImageReward.score


def _heads(x, n):  # (B, L, C) -> (B, n, L, C / n)
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def official_vit(sd, pixel_values):
    ve = "blip.visual_encoder."
    x = F.conv2d(pixel_values, sd[ve + "patch_embed.proj.weight"], sd[ve + "patch_embed.proj.bias"], stride=VP)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[ve + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[ve + "pos_embed"]
    for i in range(VDEPTH):
        b = f"{ve}blocks.{i}."
        h = F.layer_norm(x, (VW,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        B, N, C = h.shape
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, VHEADS, C // VHEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // VHEADS) ** -0.5).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, C),
                         sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (VW,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (VW,), sd[ve + "norm.weight"], sd[ve + "norm.bias"], eps=1e-6)


def _bert_attention(sd, p, x, context, additive_mask):
    q = _heads(F.linear(x, sd[p + "self.query.weight"], sd[p + "self.query.bias"]), THEADS)
    k = _heads(F.linear(context, sd[p + "self.key.weight"], sd[p + "self.key.bias"]), THEADS)
    v = _heads(F.linear(context, sd[p + "self.value.weight"], sd[p + "self.value.bias"]), THEADS)
    scores = q @ k.transpose(-1, -2) / math.sqrt(TH // THEADS) + additive_mask
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    out = F.linear(ctx, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
    return F.layer_norm(out + x, (TH,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps=1e-12)


def official_reward(sd, pixel_values, input_ids, attention_mask):
    te = "blip.text_encoder."
    image_embeds = official_vit(sd, pixel_values)
    L = input_ids.shape[1]
    x = sd[te + "embeddings.word_embeddings.weight"][input_ids] + sd[te + "embeddings.position_embeddings.weight"][:L]
    x = F.layer_norm(x, (TH,), sd[te + "embeddings.LayerNorm.weight"], sd[te + "embeddings.LayerNorm.bias"], eps=1e-12)
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py get_extended_attention_mask
    cross_mask = torch.zeros(1)  # image_atts are all ones
    for i in range(TLAYERS):
        b = f"{te}encoder.layer.{i}."
        x = _bert_attention(sd, b + "attention.", x, x, self_mask)
        x = _bert_attention(sd, b + "crossattention.", x, image_embeds, cross_mask)
        h = F.gelu(F.linear(x, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
        h = F.linear(h, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"])
        x = F.layer_norm(h + x, (TH,), sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"], eps=1e-12)
    h = x[:, 0].float()
    for i in (0, 2, 4, 6, 7):
        h = F.linear(h, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return (h.squeeze(-1) - REWARD_MEAN) / REWARD_STD


TINY_VISION = dict(hidden_size=VW, intermediate_size=4 * VW, num_hidden_layers=VDEPTH, num_attention_heads=VHEADS,
                   image_size=IMG, patch_size=VP)
PROMPTS = ["a red cube", "two dogs playing in the snow at night", "a photo of a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = tiny_bert_tokenizer()
    tiny_text = dict(vocab_size=len(tokenizer), hidden_size=TH, intermediate_size=4 * TH, num_hidden_layers=TLAYERS,
                     num_attention_heads=THEADS, max_position_embeddings=TMAXPOS)
    sd = official_state_dict(len(tokenizer))
    path = tmp_path_factory.mktemp("ir") / "ImageReward.pt"
    torch.save(sd, path)
    model = load_imagereward(str(path), TINY_VISION, tiny_text)
    return sd, path, model, tokenizer


def _images(n, h=IMG, w=IMG, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_mapped_model_equals_the_official_forward(tiny):
    sd, _, model, tokenizer = tiny
    images = _images(3, 40, 56)
    scores = ImageRewardScorer(factory=lambda: (model, tokenizer), device="cpu").score(images, PROMPTS, [{}] * 3).scores
    pixel_values = clip_pixel_values(images, IMG, backend="pil")
    text = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text["input_ids"].shape == (3, 35) and text["attention_mask"][0].sum() < 35  # padding is masked
    with torch.no_grad():
        expected = official_reward(sd, pixel_values, text["input_ids"], text["attention_mask"])
    np.testing.assert_allclose(scores, expected.double().numpy(), atol=1e-5)
    assert scores.dtype == np.float64 and scores.shape == (3,)


def test_every_official_key_is_mapped_to_the_right_parameter(tiny):
    sd, _, model, _ = tiny
    ours = model.state_dict()
    used = 0
    for key, value in sd.items():
        name = official_key_to_ours(key)
        if name is None:
            assert key.startswith(("blip.vision_proj", "blip.text_proj")) or key.endswith("position_ids")
            continue
        assert torch.equal(ours[name], value), key
        used += 1
    assert used == len(ours)  # every parameter of our model came from the checkpoint
    assert (official_key_to_ours("blip.visual_encoder.blocks.3.attn.proj.weight")
            == "vision.encoder.layers.3.self_attn.projection.weight")
    assert official_key_to_ours("mlp.layers.7.bias") == "head.layers.7.bias"
    with pytest.raises(KeyError, match="blip.text_decoder.cls.weight"):
        convert_official_state_dict({"blip.text_decoder.cls.weight": torch.zeros(1)})


def test_z_score_constants_and_text_length_are_the_official_ones():
    assert REWARD_MEAN == 0.16717362830052426 and REWARD_STD == 1.0333394966054072
    from flowopd.scorers.imagereward import TEXT_MAX_LENGTH

    assert TEXT_MAX_LENGTH == 35


def test_prompt_truncated_at_35_tokens(tiny):
    _, _, model, tokenizer = tiny
    scorer = ImageRewardScorer(factory=lambda: (model, tokenizer), device="cpu")
    base = "a red cube " * 11  # 33 words + [CLS] + [SEP] = 35 tokens
    images = _images(1)
    s1 = scorer.score(images, [base]).scores
    s2 = scorer.score(images, [base + "two dogs playing in the snow"]).scores  # only past token 35
    np.testing.assert_array_equal(s1, s2)


def test_batch_equals_one_by_one_and_deterministic(tiny):
    _, _, model, tokenizer = tiny
    images = _images(3)
    full = ImageRewardScorer(factory=lambda: (model, tokenizer), device="cpu", batch_size=3).score(images, PROMPTS)
    one = ImageRewardScorer(factory=lambda: (model, tokenizer), device="cpu", batch_size=1).score(images, PROMPTS)
    np.testing.assert_allclose(full.scores, one.scores, rtol=0, atol=1e-5)
    again = ImageRewardScorer(factory=lambda: (model, tokenizer), device="cpu", batch_size=3).score(images, PROMPTS)
    np.testing.assert_array_equal(full.scores, again.scores)


def test_bfloat16_encoders_keep_a_float32_head(tiny):
    _, _, model, tokenizer = tiny
    images = _images(2)
    fp32 = ImageRewardScorer(factory=lambda: (model, tokenizer), device="cpu").score(images, PROMPTS[:2]).scores
    copy = deepcopy(model)  # the scorer casts its model in place
    scorer = ImageRewardScorer(factory=lambda: (copy, tokenizer), device="cpu", dtype=torch.bfloat16)
    assert scorer.model.head.layers[0].weight.dtype == torch.float32
    assert scorer.model.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    bf16 = scorer.score(images, PROMPTS[:2]).scores
    assert np.allclose(bf16, fp32, atol=0.1)


def test_safetensors_copy_loads_the_same(tiny, tmp_path):
    from safetensors.torch import save_file

    sd, _, model, tokenizer = tiny
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ImageReward.safetensors")
    tiny_text = dict(vocab_size=len(tokenizer), hidden_size=TH, intermediate_size=4 * TH, num_hidden_layers=TLAYERS,
                     num_attention_heads=THEADS, max_position_embeddings=TMAXPOS)
    other = load_imagereward(str(tmp_path / "ImageReward.safetensors"), TINY_VISION, tiny_text)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_offline_loading_names_the_checkpoint_and_the_local_path_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"THUDM/ImageReward(.|\n)*model_id='/path/to/ImageReward.pt'"):
        ImageRewardScorer()
