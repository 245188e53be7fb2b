"""DeQAScorer: the level-logit rule on hand-made logits, the official prompt tokenisation, and the in-process path on
a tiny random LLaMA behind mPLUG-Owl2's ``model(input_ids=..., images=...)`` interface."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from flowopd.scorers.deqa import (
    IMAGE_TOKEN_INDEX,
    LEVELS,
    PROMPT,
    DeQAScorer,
    deqa_score_from_logits,
    expand_to_square,
    jpeg_roundtrip,
    level_token_ids,
    tokenize_with_image,
)

WORDS = ["USER", ":", "How", "would", "you", "rate", "the", "quality", "of", "this", "image", "?", "ASSISTANT",
         "The", "is", *LEVELS]


def tiny_llama_tokenizer():
    """Word-level tokenizer that adds BOS like LLaMA's (so the level word is token [1], as in the official rule)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class TinyOwl(nn.Module):
    """A stand-in for mPLUG-Owl2: a tiny random LLaMA whose ``-200`` position receives a projected image feature."""

    def __init__(self, vocab_size: int, image_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        self.lm = LlamaForCausalLM(config)
        self.visual = nn.Linear(3 * image_size * image_size, 32)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        embeds = self.lm.get_input_embeddings()(input_ids.clamp(min=0))
        is_image = input_ids == IMAGE_TOKEN_INDEX
        assert int(is_image.sum()) == len(images), "one image placeholder per sequence"
        embeds = torch.where(is_image[..., None], self.visual(images.flatten(1)).unsqueeze(1).to(embeds.dtype), embeds)
        return {"logits": self.lm(inputs_embeds=embeds).logits}


def tiny_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


@pytest.fixture(scope="module")
def parts():
    tokenizer = tiny_llama_tokenizer()
    return TinyOwl(len(tokenizer)), tokenizer, tiny_image_processor()


def _images(n, h=24, w=24, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the rule


def test_rule_on_hand_made_logits():
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0],  # uniform -> 3
        [0.0, math.log(2.0), 0.0, 0.0, 0.0],  # probs (1, 2, 1, 1, 1) / 6 -> (5 + 8 + 3 + 2 + 1) / 6
        [50.0, 0.0, 0.0, 0.0, 0.0],  # all mass on "excellent" -> 5
        [0.0, 0.0, 0.0, 0.0, 50.0],  # all mass on "bad" -> 1
        [math.log(3.0), math.log(1.0), -1e9, -1e9, -1e9],  # 0.75 * 5 + 0.25 * 4
    ])
    expected = torch.tensor([3.0, 19 / 6, 5.0, 1.0, 4.75])
    assert torch.allclose(deqa_score_from_logits(logits), expected, atol=1e-5)
    assert torch.allclose(deqa_score_from_logits(logits[:2] + 7.0), expected[:2], atol=1e-5)  # shift-invariant
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        deqa_score_from_logits(torch.zeros(2, 4))


def test_levels_prompt_and_token_rules():
    assert LEVELS == ("excellent", "good", "fair", "poor", "bad")
    assert PROMPT == ("USER: How would you rate the quality of this image?\n<|image|>\n"
                      "ASSISTANT: The quality of the image is")
    tok = tiny_llama_tokenizer()
    assert level_token_ids(tok) == [tok.convert_tokens_to_ids(w) for w in LEVELS]
    ids = tokenize_with_image(PROMPT, tok)
    before = tok("USER: How would you rate the quality of this image?\n")["input_ids"]
    after = tok("\nASSISTANT: The quality of the image is")["input_ids"]
    assert ids == before + [IMAGE_TOKEN_INDEX] + after[1:]  # one BOS, the placeholder, the rest without BOS
    assert ids[0] == tok.bos_token_id and ids.count(IMAGE_TOKEN_INDEX) == 1


def test_expand_to_square_pads_with_the_background():
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    sq = np.asarray(expand_to_square(img, (122, 116, 104)))
    assert sq.shape == (4, 4, 3)
    assert (sq[0] == (122, 116, 104)).all() and (sq[3] == (122, 116, 104)).all()  # rows above and below
    assert (sq[1:3] == (10, 20, 30)).all()
    tall = np.asarray(expand_to_square(Image.new("RGB", (1, 3), (0, 0, 0)), (9, 9, 9)))
    assert (tall[:, 1] == 0).all() and (tall[:, 0] == 9).all() and (tall[:, 2] == 9).all()


