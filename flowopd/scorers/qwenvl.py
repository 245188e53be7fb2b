"""A Qwen-VL instruct model as a judge of generated images: ``<OverallScore>`` 1-5 (METHOD.md s.5, QwenVL row).

The prompts are the Flow-OPD release's (CostaliyA/Flow-OPD ``flow_grpo/qwenvl.py``, MIT): with a prompt, one call
rates aesthetic quality, instruction following and an overall score that "PRIMARILY reflects instruction adherence"
(``mode="overall"``, the reported number); without, a quality-only prompt answers in ``<Score>``
(``mode="quality"``). Its local judge (used by ``scripts/eval_t2icompbench.py``) is Qwen/Qwen2.5-VL-7B-Instruct,
our default; its remote judge (a vLLM server; the release's launch script serves Qwen3-VL-30B-A3B-Instruct) adds the
line "**Be extremely strict.**" (``strict=True``).

Differences from the release, on purpose: greedy decoding is explicit (``do_sample=False``; the release relies on
the checkpoint's generation config, temperature 0 for the server); batched generation uses left padding (the
release pads on the processor's default side); scores stay on the native 1-5 scale (the release divides by 5
for its reward).

Parse failures (a reply without a score in 1-5): ``parse_failure="0"`` (default) scores them 0, as the release
does, so means are comparable with its numbers; ``parse_failure="nan"`` scores them NaN, which aggregates leave
out (a 0 pulls a 1-5 mean down). Either way every sample carries ``parse_ok``, and ``results.json`` records the
number of failures of each benchmark (``engine.parse_failures``).

Backends: local transformers (``factory`` or ``model_id``) or an OpenAI-compatible server (``base_url``; the
``openai`` package is imported only then; or an injected ``client``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from flowopd.scorers.base import Scale, ScoreBatch, check_images, to_uint8_hwc
from flowopd.scorers.clip_common import batches, check_prompts, from_pretrained, resolve_device
from flowopd.scorers.engine import engine_fields, package_version

CODE_VERSION = "1"
DEFAULT_MODEL_ID = "Qwen/Qwen2.5-VL-7B-Instruct"

_AESTHETIC_LEVELS = """1. Bad: Extremely blurry, underexposed with significant noise, indiscernible subjects, \
and chaotic composition.
2. Poor: Noticeable blur, poor lighting, washed-out colors, and awkward composition with cut-off subjects.
3. Fair: In focus with adequate lighting, dull colors, decent composition but lacks creativity.
4. Good: Sharp, good exposure, vibrant colors, thoughtful composition with a clear focal point.
5. Excellent: Exceptional clarity, perfect exposure, rich colors, masterful composition with emotional impact."""

QUALITY_TASK = f"""Your role is to evaluate the aesthetic quality score of given images.
{_AESTHETIC_LEVELS}

Please first provide a detailed analysis of the evaluation process, including the criteria for judging aesthetic \
quality, within the <Thought> tag. Then, give a final score from 1 to 5 within the <Score> tag.
<Thought>
[Analyze the evaluation process in detail here]
</Thought>
<Score>X</Score>"""

OVERALL_TASK = f"""Your role is to evaluate the generated image on three dimensions: aesthetic quality, instruction \
following, and an overall score that prioritizes instruction adherence.

=== Aesthetic Quality ===
{_AESTHETIC_LEVELS}

=== Instruction Following ===
Instruction: {{prompt}}
1. Bad: The image completely ignores or contradicts the instruction.
2. Poor: The image only vaguely relates to the instruction, missing most key elements.
3. Fair: The image partially follows the instruction, but misses or distorts some important elements.
4. Good: The image mostly follows the instruction with minor deviations.
5. Excellent: The image perfectly and faithfully follows the instruction.

=== Overall Score ===
The overall score should PRIMARILY reflect instruction adherence. An image that perfectly follows the instruction \
but has slightly lower aesthetic quality should score higher than a beautiful image that ignores the instruction.
1 = Bad, 2 = Poor, 3 = Fair, 4 = Good, 5 = Excellent

