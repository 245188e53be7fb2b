"""HPSScorer: the open_clip -> transformers converter checked against a direct open_clip-style computation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowopd.scorers.clip_common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_pixel_values,
    resize_longest_pad,
)
from flowopd.scorers.hps import (
    HPSScorer,
    clip_config_from_open_clip,
    convert_open_clip_state_dict,
    load_hps_clip,
    open_clip_clean,
)

# a tiny model in open_clip's model_configs/*.json format
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 0, "width": 24, "heads": 4, "layers": 2},
}


def tiny_clip_tokenizer():
    """Byte-level CLIP BPE without merges; <|endoftext|> has the highest id, as in CLIP's vocab."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def open_clip_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with open_clip's CLIP key names and shapes (ViT tower + built-in text tower)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, p = v["width"], t["width"], v["patch_size"]
    grid = v["image_size"] // p
    sd = {
        "visual.class_embedding": r(vw),
        "visual.positional_embedding": r(grid * grid + 1, vw),
        "visual.proj": r(vw, e),
        "visual.conv1.weight": r(vw, 3, p, p, scale=0.05),
        "visual.ln_pre.weight": 1 + r(vw), "visual.ln_pre.bias": r(vw),
        "visual.ln_post.weight": 1 + r(vw), "visual.ln_post.bias": r(vw),
        "positional_embedding": r(t["context_length"], tw),
        "text_projection": r(tw, e),
        "logit_scale": torch.tensor(4.6052),
        "token_embedding.weight": r(t["vocab_size"], tw),
        "ln_final.weight": 1 + r(tw), "ln_final.bias": r(tw),
    }
    for prefix, w, n in (("visual.transformer.resblocks.", vw, v["layers"]),
                         ("transformer.resblocks.", tw, t["layers"])):
        for i in range(n):
            b = f"{prefix}{i}."
            sd.update({
                b + "ln_1.weight": 1 + r(w), b + "ln_1.bias": r(w),
                b + "attn.in_proj_weight": r(3 * w, w), b + "attn.in_proj_bias": r(3 * w),
                b + "attn.out_proj.weight": r(w, w), b + "attn.out_proj.bias": r(w),
                b + "ln_2.weight": 1 + r(w), b + "ln_2.bias": r(w),
                b + "mlp.c_fc.weight": r(4 * w, w), b + "mlp.c_fc.bias": r(4 * w),
                b + "mlp.c_proj.weight": r(w, 4 * w), b + "mlp.c_proj.bias": r(w),
            })
    return sd


# --- a direct computation of open_clip's CLIP forward from its own state dict (nn.MultiheadAttention's math)


def _block(x, sd, b, heads, attn_mask=None):
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
    a, _ = F.multi_head_attention_forward(
        h, h, h, w, heads, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=attn_mask,
    )
    x = x + a
    h = F.layer_norm(x, (w,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
    return x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])),
                        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])


