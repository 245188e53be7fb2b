"""AestheticScorer on a tiny random CLIP vision tower and hand-set linear heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowopd.scorers.aesthetic import AestheticScorer, aesthetic_from_embeddings
from flowopd.scorers.clip_common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, MLPHead, load_aesthetic_mlp


def tiny_clip_vision(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=768,
    )
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config).eval()


def first_component_head(slope: float, intercept: float) -> MLPHead:
    """A head whose output is ``slope * x[0] + intercept``: a chain of unit weights through the 5 linear layers."""
    mlp = MLPHead(768)
    with torch.no_grad():
        for i in (0, 2, 4, 6, 7):
            mlp.layers[i].weight.zero_()
            mlp.layers[i].bias.zero_()
            mlp.layers[i].weight[0, 0] = 1.0
        mlp.layers[7].weight[0, 0] = slope
        mlp.layers[7].bias[0] = intercept
    return mlp.eval()


def _images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_vision()


def test_head_is_linear_and_matches_hand_computation():
    mlp = first_component_head(2.0, 3.0)
    emb = torch.zeros(2, 768)
    emb[0, 0], emb[0, 1] = 3.0, 4.0  # normalised first component 0.6
    emb[1, 0], emb[1, 5] = -1.0, 1.0  # -1 / sqrt(2)
    got = aesthetic_from_embeddings(emb, mlp)
    expected = torch.tensor([2.0 * 0.6 + 3.0, 2.0 * (-1 / 2**0.5) + 3.0])
    assert torch.allclose(got, expected, atol=1e-6)
    # scale invariance: the embedding is L2-normalised first
    assert torch.allclose(aesthetic_from_embeddings(emb * 7.5, mlp), expected, atol=1e-6)


def test_full_head_composes_the_five_layers():
    torch.manual_seed(3)
    mlp = MLPHead(768).eval()
    x = torch.randn(4, 768)
    x = x / x.norm(dim=-1, keepdim=True)
    h = x
    for i in (0, 2, 4, 6, 7):  # no activations between the layers (the official head is linear)
        h = h @ mlp.layers[i].weight.T + mlp.layers[i].bias
    assert torch.allclose(aesthetic_from_embeddings(x, mlp), h.squeeze(-1), atol=1e-5)


def test_scores_use_the_normalised_clip_embedding(clip):
    mlp = first_component_head(5.0, 1.0)
    images = _images(3)
    scores = AestheticScorer(factory=lambda: (clip, mlp), device="cpu").score(images, ["a"] * 3).scores
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = clip(pixel_values=((images * 255).round() / 255 - mean) / std).image_embeds
    expected = 5.0 * emb[:, 0] / emb.norm(dim=-1) + 1.0
    np.testing.assert_allclose(scores, expected.double().numpy(), atol=1e-5)


def test_shape_dtype_batching_and_determinism(clip):
    torch.manual_seed(4)
    mlp = MLPHead(768).eval()
    images = _images(5, size=50)
    full = AestheticScorer(factory=lambda: (clip, mlp), device="cpu", batch_size=5).score(images)
    one = AestheticScorer(factory=lambda: (clip, mlp), device="cpu", batch_size=1).score(images)
    assert full.scores.shape == (5,) and full.scores.dtype == np.float64
    np.testing.assert_allclose(full.scores, one.scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(full.scores, AestheticScorer(factory=lambda: (clip, mlp)).score(images).scores)


def test_official_head_file_loads_through_its_keys(tmp_path):
    torch.manual_seed(5)
    ref = MLPHead(768)
    # the official file is an OrderedDict with exactly these keys (checked against the released .pth)
    state = {f"layers.{i}.{p}": getattr(ref.layers[i], p).detach().clone()
             for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    torch.save(state, tmp_path / "head.pth")
    loaded = load_aesthetic_mlp(str(tmp_path / "head.pth"))
    x = torch.randn(2, 768)
    assert torch.equal(loaded(x), ref.eval()(x))
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not an aesthetic-predictor head"):
        load_aesthetic_mlp(str(tmp_path / "bad.pth"))


def test_offline_loading_names_the_clip_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.save(MLPHead(768).state_dict(), tmp_path / "head.pth")
    with pytest.raises(OSError, match=r"openai/clip-vit-large-patch14(.|\n)*clip_id='/path/to/local/dir'"):
        AestheticScorer(mlp_path=str(tmp_path / "head.pth"))


def test_offline_head_download_names_the_url_and_mlp_path(isolated_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"improved-aesthetic-predictor(.|\n)*mlp_path="):
        AestheticScorer()