Please first provide a detailed analysis of all three dimensions within the <Thought> tag. Then, give three scores \
from 1 to 5 within the <QualityScore>, <InstructionScore>, and <OverallScore> tags.
<Thought>
[Analyze the aesthetic quality, instruction adherence, and overall impression in detail here]
</Thought>
<QualityScore>X</QualityScore>
<InstructionScore>Y</InstructionScore>
<OverallScore>Z</OverallScore>"""

# the release's remote judge: the blank line before "Please first" becomes this line
OVERALL_TASK_STRICT = OVERALL_TASK.replace("5 = Excellent\n\nPlease", "5 = Excellent\n**Be extremely strict.**\nPlease")

MODES = {"overall": "OverallScore", "quality": "Score"}
PARSE_FAILURES = {"0": 0.0, "nan": math.nan}  # what an unparsable reply scores; "0" is the release's


def build_task(prompt: str, *, mode: str = "overall", strict: bool = False) -> str:
    """The judge's text for one image: the quality-only task, or the overall task with the instruction filled in."""
    if mode == "quality":
        return QUALITY_TASK
    if mode != "overall":
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return (OVERALL_TASK_STRICT if strict else OVERALL_TASK).format(prompt=prompt)


def parse_tag(text: str, tag: str) -> float:
    """The first ``<tag>N</tag>`` with N a number in [1, 5]; NaN when absent or out of range."""
    match = re.search(rf"<{tag}>\s*(\d+(?:\.\d+)?)\s*</{tag}>", text)
    if match is None:
        return math.nan
    value = float(match.group(1))
    return value if 1.0 <= value <= 5.0 else math.nan


def parse_judgement(text: str, mode: str = "overall") -> dict[str, Any]:
    """Score and details of one reply. ``score`` is NaN and ``parse_ok`` False when the main tag is unusable."""
    score = parse_tag(text, MODES[mode])
    details: dict[str, Any] = {"parse_ok": not math.isnan(score)}
    if mode == "overall":
        for name, tag in (("quality", "QualityScore"), ("instruction", "InstructionScore")):
            value = parse_tag(text, tag)
            details[name] = None if math.isnan(value) else value
    return {"score": score, **details}


def png_data_url(image: Any) -> str:
    """A PIL image as a base64 PNG data URL (lossless, as the release sends it)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class TransformersJudgeBackend:
    """Batched greedy generation with a local vision-language model and its processor (left padding)."""

    def __init__(
        self, model: Any, processor: Any, *, device: torch.device, generation_kwargs: Mapping[str, Any]
    ) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.generation_kwargs = dict(generation_kwargs)

    @torch.inference_mode()
    def generate(self, images: Sequence[Any], tasks: Sequence[str]) -> list[str]:
        messages = [
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": task}]}]
            for image, task in zip(images, tasks)
        ]
        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        # left padding: every prompt ends at the same index, so generation continues each one correctly
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt").to(self.device)
        generated = self.model.generate(**inputs, **self.generation_kwargs)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class OpenAIJudgeBackend:
    """One chat-completions request per image to an OpenAI-compatible server (vLLM, SGLang...), temperature 0."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str = "EMPTY",
        client: Any = None,
        max_tokens: int = 2048,
        max_concurrency: int = 8,
        timeout: float = 600.0,
    ) -> None:
        if client is None:
            if base_url is None:
                raise ValueError(
                    "the OpenAI-compatible backend needs base_url (e.g. 'http://127.0.0.1:8001/v1') or client"
                )
            try:
                from openai import OpenAI
            except ImportError as e:
                raise ImportError("the server backend needs the openai package: pip install 'flowopd[judge]'") from e
            client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout)
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency

    def request(self, image: Any, task: str) -> dict[str, Any]:
        """The chat-completions arguments for one image (the release's message layout)."""
        return {
            "model": self.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    {"type": "text", "text": task},
                ],
            }],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }

    def _one(self, args: dict[str, Any]) -> str:
        response = self.client.chat.completions.create(**args)
        return response.choices[0].message.content or ""

    def generate(self, images: Sequence[Any], tasks: Sequence[str]) -> list[str]:
        requests = [self.request(image, task) for image, task in zip(images, tasks)]
        with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
            return list(pool.map(self._one, requests))


