"""HPS v2.1: the ``hpsv2`` 1.2.0 package vs flowopd.scorers.hps (open_clip weights converted to transformers).

Official side: hpsv2's vendored open_clip ``create_model_and_transforms`` with the arguments of
``img_score.initialize_model()`` (``precision="amp"``, ``light_augmentation=True``: ResizeMaxSize + pad) for
ARCH (ViT-B-32 by default - the same code path as ViT-H-14, far lighter; ``PARITY_FULL=1``: ViT-H-14), put in
``img_score.model_dict`` so that ``img_score.score(image, prompt, cp=LOCAL, hps_version="v2.1")`` runs the
package's own loading, preprocessing, tokenizer and (CPU: no-op) autocast without any download. The 1.2.0 wheel
lacks its BPE file; the identical file of open_clip_torch is copied in. Ours: ``load_hps_clip`` + ``HPSScorer``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common import (
    PROMPTS,
    clip_tokenizer_dir,
    full_size,
    load_json,
    make_images,
    max_abs_diff,
    perturb_,
    save_json,
    save_safetensors,
    seed_everything,
)

TOLERANCE = 1e-5
WHY = "a cosine (about 0.25-0.35 on real weights), fp32 on CPU on both sides"


def arch() -> str:
    return "ViT-H-14" if full_size() else "ViT-B-32"


def official(work: Path) -> dict:
    import importlib.util
    import json

    import open_clip
    import torch

    # missing from the 1.2.0 wheel, and read when hpsv2 is imported: the same file (md5 933b7abb...) of open_clip_torch
    package = Path(importlib.util.find_spec("hpsv2").submodule_search_locations[0])
    bpe = package / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", bpe)

    import hpsv2
    from hpsv2 import img_score
    from hpsv2.src import open_clip as hps_open_clip
    clip_tokenizer_dir(work)
    seed_everything()
    model, _, preprocess_val = hps_open_clip.create_model_and_transforms(
        arch(), None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
        with_region_predictor=False,
    )
    perturb_(model)
    here = work / "hps"
    here.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, here / "HPS_v2.1_compressed.pt")
    save_safetensors(here / "hps.safetensors", state)
    config_file = Path(hps_open_clip.__file__).parent / "model_configs" / f"{arch()}.json"
    save_json(here / "open_clip_config.json", json.loads(config_file.read_text()))
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    scores = [float(img_score.score(str(path), prompt, cp=str(here / "HPS_v2.1_compressed.pt"), hps_version="v2.1")[0])
              for path, prompt in zip(make_images(work), PROMPTS)]
    return {"scores": scores, "package": f"hpsv2 {getattr(hpsv2, '__version__', '1.2.0')}", "arch": arch()}


def ours(work: Path) -> dict:
    from common import images_tensor
    from transformers import AutoTokenizer

    from flowopd.scorers.hps import HPSScorer, load_hps_clip

    here = work / "hps"
    model = load_hps_clip(str(here / "hps.safetensors"), load_json(here / "open_clip_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(work / "clip_tokenizer"))
    scorer = HPSScorer(factory=lambda: (model, tokenizer), device="cpu")
    scores = [float(scorer.score(im, [p]).scores[0]) for im, p in zip(images_tensor(work), PROMPTS)]
    return {"scores": scores, "version": scorer.version}


STEPS = {"official-torch": official, "ours": ours}


def compare(work: Path) -> list[dict]:
    o, u = load_json(work / "hps" / "official-torch.json"), load_json(work / "hps" / "ours.json")
    d = max_abs_diff(o["scores"], u["scores"])
    return [{"scorer": "hps", "quantity": f"HPS v2.1 score (cosine), {o['arch']}", "n": len(o["scores"]),
             "max_abs_diff": d, "tolerance": TOLERANCE, "ok": d <= TOLERANCE, "note": ""}]
