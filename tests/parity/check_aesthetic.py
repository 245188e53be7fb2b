"""LAION aesthetic predictor v2: openai ``clip`` (the predictor's CLIP) + the MLP head vs flowopd.scorers.aesthetic.

Official side: ``clip.model.CLIP`` with ViT-L/14's layout (patch 14, 224 px, embedding 768, QuickGELU) but 2
vision / 1 text blocks of smaller width (``PARITY_FULL=1``: the full ViT-L/14), seeded random weights in fp32
(``clip.load`` on CPU also runs fp32), ``clip.clip._transform(224)`` (what ``clip.load`` returns), and the
improved-aesthetic-predictor inference: ``encode_image``, numpy L2 normalisation, the 768-1024-128-64-16-1 head.
The head class is the one the ``image-reward`` package ships (``ImageReward.MLP``, same layers and keys as
``sac+logos+ava1-l14-linearMSE.pth``; the predictor's own class lives in a script, not a package).
Ours: the CLIP weights through ``convert_open_clip_state_dict`` (OpenAI key names) into transformers' CLIPModel,
the head through ``load_aesthetic_mlp``, and ``AestheticScorer``.
"""

from __future__ import annotations

from pathlib import Path

from common import (
    full_size,
    load_images,
    load_json,
    max_abs_diff,
    perturb_,
    save_json,
    save_safetensors,
    seed_everything,
)

TOLERANCE = 1e-4
WHY = "fp32; scores on a 1-10 scale"


def layout() -> dict:
    """open_clip-format config of the CLIP built here (ViT-L/14 when PARITY_FULL=1)."""
    vision = dict(layers=24, width=1024) if full_size() else dict(layers=2, width=256)
    text = dict(layers=12, width=768) if full_size() else dict(layers=1, width=128)
    return {
        "embed_dim": 768, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "patch_size": 14, "head_width": 64, **vision},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "heads": text["width"] // 64, **text},
    }


def official(work: Path) -> dict:
    import clip
    import numpy as np
    import torch
    from ImageReward.ImageReward import MLP

    cfg = layout()
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    seed_everything()
    model = clip.model.CLIP(cfg["embed_dim"], v["image_size"], v["layers"], v["width"], v["patch_size"],
                            t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"]).float().eval()
    mlp = MLP(768).eval()
    perturb_(model)
    perturb_(mlp, scale=0.05, seed=1)
    here = work / "aesthetic"
    save_safetensors(here / "clip.safetensors", model.state_dict())
    save_safetensors(here / "mlp.safetensors", mlp.state_dict())
    save_json(here / "open_clip_config.json", cfg)
    preprocess = clip.clip._transform(v["image_size"])
    scores, embeddings = [], []
    with torch.no_grad():
        for image in load_images(work):
            features = model.encode_image(preprocess(image)[None]).cpu().numpy()
            norm = np.atleast_1d(np.linalg.norm(features, 2, -1))  # simple_inference.py's normalized()
            norm[norm == 0] = 1
            embedding = features / np.expand_dims(norm, -1)
            scores.append(float(mlp(torch.from_numpy(embedding).float())[0, 0]))
            embeddings.append(embedding[0].tolist())
    return {"scores": scores, "embeddings": embeddings}


def ours(work: Path) -> dict:
    from common import images_tensor
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from flowopd.scorers.aesthetic import AestheticScorer
    from flowopd.scorers.clip_common import load_aesthetic_mlp
    from flowopd.scorers.hps import clip_config_from_open_clip, convert_open_clip_state_dict

    here = work / "aesthetic"
    clip_model = CLIPModel(clip_config_from_open_clip(load_json(here / "open_clip_config.json"))).eval()
    missing, unexpected = clip_model.load_state_dict(
        convert_open_clip_state_dict(load_file(str(here / "clip.safetensors"))), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    mlp = load_aesthetic_mlp(str(here / "mlp.safetensors"))
    scorer = AestheticScorer(factory=lambda: (clip_model, mlp), device="cpu")
    embeddings = []  # the head's input: the L2-normalised image embedding
    scorer.mlp.register_forward_pre_hook(lambda module, args: embeddings.append(args[0][0].tolist()))
    scores = [float(scorer.score(im).scores[0]) for im in images_tensor(work)]
    return {"scores": scores, "embeddings": embeddings, "version": scorer.version}


STEPS = {"official-torch": official, "ours": ours}


def compare(work: Path) -> list[dict]:
    o, u = load_json(work / "aesthetic" / "official-torch.json"), load_json(work / "aesthetic" / "ours.json")
    d = max_abs_diff(o["scores"], u["scores"])
    arch = "ViT-L/14" if full_size() else "ViT-L/14 layout, 2 blocks"
    e = max_abs_diff(o["embeddings"], u["embeddings"])
    return [{"scorer": "aesthetic", "quantity": f"aesthetic score, openai clip {arch} + MLP", "n": len(o["scores"]),
             "max_abs_diff": d, "tolerance": TOLERANCE, "ok": d <= TOLERANCE, "note": ""},
            {"scorer": "aesthetic", "quantity": "normalised image embedding (head input, 768 per image)",
             "n": len(o["embeddings"]) * len(o["embeddings"][0]), "max_abs_diff": e, "tolerance": 1e-6,
             "ok": e <= 1e-6,
             "note": "unit vectors; random heads vary the score little: the embedding is the sharper test"}]