# ------------------------------------------------------------------------------------------- the scorer


def test_scores_match_the_rule_applied_to_the_model(parts):
    model, tokenizer, processor = parts
    images = _images(3, 24, 40)
    batch = DeQAScorer(factory=lambda: parts, device="cpu", jpeg_quality=None).score(images, ["ignored"] * 3, [{}] * 3)
    assert batch.scores.shape == (3,) and batch.scores.dtype == np.float64
    assert ((batch.scores >= 1) & (batch.scores <= 5)).all()
    probs = np.array([batch.details[f"p_{lv}"] for lv in LEVELS]).T
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    background = tuple(int(x * 255) for x in processor.image_mean)
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pils = [expand_to_square(Image.fromarray(a), background) for a in arr]
    pixel_values = processor(images=pils, return_tensors="pt")["pixel_values"]
    ids = torch.tensor(tokenize_with_image(PROMPT, tokenizer)).repeat(3, 1)
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixel_values)["logits"][:, -1]
    level = logits[:, [tokenizer.convert_tokens_to_ids(w) for w in LEVELS]]
    weights = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    expected = (torch.softmax(level, -1) * weights).sum(-1)
    np.testing.assert_allclose(batch.scores, expected.double().numpy(), atol=1e-5)


def test_batch_equals_one_by_one_and_deterministic(parts):
    images = _images(4)
    full = DeQAScorer(factory=lambda: parts, device="cpu", batch_size=4).score(images)
    one = DeQAScorer(factory=lambda: parts, device="cpu", batch_size=1).score(images)
    np.testing.assert_allclose(full.scores, one.scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(full.scores, DeQAScorer(factory=lambda: parts, device="cpu").score(images).scores)


def test_jpeg_option_scores_the_jpeg_decoded_image(parts):
    images = _images(2)
    jpeg = DeQAScorer(factory=lambda: parts, device="cpu", jpeg_quality=75).score(images).scores
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = np.stack([np.asarray(jpeg_roundtrip(Image.fromarray(a), 75)) for a in arr])
    pre = torch.from_numpy(decoded).permute(0, 3, 1, 2).float() / 255
    lossless = DeQAScorer(factory=lambda: parts, device="cpu", jpeg_quality=None)
    np.testing.assert_allclose(jpeg, lossless.score(pre).scores, atol=1e-6)
    assert not np.allclose(jpeg, lossless.score(images).scores, atol=1e-6)


def test_remote_code_needs_the_explicit_flag():
    with pytest.raises(ValueError, match=r"zhiyuanyou/DeQA-Score-Mix3(.|\n)*trust_remote_code=True(.|\n)*serve"):
        DeQAScorer()


def test_offline_loading_names_the_model_and_the_local_path_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"zhiyuanyou/DeQA-Score-Mix3(.|\n)*model_id='/path/to/local/dir'"):
        DeQAScorer(trust_remote_code=True, device="cpu")


def test_default_sends_jpeg_quality_75_as_the_release(parts):
    """The release's DeQA reward client JPEG-encodes at PIL's default quality 75: that is our default too."""
    images = _images(2)
    default = DeQAScorer(factory=lambda: parts, device="cpu")
    assert default.jpeg_quality == 75 and "jpeg=75" in default.version
    q75 = DeQAScorer(factory=lambda: parts, device="cpu", jpeg_quality=75).score(images).scores
    np.testing.assert_array_equal(default.score(images).scores, q75)
    lossless = DeQAScorer(factory=lambda: parts, device="cpu", jpeg_quality=None).score(images).scores
    assert not np.allclose(q75, lossless, atol=1e-6)


@pytest.mark.parametrize("bad", [0, 101, 7.5, "75", True])
def test_bad_jpeg_quality_is_refused_naming_the_option(parts, bad):
    with pytest.raises(ValueError, match="jpeg_quality must be an integer in 1..100 or None"):
        DeQAScorer(factory=lambda: parts, device="cpu", jpeg_quality=bad)