class QwenVLJudge:
    """A VLM judge on (N, 3, H, W) float [0, 1] images and one prompt (instruction) per image.

    Backend: ``base_url`` or ``client`` -> OpenAI-compatible server (``served_model`` names the model there,
    default ``model_id``); else local transformers, from ``factory`` (returns ``(model, processor)``) or ``model_id``
    (hub id or local directory). Details per image: ``parse_ok``, the judge's ``text``, and in overall mode the
    ``quality`` and ``instruction`` sub-scores (None when missing). ``parse_failure`` ("0" or "nan") is the score of
    a reply without a usable score (see the module docstring).
    """

    name = "qwenvl"
    higher_is_better = True
    scale = Scale(1.0, 5.0)

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        mode: str = "overall",
        strict: bool = False,
        factory: Callable[[], tuple[Any, Any]] | None = None,
        base_url: str | None = None,
        client: Any = None,
        api_key: str = "EMPTY",
        served_model: str | None = None,
        max_concurrency: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        batch_size: int = 8,
        max_new_tokens: int = 2048,
        generation_kwargs: Mapping[str, Any] | None = None,
        parse_failure: str = "0",
    ) -> None:
        build_task("", mode=mode)  # validates mode
        if str(parse_failure) not in PARSE_FAILURES:
            raise ValueError(
                f"QwenVLJudge: parse_failure must be one of {sorted(PARSE_FAILURES)}, got {parse_failure!r}"
            )
        self.parse_failure = str(parse_failure)
        self.mode, self.strict, self.batch_size = mode, strict, batch_size
        if base_url is not None or client is not None:
            self.backend: Any = OpenAIJudgeBackend(
                model=served_model or model_id, base_url=base_url, api_key=api_key, client=client,
                max_tokens=max_new_tokens, max_concurrency=max_concurrency,
            )
            where = f"openai:{base_url or 'injected-client'}:{served_model or model_id}"
        else:
            if factory is None:
                from transformers import AutoModelForImageTextToText, AutoProcessor

                model = from_pretrained(
                    AutoModelForImageTextToText.from_pretrained, model_id, what="judge model", param="model_id",
                    torch_dtype=dtype,
                )
                processor = from_pretrained(
                    AutoProcessor.from_pretrained, model_id, what="judge processor", param="model_id"
                )
            else:
                model, processor = factory()
            device = resolve_device(device)
            model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
            kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **(generation_kwargs or {})}
            self.backend = TransformersJudgeBackend(model, processor, device=device, generation_kwargs=kwargs)
            where = f"transformers:{model_id}" + (";injected" if factory is not None else "")
        template = build_task("{prompt}", mode=mode, strict=strict)
        prompt_hash = hashlib.sha256(template.encode()).hexdigest()[:12]
        precision = "server" if base_url is not None or client is not None else str(dtype).removeprefix("torch.")
        self.version = (
            f"code={CODE_VERSION};{where};mode={mode};strict={strict};prompt={prompt_hash};max_new_tokens={max_new_tokens};"
            f"parse_failure={self.parse_failure};"
            + engine_fields("flowopd-port", f"transformers-{package_version('transformers')}", where.replace(";", ","),
                            precision, official=False)
        )

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> ScoreBatch:
        from PIL import Image

        check_images(images)
        prompts = check_prompts(images, prompts)
        pils = [Image.fromarray(arr) for arr in to_uint8_hwc(images)]
        replies: list[str] = []
        for s in batches(len(pils), self.batch_size):
            tasks = [build_task(p, mode=self.mode, strict=self.strict) for p in prompts[s]]
            replies.extend(self.backend.generate(pils[s], tasks))
        parsed = [parse_judgement(text, self.mode) for text in replies]
        details: dict[str, list[Any]] = (
            {key: [p[key] for p in parsed] for key in parsed[0] if key != "score"} if parsed else {}
        )
        details["text"] = replies
        failed = PARSE_FAILURES[self.parse_failure]
        return ScoreBatch(
            np.array([p["score"] if p["parse_ok"] else failed for p in parsed], dtype=np.float64), details
        )
