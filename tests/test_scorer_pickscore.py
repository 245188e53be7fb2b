"""PickScoreScorer and the shared CLIP preprocessing (flowopd/scorers/clip_common.py) on a tiny random CLIP."""

from __future__ import annotations

import math
from copy import deepcopy

import numpy as np
import pytest
import torch
from PIL import Image

from flowopd.scorers import build_scorer
from flowopd.scorers.base import Scorer
from flowopd.scorers.clip_common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    clip_pixel_values,
    resize_shortest_center_crop,
    shortest_side_size,
)
from flowopd.scorers.pickscore import PickScoreScorer


def tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer without merges; <|endoftext|> has the highest id, as in CLIP's vocab."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(tokenizer, image_size: int = 32, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def parts():
    tokenizer = tiny_clip_tokenizer()
    return tiny_clip(tokenizer), tokenizer


@pytest.fixture(scope="module")
def scorer(parts):
    return PickScoreScorer(factory=lambda: parts, device="cpu")


PROMPTS = ["a red cube", "two dogs playing in the snow at night", "x", "a photo of a cat"]


def _images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_protocol_shape_dtype_and_version(scorer):
    batch = scorer.score(_images(4), PROMPTS, [{}] * 4)
    assert isinstance(scorer, Scorer)
    assert batch.scores.shape == (4,) and batch.scores.dtype == np.float64
    assert np.isfinite(batch.scores).all()
    assert "yuvalkirstain/PickScore_v1" in scorer.version and "injected" in scorer.version


def test_batch_equals_one_by_one_and_deterministic(parts):
    images = _images(4, size=48)
    batched = PickScoreScorer(factory=lambda: parts, device="cpu", batch_size=4).score(images, PROMPTS, [{}] * 4)
    single = PickScoreScorer(factory=lambda: parts, device="cpu", batch_size=1).score(images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(batched.scores, single.scores, rtol=0, atol=1e-5)
    again = PickScoreScorer(factory=lambda: parts, device="cpu", batch_size=4).score(images, PROMPTS, [{}] * 4)
    np.testing.assert_array_equal(batched.scores, again.scores)


def test_score_is_logit_scale_times_cosine(parts):
    model, tokenizer = parts
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    images = _images(2)  # 32x32 = the tiny model's input size: preprocessing is only uint8 rounding + mean/std
    scores = PickScoreScorer(factory=lambda: parts, device="cpu").score(images, PROMPTS[:2]).scores
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    pixel_values = ((images * 255).round() / 255 - mean) / std
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixel_values).pooler_output @ model.visual_projection.weight.T
        for i, prompt in enumerate(PROMPTS[:2]):
            ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
            eos_pos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
            hidden = model.text_model(input_ids=ids).last_hidden_state[0, eos_pos]
            text_embed = hidden @ model.text_projection.weight.T
            expected = 10.0 * torch.nn.functional.cosine_similarity(text_embed, image_embeds[i], dim=0)
            assert scores[i] == pytest.approx(float(expected), abs=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))


def test_bfloat16_runs_and_stays_close(parts):
    images = _images(2, size=40)
    fp32 = PickScoreScorer(factory=lambda: parts, device="cpu").score(images, PROMPTS[:2]).scores
    copy = (deepcopy(parts[0]), parts[1])  # the scorer casts its model in place
    bf16 = PickScoreScorer(factory=lambda: copy, device="cpu", dtype=torch.bfloat16).score(images, PROMPTS[:2]).scores
    assert bf16.dtype == np.float64 and np.allclose(bf16, fp32, atol=0.3)


def test_long_prompts_are_truncated_to_77_tokens(scorer):
    long_prompt = "word " * 200
    batch = scorer.score(_images(1), [long_prompt])
    assert np.isfinite(batch.scores).all()


def test_prompt_count_must_match(scorer):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(_images(2), ["one"])


def test_registry_builds_pickscore(parts):
    s = build_scorer("pickscore", factory=lambda: parts, device="cpu")
    assert isinstance(s, PickScoreScorer) and s.name == "pickscore"


def test_offline_loading_names_the_model_and_the_local_path_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"yuvalkirstain/PickScore_v1(.|\n)*model_id='/path/to/local/dir'"):
        PickScoreScorer()


# ------------------------------------------------------------------------------- shared CLIP preprocessing


def test_shortest_side_size_and_center_crop_offsets():
    assert shortest_side_size(512, 512, 224) == (224, 224)
    assert shortest_side_size(512, 768, 224) == (224, 336)
    assert shortest_side_size(777, 512, 224) == (int(224 * 777 / 512), 224)
    x = torch.arange(5 * 8, dtype=torch.float32).view(1, 1, 5, 8)
    # torchvision's offsets: round((5 - 3) / 2) = 1, round((8 - 3) / 2) = round(2.5) = 2
    assert torch.equal(center_crop(x, 3), x[..., 1:4, 2:5])


def test_pil_backend_matches_pil_resize_exactly():
    images = _images(2, size=40)
    got = resize_shortest_center_crop(images, 24, backend="pil")
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        ref = Image.fromarray(arr[i]).resize((24, 24), resample=Image.Resampling.BICUBIC)
        expected = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(got[i], expected)


def test_tensor_backend_is_close_to_pil():
    y, x = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 128), indexing="ij")
    smooth = torch.stack([x, y, (x + y) / 2]).unsqueeze(0)  # a smooth image: resamplers agree closely
    pil = resize_shortest_center_crop(smooth, 32, backend="pil")
    tensor = resize_shortest_center_crop(smooth, 32, backend="tensor")
    assert pil.shape == tensor.shape == (1, 3, 32, 32)
    assert (pil - tensor).abs().max() < 3 / 255


def test_clip_pixel_values_normalises():
    images = torch.full((1, 3, 8, 8), 0.5)
    pv = clip_pixel_values(images, 8)
    expected = (round(0.5 * 255) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(pv[0, :, 0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        clip_pixel_values(images, 8, backend="cv2")
