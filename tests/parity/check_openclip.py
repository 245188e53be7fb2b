"""open_clip towers -> transformers' CLIPModel (our converter), and GenEval's zero-shot colour classifier.

Official side: ``open_clip.create_model_and_transforms(ARCH, pretrained=None)`` (the QuickGELU variant, as the
OpenAI weights GenEval loads with ``pretrained="openai"``), its validation transform and tokenizer; colour
classifier weights built as clip_benchmark's ``zero_shot_classifier`` does (per colour: the 3 GenEval templates'
normalised text features, averaged, re-normalised). Ours: ``convert_open_clip_state_dict`` +
``clip_config_from_open_clip`` into transformers' CLIPModel, our preprocessing, and
``flowopd.scorers.geneval.ClipColorClassifier``.
"""

from __future__ import annotations

from pathlib import Path

from common import (
    COLOR_TEMPLATES,
    COLORS,
    PROMPTS,
    clip_tokenizer_dir,
    full_size,
    load_images,
    load_json,
    max_abs_diff,
    perturb_,
    save_json,
    save_safetensors,
    seed_everything,
)

TOLERANCE = 1e-5
WHY = "cosines in [-1, 1], fp32 on both sides"
CLASSNAME = "cat"


def arch() -> str:
    return "ViT-L-14-quickgelu" if full_size() else "ViT-B-32-quickgelu"


def official(work: Path) -> dict:
    import open_clip
    import torch
    import torch.nn.functional as F
    seed_everything()
    model, _, preprocess = open_clip.create_model_and_transforms(arch(), pretrained=None)
    model.eval()
    perturb_(model)
    save_safetensors(work / "openclip" / "model.safetensors", model.state_dict())
    save_json(work / "openclip" / "config.json", open_clip.get_model_config(arch()))
    clip_tokenizer_dir(work)
    tokenizer = open_clip.get_tokenizer(arch())
    images = load_images(work)
    with torch.no_grad():
        image_features = F.normalize(torch.cat([model.encode_image(preprocess(im)[None]) for im in images]), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(list(PROMPTS))), dim=-1)
        columns = []
        for color in COLORS:
            texts = [t.format(c=color, obj=CLASSNAME) for t in COLOR_TEMPLATES]
            emb = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
            mean = emb.mean(dim=0)
            columns.append(mean / mean.norm())
        weights = torch.stack(columns, dim=1)
        logits = image_features @ weights
    return {
        "cosines": (image_features * text_features).sum(-1).tolist(),
        "color_logits": logits.flatten().tolist(),
        "colors": [COLORS[i] for i in logits.argmax(dim=1).tolist()],
    }


def ours(work: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from common import images_tensor
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPModel

    from flowopd.scorers.clip_common import (
        clip_pixel_values,
        image_embeddings,
        paired_cosine,
        text_embeddings,
    )
    from flowopd.scorers.geneval import ClipColorClassifier
    from flowopd.scorers.hps import clip_config_from_open_clip, convert_open_clip_state_dict, open_clip_clean

    cfg = load_json(work / "openclip" / "config.json")
    model = CLIPModel(clip_config_from_open_clip(cfg)).eval()
    missing, unexpected = model.load_state_dict(
        convert_open_clip_state_dict(load_file(str(work / "openclip" / "model.safetensors"))), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "clip_tokenizer"))
    images = images_tensor(work)
    size = int(cfg["vision_cfg"]["image_size"])
    with torch.no_grad():
        image_embeds = torch.cat([image_embeddings(model, clip_pixel_values(im, size)) for im in images])
        tokens = tokenizer([open_clip_clean(p) for p in PROMPTS], padding=True, truncation=True, max_length=77,
                           return_tensors="pt")
        text_embeds = text_embeddings(model, tokens["input_ids"], tokens["attention_mask"])
        classifier = ClipColorClassifier(model, tokenizer, torch.device("cpu"), amp=False)
        logits = F.normalize(image_embeds.float(), dim=-1) @ classifier.text_weights(CLASSNAME)
    assert tuple(COLORS) == tuple(classifier_colors()), "GenEval colour list differs"

    return {
        "cosines": paired_cosine(image_embeds, text_embeds).tolist(),
        "color_logits": logits.flatten().tolist(),
        "colors": [COLORS[i] for i in logits.argmax(dim=1).tolist()],
    }


def classifier_colors() -> tuple[str, ...]:
    from flowopd.scorers.geneval_rules import COLORS as ours

    return tuple(ours)


STEPS = {"official-torch": official, "ours": ours}


def compare(work: Path) -> list[dict]:
    o, u = load_json(work / "openclip" / "official-torch.json"), load_json(work / "openclip" / "ours.json")
    rows = []
    for key, label in (("cosines", f"{arch()} image-text cosine"),
                       ("color_logits", "GenEval colour logits (10 colours)")):
        d = max_abs_diff(o[key], u[key])
        rows.append({"scorer": "open_clip", "quantity": label, "n": len(o[key]), "max_abs_diff": d,
                     "tolerance": TOLERANCE, "ok": d <= TOLERANCE, "note": ""})
    same = o["colors"] == u["colors"]
    rows.append({"scorer": "open_clip", "quantity": "GenEval colour argmax (equal?)", "n": len(o["colors"]),
                 "max_abs_diff": 0.0 if same else 1.0, "tolerance": 0.0, "ok": same,
                 "note": "" if same else f"official {o['colors']} vs ours {u['colors']}"})
    return rows
