"""ImageReward: the ``image-reward`` 1.5 package vs flowopd.scorers.imagereward (transformers' BLIP parts).

Official side: ``ImageReward.ImageReward(med_config, device="cpu")`` - BLIP's ViT-L/16 (fixed by the class) and
the ``med.py`` BERT text encoder with cross-attention, built from a ``med_config.json`` with 2 text layers (the
head needs width 768; the release has 12), seeded random weights perturbed so that every parameter matters;
``model.score(prompt, image_path)`` does the official preprocessing (torchvision Resize bicubic + CenterCrop on the
PIL image), tokenisation (35 tokens, ``BertTokenizer('bert-base-uncased')`` read from ``./bert-base-uncased`` -
a small WordPiece vocabulary written here) and z-scoring. Ours: ``load_imagereward`` of the saved state dict
(the official key names) and ``ImageRewardScorer``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common import (
    PROMPTS,
    load_json,
    make_images,
    max_abs_diff,
    perturb_,
    save_safetensors,
    seed_everything,
    write_bert_vocab,
)

TOLERANCE = 1e-4
WHY = "fp32; rewards are z-scores (about -2..2); 24 ViT-L blocks of float32 rounding stay far below 1e-4"
TEXT_LAYERS = 2
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": TEXT_LAYERS, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 1024, "add_cross_attention": True,
}


def official(work: Path) -> dict:
    import torch

    here = work / "imagereward"
    here.mkdir(parents=True, exist_ok=True)
    (here / "med_config.json").write_text(json.dumps(MED_CONFIG))
    write_bert_vocab(here / "bert-base-uncased")
    cwd = os.getcwd()
    os.chdir(here)  # BLIP's init_tokenizer: BertTokenizer.from_pretrained('bert-base-uncased') (relative path)
    try:
        import ImageReward

        seed_everything()
        model = ImageReward.ImageReward(med_config=str(here / "med_config.json"), device="cpu").eval()
    finally:
        os.chdir(cwd)
    perturb_(model)
    save_safetensors(here / "ImageReward.safetensors", model.state_dict())
    features = []  # the head's input: the [CLS] text features (768 numbers per image, a sharper test than the reward)
    model.mlp.register_forward_pre_hook(lambda module, args: features.append(args[0][0].tolist()))
    with torch.no_grad():
        scores = [float(model.score(p, str(path))) for p, path in zip(PROMPTS, make_images(work))]
    return {"scores": scores, "features": features, "package": "image-reward " + _version("image-reward")}


def ours(work: Path) -> dict:
    from common import images_tensor

    from flowopd.scorers.imagereward import ImageRewardScorer, load_imagereward, load_imagereward_tokenizer

    here = work / "imagereward"
    text = {"num_hidden_layers": TEXT_LAYERS}
    model = load_imagereward(str(here / "ImageReward.safetensors"), text=text)
    tokenizer = load_imagereward_tokenizer(str(here / "bert-base-uncased"))
    scorer = ImageRewardScorer(factory=lambda: (model, tokenizer), device="cpu")
    features = []
    scorer.model.head.register_forward_pre_hook(lambda module, args: features.append(args[0][0].tolist()))
    scores = [float(scorer.score(im, [p]).scores[0]) for im, p in zip(images_tensor(work), PROMPTS)]
    return {"scores": scores, "features": features, "version": scorer.version}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


STEPS = {"official-torch": official, "ours": ours}


def compare(work: Path) -> list[dict]:
    o, u = load_json(work / "imagereward" / "official-torch.json"), load_json(work / "imagereward" / "ours.json")
    d = max_abs_diff(o["scores"], u["scores"])
    f = max_abs_diff(o["features"], u["features"])
    return [{"scorer": "imagereward", "quantity": "reward (z-scored), ViT-L/16 + 2-layer BERT", "n": len(o["scores"]),
             "max_abs_diff": d, "tolerance": TOLERANCE, "ok": d <= TOLERANCE, "note": ""},
            {"scorer": "imagereward", "quantity": "[CLS] text features (head input, 768 per image)",
             "n": len(o["features"]) * len(o["features"][0]), "max_abs_diff": f, "tolerance": TOLERANCE,
             "ok": f <= TOLERANCE, "note": "random heads vary the reward little: the features are the sharper test"}]
