"""PickScore: transformers' CLIPModel + CLIPProcessor with the PickScore reference inference (its README):
processor(images=..., padding, truncation, max_length=77), L2-normalised features, ``logit_scale.exp() *
text @ image.T``, softmax over the images of one prompt. Official side: transformers 4.46 (the PIL
CLIPImageProcessor that laion/CLIP-ViT-H-14's preprocessor_config.json describes) and CLIP's real BPE vocabulary.
Ours: flowopd.scorers.pickscore on transformers 5, loading the same saved model with ``from_pretrained``.
"""

from __future__ import annotations

import math
from pathlib import Path

from common import (
    PROMPTS,
    clip_tokenizer_dir,
    full_size,
    load_images,
    load_json,
    max_abs_diff,
    perturb_,
    seed_everything,
)

TOLERANCE = 1e-4
WHY = "fp32 on both sides; the score is 100 x a cosine, so 1e-4 is a cosine difference of 1e-6"

SMALL = dict(
    text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=32,
)
# yuvalkirstain/PickScore_v1: CLIP ViT-H-14
FULL = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json
PROCESSOR = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                 crop_size={"height": 224, "width": 224}, do_normalize=True,
                 image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def official(work: Path) -> dict:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    seed_everything()
    model = CLIPModel(CLIPConfig(**(FULL if full_size() else SMALL))).eval()
    perturb_(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore_v1's trained value
    model.save_pretrained(str(work / "pickscore" / "model"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**PROCESSOR),
                              tokenizer=CLIPTokenizerFast.from_pretrained(str(clip_tokenizer_dir(work))))
    images = load_images(work)
    pair_scores = []
    with torch.no_grad():
        image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        for i, prompt in enumerate(PROMPTS):
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
            pair_scores.append(float(scores[i]))
            if i == 0:
                probs = torch.softmax(scores, dim=-1).tolist()
    return {"scores": pair_scores, "probs_prompt0": probs}


def ours(work: Path) -> dict:
    import torch
    from common import images_tensor
    from transformers import AutoTokenizer, CLIPModel

    from flowopd.scorers.pickscore import PickScoreScorer

    model = CLIPModel.from_pretrained(str(work / "pickscore" / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(work / "clip_tokenizer"))
    scorer = PickScoreScorer(factory=lambda: (model, tokenizer), device="cpu")
    images = images_tensor(work)
    scores = [float(scorer.score(im, [p]).scores[0]) for im, p in zip(images, PROMPTS)]
    prompt0 = torch.tensor([float(scorer.score(im, [PROMPTS[0]]).scores[0]) for im in images])
    return {"scores": scores, "probs_prompt0": torch.softmax(prompt0, dim=-1).tolist(), "version": scorer.version}


STEPS = {"official-torch": official, "ours": ours}


def compare(work: Path) -> list[dict]:
    o, u = load_json(work / "pickscore" / "official-torch.json"), load_json(work / "pickscore" / "ours.json")
    rows = []
    for key, label, tol in (("scores", "score (logit_scale x cosine)", TOLERANCE),
                            ("probs_prompt0", "softmax over images (reference inference)", 1e-6)):
        d = max_abs_diff(o[key], u[key])
        rows.append({"scorer": "pickscore", "quantity": label, "n": len(o[key]), "max_abs_diff": d,
                     "tolerance": tol, "ok": d <= tol, "note": ""})
    return rows
