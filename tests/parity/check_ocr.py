"""OCR decode-to-score: PaddleOCR 2.9.1's pipeline and Flow-GRPO's reward vs flowopd.scorers.ocr on the same engine.

The PP-OCR networks are not in the wheel and cannot be downloaded here, so the pipeline runs on stand-in Paddle
inference models with the real input/output contracts (written with ``paddle.jit.save``): a detector whose
probability map is high on dark pixels (DB post-processing then finds boxes), a recogniser whose per-column
logits are a seeded random convolution, sharpened so that the CTC decode yields confident text (PaddleOCR's
``drop_score`` 0.5 applies), and an angle classifier that is never called (``cls=False``). Everything else is
PaddleOCR's own: detection pre-processing, DB post-processing, box sorting and cropping, recognition
pre-processing, ``CTCLabelDecode`` with ``en_dict.txt`` and the space character, and ``drop_score``.

Official side: ``PaddleOCR(use_angle_cls=False, lang="en", ...)`` as Flow-GRPO builds it, ``ocr(rgb, cls=False)``
on the RGB array (as Flow-GRPO passes it), and Flow-GRPO's reward (METHOD.md s.5: first quoted text, lower case
without spaces, distance 0 for a substring, else python-Levenshtein's distance clipped to the target length).
Ours, in the same environment: ``OCRScorer(engine="auto")`` with the stand-in model directories (which must
choose PaddleOCR) on the same images and prompts. The prompts quote pieces of the recognised text (exact,
edited, absent), so that every branch of the rule is exercised.
"""

from __future__ import annotations

from pathlib import Path

from common import load_images, load_json, max_abs_diff

TOLERANCE = 1e-12
WHY = "the same recognised text through the same rule: must agree exactly (float rounding only)"


def flow_grpo_reward(result, prompt: str) -> float:
    """Flow-GRPO's OCR reward for one image (METHOD.md s.5), on PaddleOCR 2.x's ``ocr()`` result."""
    from Levenshtein import distance

    target = prompt.split('"')[1].replace(" ", "").lower()
    recognised = "".join(res[1][0] if res[1][1] > 0 else "" for res in result[0]) if result[0] else ""
    recognised = recognised.replace(" ", "").lower()
    dist = 0 if target in recognised else min(distance(recognised, target), len(target))
    return 1 - dist / len(target)


def _prompts(texts: list[str]) -> list[list[str]]:
    out = []
    for text in texts:
        clean = text.replace(" ", "").replace('"', "") or "flow"
        piece = clean[1:7] or clean
        edited = piece[:2] + ("x" if piece[2:3] != "x" else "y") + piece[3:]
        out.append([f'a sign that says "{piece}"', f'a sign that says "{edited}"', 'a sign that says "Hello 42"',
                    f'a shirt with "{clean}" and more'])
    return out


def official(work: Path) -> dict:
    import numpy as np
    from paddle_standins import export

    dirs = export(work / "ocr" / "models")
    from paddleocr import PaddleOCR

    engine = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False, det_model_dir=dirs["det"],
                       rec_model_dir=dirs["rec"], cls_model_dir=dirs["cls"])
    arrays = [np.asarray(im) for im in load_images(work)]
    results = [engine.ocr(a, cls=False) for a in arrays]
    texts = ["".join(line[1][0] for line in r[0]) if r and r[0] else "" for r in results]
    prompts = _prompts(texts)
    rewards = [[flow_grpo_reward(r, p) for p in ps] for r, ps in zip(results, prompts)]
    import paddle
    import paddleocr

    return {"dirs": dirs, "texts": texts, "prompts": prompts, "rewards": rewards,
            "n_pieces": [len(r[0]) if r and r[0] else 0 for r in results],
            "package": f"paddleocr {paddleocr.__version__} + paddlepaddle {paddle.__version__}"}


def ours(work: Path) -> dict:
    import numpy as np
    import torch

    from flowopd.scorers.engine import engine_record
    from flowopd.scorers.ocr import OCRScorer

    side = load_json(work / "ocr" / "official-paddle.json")
    scorer = OCRScorer(engine="auto", engine_options={f"{k}_model_dir": v for k, v in side["dirs"].items()})
    scores = []
    for image, prompts in zip(load_images(work), side["prompts"]):
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
        scores.append([float(scorer.score(tensor, [p], [{}]).scores[0]) for p in prompts])
    return {"scores": scores, "engine": scorer.engine_name, "version": scorer.version,
            "engine_record": engine_record(scorer)}


def _ours_in_paddle_env(work: Path) -> dict:
    return ours(work)


STEPS = {"official-paddle": official, "ours-paddle": _ours_in_paddle_env}


def compare(work: Path) -> list[dict]:
    o, u = load_json(work / "ocr" / "official-paddle.json"), load_json(work / "ocr" / "ours-paddle.json")
    flat_o = [x for row in o["rewards"] for x in row]
    flat_u = [x for row in u["scores"] for x in row]
    d = max_abs_diff(flat_o, flat_u)
    distinct = sorted({round(x, 3) for x in flat_o})
    return [
        {"scorer": "ocr", "quantity": "OCR accuracy, PaddleOCR pipeline + CTC decode", "n": len(flat_o),
         "max_abs_diff": d, "tolerance": TOLERANCE, "ok": d <= TOLERANCE,
         "note": f"{o['package']}; stand-in networks; {sum(o['n_pieces'])} text pieces read; rewards {distinct}"},
        {"scorer": "ocr", "quantity": "engine='auto' chose paddleocr (recorded)", "n": 1,
         "max_abs_diff": 0.0 if u["engine"] == "paddleocr" else 1.0, "tolerance": 0.0,
         "ok": u["engine"] == "paddleocr" and u["engine_record"]["engine"] == "paddleocr",
         "note": f"version: {u['version']}"},
    ]