def open_clip_image_features(sd, cfg, pixel_values):
    v = cfg["vision_cfg"]
    w = v["width"]
    x = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=v["patch_size"])
    x = x.reshape(x.shape[0], w, -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, w)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]).permute(1, 0, 2)
    for i in range(v["layers"]):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", w // v["head_width"])
    pooled = F.layer_norm(x.permute(1, 0, 2)[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return pooled @ sd["visual.proj"]


def open_clip_text_features(sd, cfg, text):
    t = cfg["text_cfg"]
    n = text.shape[1]
    x = (sd["token_embedding.weight"][text] + sd["positional_embedding"][:n]).permute(1, 0, 2)
    mask = torch.full((n, n), float("-inf")).triu_(1)
    for i in range(t["layers"]):
        x = _block(x, sd, f"transformer.resblocks.{i}.", t["heads"], attn_mask=mask)
    x = F.layer_norm(x.permute(1, 0, 2), (t["width"],), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ sd["text_projection"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = tiny_clip_tokenizer()
    cfg = {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "vocab_size": len(tokenizer)}}
    sd = open_clip_state_dict(cfg)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd}, path)  # the official file's layout
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = load_hps_clip(str(path), cfg, **ids)
    return cfg, sd, path, model, tokenizer


PROMPTS = ["a red cube", "two dogs playing in the snow at night", "x"]


def _images(n, h=32, w=32, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_converted_model_equals_open_clip_computation(tiny):
    cfg, sd, _, model, tokenizer = tiny
    images = _images(3, 40, 64)  # non-square: exercises ResizeMaxSize's padding
    scorer = HPSScorer(factory=lambda: (model, tokenizer), device="cpu")
    scores = scorer.score(images, PROMPTS, [{}] * 3).scores
    pixel_values = clip_pixel_values(images, 32, resize="longest_pad")
    enc = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    open_clip_tokens = torch.where(
        torch.arange(77) < (enc == tokenizer.eos_token_id).int().argmax(-1, keepdim=True) + 1, enc, 0
    )
    with torch.no_grad():
        img = open_clip_image_features(sd, cfg, pixel_values)
        txt = open_clip_text_features(sd, cfg, open_clip_tokens)  # open_clip pads with 0
    expected = F.cosine_similarity(img, txt, dim=-1).double().numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert scores.dtype == np.float64 and scores.shape == (3,)


def test_embeddings_match_the_reference_separately(tiny):
    cfg, sd, _, model, tokenizer = tiny
    pixel_values = clip_pixel_values(_images(2), 32, resize="longest_pad")
    ids = tokenizer(["a photo of a cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours_img = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        ours_txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        assert torch.allclose(ours_img, open_clip_image_features(sd, cfg, pixel_values), atol=1e-5)
        assert torch.allclose(ours_txt, open_clip_text_features(sd, cfg, ids), atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(4.6052)


def test_batch_equals_one_by_one_and_deterministic(tiny):
    _, _, _, model, tokenizer = tiny
    images = _images(3, 48, 48)
    full = HPSScorer(factory=lambda: (model, tokenizer), device="cpu", batch_size=3).score(images, PROMPTS)
    one = HPSScorer(factory=lambda: (model, tokenizer), device="cpu", batch_size=1).score(images, PROMPTS)
    np.testing.assert_allclose(full.scores, one.scores, rtol=0, atol=1e-6)
    again = HPSScorer(factory=lambda: (model, tokenizer), device="cpu", batch_size=3).score(images, PROMPTS)
    np.testing.assert_array_equal(full.scores, again.scores)
    assert np.all(np.abs(full.scores) <= 1.0)  # a cosine, no logit scale


def test_converter_splits_qkv_and_transposes_projections(tiny):
    _, sd, _, _, _ = tiny
    out = convert_open_clip_state_dict(sd)
    w = sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    n = w.shape[1]
    assert torch.equal(out["vision_model.encoder.layers.0.self_attn.q_proj.weight"], w[:n])
    assert torch.equal(out["vision_model.encoder.layers.0.self_attn.k_proj.weight"], w[n : 2 * n])
    assert torch.equal(out["vision_model.encoder.layers.0.self_attn.v_proj.weight"], w[2 * n :])
    assert torch.equal(out["visual_projection.weight"], sd["visual.proj"].T)
    assert torch.equal(out["text_projection.weight"], sd["text_projection"].T)
    with pytest.raises(ValueError, match="visual.transformer.resblocks.0.ls_1.gamma"):
        convert_open_clip_state_dict({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(1)})


def test_config_conversion_of_vit_h_14():
    from flowopd.scorers.hps import OPEN_CLIP_VIT_H_14

    c = clip_config_from_open_clip(OPEN_CLIP_VIT_H_14)
    vision, text = c.vision_config, c.text_config
    assert (vision.hidden_size, vision.num_attention_heads, vision.intermediate_size) == (1280, 16, 5120)
    assert (c.vision_config.num_hidden_layers, c.vision_config.patch_size) == (32, 14)
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers) == (1024, 16, 24)
    assert c.projection_dim == 1024 and c.text_config.hidden_act == "gelu" and c.text_config.eos_token_id == 49407
    with pytest.raises(ValueError, match="ls_init_value"):
        clip_config_from_open_clip(
            {**OPEN_CLIP_VIT_H_14, "vision_cfg": {**OPEN_CLIP_VIT_H_14["vision_cfg"], "ls_init_value": 1e-5}}
        )


def test_resize_longest_pad_is_open_clip_resize_max_size():
    x = _images(1, 20, 40)
    out = resize_longest_pad(x, 32)
    assert out.shape == (1, 3, 32, 32)
    q = (x * 255).round() / 255
    body = F.interpolate(q, size=(16, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(out[..., 8:24, :], body)
    assert (out[..., :8, :] == 0).all() and (out[..., 24:, :] == 0).all()
    odd = resize_longest_pad(_images(1, 21, 40), 32)  # round(21 * 0.8) = 17 rows: pad 7 above, 8 below
    assert (odd[..., :7, :] == 0).all() and (odd[..., 24:, :] == 0).all() and (odd[..., 7, :] != 0).any()
    same = resize_longest_pad(_images(1, 32, 32), 32)
    assert torch.equal(same, (_images(1, 32, 32) * 255).round() / 255)
    pv = clip_pixel_values(_images(1, 32, 32), 32, resize="longest_pad")
    m, s = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(pv, (same - m) / s, atol=1e-6)


def test_version_defaults_to_v2_1_and_warns_on_v2_0(tiny):
    _, _, _, model, tokenizer = tiny
    s = HPSScorer(factory=lambda: (model, tokenizer), device="cpu")
    assert "hps=v2.1" in s.version and "HPS_v2.1_compressed.pt" in s.version
    with pytest.warns(UserWarning, match="v2.1"):
        HPSScorer(hps_version="v2.0", factory=lambda: (model, tokenizer), device="cpu")
    with pytest.raises(ValueError, match="hps_version"):
        HPSScorer(hps_version="v3", factory=lambda: (model, tokenizer))


def test_local_checkpoint_path_loads_without_open_clip(tiny, monkeypatch):
    cfg, _, path, model, tokenizer = tiny
    import flowopd.scorers.hps as hps

    monkeypatch.setattr(hps, "OPEN_CLIP_VIT_H_14", cfg)
    monkeypatch.setattr(hps, "load_hps_clip", lambda p: load_hps_clip(p, cfg, eos_token_id=tokenizer.eos_token_id))
    monkeypatch.setattr("transformers.CLIPTokenizer.from_pretrained", lambda *a, **k: tokenizer)
    s = HPSScorer(model_id=str(path.parent), device="cpu")  # a directory holding HPS_v2.1_compressed.pt
    images = _images(2)
    np.testing.assert_allclose(
        s.score(images, PROMPTS[:2]).scores,
        HPSScorer(factory=lambda: (model, tokenizer), device="cpu").score(images, PROMPTS[:2]).scores,
        atol=1e-6,
    )


def test_offline_loading_names_the_checkpoint_and_the_local_path_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match=r"xswu/HPSv2(.|\n)*model_id='/path/to/HPS_v2.1_compressed.pt'"):
            HPSScorer()


def test_open_clip_text_cleaning():
    assert open_clip_clean("  a&amp;amp;b \n\t two   dogs ") == "a&b two dogs"  # unescaped twice, whitespace collapsed
    assert open_clip_clean("plain") == "plain"
