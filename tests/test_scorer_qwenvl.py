"""QwenVLJudge: prompts, parsing, the local backend on a tiny random Qwen2.5-VL, the server backend against a fake
OpenAI-compatible HTTP server on 127.0.0.1 and an injected client."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from flowopd.scorers.base import nanmean
from flowopd.scorers.qwenvl import (
    OVERALL_TASK,
    OVERALL_TASK_STRICT,
    QUALITY_TASK,
    QwenVLJudge,
    build_task,
    parse_judgement,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["a red cube", "two dogs playing in the snow at night, photorealistic", "x"]


def tiny_qwen_tokenizer():
    """Byte-level BPE without merges plus Qwen's chat/vision special tokens and a Qwen-like chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    # whole template lines as added tokens keep the ~1900-character judge prompt to a few dozen tokens (test speed)
    lines = {line for task in (OVERALL_TASK, QUALITY_TASK) for line in task.splitlines() if line and "{" not in line}
    tokenizer.add_tokens([AddedToken(line, normalized=False) for line in sorted(lines)])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class TinyQwenProcessor:
    """Stand-in for Qwen2_5_VLProcessor, which cannot be built here (its video processor needs torchvision): the
    same chat template role, ``<|image_pad|>`` expanded to one token per merged patch, tokenizer and decoding."""

    def __init__(self, tokenizer):
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, text, images, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        vision = self.image_processor(images=images, return_tensors=return_tensors)
        merge = self.image_processor.merge_size**2
        text = [t.replace("<|image_pad|>", "<|image_pad|>" * (int(thw.prod()) // merge))
                for t, thw in zip(text, vision["image_grid_thw"])]
        return BatchFeature({**self.tokenizer(text, padding=padding, return_tensors=return_tensors), **vision})

    def batch_decode(self, ids, **kwargs):
        return self.tokenizer.batch_decode(ids, **kwargs)


def tiny_qwen25_vl(tokenizer, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            max_position_embeddings=512, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def local_parts():
    tokenizer = tiny_qwen_tokenizer()
    return tiny_qwen25_vl(tokenizer), TinyQwenProcessor(tokenizer)


def _images(n, size=32, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ prompts and parsing


def test_tasks_are_the_release_prompts():
    assert build_task("ignored", mode="quality") == QUALITY_TASK
    task = build_task("a {curly} cat")
    assert "Instruction: a {curly} cat\n" in task and task.endswith("<OverallScore>Z</OverallScore>")
    assert "**Be extremely strict.**" not in task
    strict = build_task("a cat", strict=True)
    assert "5 = Excellent\n**Be extremely strict.**\nPlease first" in strict
    assert len(OVERALL_TASK_STRICT) == len(OVERALL_TASK) + len("**Be extremely strict.**")
    with pytest.raises(ValueError, match="mode"):
        build_task("a cat", mode="vibes")


@pytest.mark.parametrize(
    ("text", "score", "quality", "instruction"),
    [
        ("<Thought>ok</Thought><QualityScore>3</QualityScore><InstructionScore>5</InstructionScore>"
         "<OverallScore>4</OverallScore>", 4.0, 3.0, 5.0),
        ("<OverallScore> 2 </OverallScore>", 2.0, None, None),
        ("echo <OverallScore>Z</OverallScore> then <OverallScore>5</OverallScore>", 5.0, None, None),  # first number
        ("<OverallScore>4.5</OverallScore>", 4.5, None, None),
        ("<OverallScore>7</OverallScore>", math.nan, None, None),  # out of range: a failure, not a 7
        ("<OverallScore>0</OverallScore>", math.nan, None, None),
        ("I think it deserves a 4.", math.nan, None, None),  # no tag: never a silent 0
        ("", math.nan, None, None),
    ],
)
def test_parse_overall(text, score, quality, instruction):
    parsed = parse_judgement(text)
    if math.isnan(score):
        assert math.isnan(parsed["score"]) and parsed["parse_ok"] is False
    else:
        assert parsed["score"] == score and parsed["parse_ok"] is True
    assert parsed["quality"] == quality and parsed["instruction"] == instruction


def test_parse_quality_mode():
    assert parse_judgement("<Thought>x</Thought><Score>3</Score>", "quality") == {"score": 3.0, "parse_ok": True}
    assert parse_judgement("<OverallScore>3</OverallScore>", "quality")["parse_ok"] is False


# ------------------------------------------------------------------------------------------ local backend


def test_local_tiny_qwen25_vl_batch_equals_one_by_one(local_parts):
    images = _images(3)
    full = QwenVLJudge(factory=lambda: local_parts, device="cpu", dtype=torch.float32, batch_size=3,
                       max_new_tokens=6).score(images, PROMPTS, [{}] * 3)
    one = QwenVLJudge(factory=lambda: local_parts, device="cpu", dtype=torch.float32, batch_size=1,
                      max_new_tokens=6).score(images, PROMPTS, [{}] * 3)
    assert full.details["text"] == one.details["text"]  # greedy + left padding: batching changes nothing
    assert all(isinstance(t, str) and t for t in full.details["text"])
    assert full.scores.shape == (3,) and full.scores.dtype == np.float64
    # a random model writes no tag: every score is a failure, scored 0 as the release does and reported in parse_ok
    assert (full.scores == 0).all() and full.details["parse_ok"] == [False] * 3
    again = QwenVLJudge(factory=lambda: local_parts, device="cpu", dtype=torch.float32, batch_size=3,
                        max_new_tokens=6).score(images, PROMPTS)
    assert again.details["text"] == full.details["text"]


class ScriptedVLM(nn.Module):
    """Records what ``generate`` receives and appends a fixed reply per row (after the left-padded prompts)."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []
        self.dummy = nn.Parameter(torch.zeros(1))

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        ids = kwargs["input_ids"]
        start = sum(len(c["input_ids"]) for c in self.calls[:-1])
        replies = [self.tokenizer(r + "<|im_end|>")["input_ids"] for r in self.replies[start : start + len(ids)]]
        width = max(map(len, replies))
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in replies])
        return torch.cat([ids, new], dim=1)


def test_local_backend_trims_prompts_and_parses_replies():
    tokenizer = tiny_qwen_tokenizer()
    replies = ["<QualityScore>3</QualityScore><InstructionScore>4</InstructionScore><OverallScore>4</OverallScore>",
               "no score here", "<OverallScore>2</OverallScore>"]
    model = ScriptedVLM(tokenizer, replies)
    judge = QwenVLJudge(factory=lambda: (model, TinyQwenProcessor(tokenizer)), device="cpu", dtype=torch.float32,
                        max_new_tokens=99)
    batch = judge.score(_images(3), PROMPTS)
    np.testing.assert_array_equal(batch.scores, [4.0, 0.0, 2.0])
    assert batch.details["parse_ok"] == [True, False, True]
    assert batch.details["quality"] == [3.0, None, None] and batch.details["instruction"] == [4.0, None, None]
    assert batch.details["text"] == replies  # the prompt is cut off, special tokens dropped
    call = model.calls[0]
    assert call["do_sample"] is False and call["max_new_tokens"] == 99
    assert "pixel_values" in call and call["image_grid_thw"].shape == (3, 3)
    mask = call["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
    prompt_text = tokenizer.decode(call["input_ids"][1][mask[1].bool()])
    assert "Instruction: two dogs playing in the snow at night, photorealistic\n" in prompt_text


def test_offline_local_loading_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"Qwen/Qwen2.5-VL-7B-Instruct(.|\n)*model_id='/path/to/local/dir'"):
        QwenVLJudge(device="cpu")


# ------------------------------------------------------------------------------------------ server backend


class FakeClient:
    """An injected OpenAI-style client: ``chat.completions.create(**kwargs)`` -> object with choices[0].message."""

    def __init__(self, reply_for):
        self.requests, self.reply_for = [], reply_for
        self.chat = type("Chat", (), {"completions": self})()

    def create(self, **kwargs):
        self.requests.append(kwargs)
        content = self.reply_for(kwargs["messages"][0]["content"][1]["text"])
        message = type("M", (), {"content": content})()
        return type("R", (), {"choices": [type("C", (), {"message": message})()]})()


def _reply(task: str) -> str:
    if "red cube" in task:
        return ("<Thought>fine</Thought><QualityScore>4</QualityScore><InstructionScore>5</InstructionScore>"
                "<OverallScore>5</OverallScore>")
    if "dogs" in task:
        return "<OverallScore>3</OverallScore>"
    return "I cannot rate this."


def _decode_png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_injected_client_requests_and_parsing():
    client = FakeClient(_reply)
    judge = QwenVLJudge(client=client, served_model="judge-7b", max_new_tokens=512, strict=True)
    images = _images(3, size=20)
    batch = judge.score(images, PROMPTS)
    np.testing.assert_array_equal(batch.scores, [5.0, 3.0, 0.0])
    assert batch.details["parse_ok"] == [True, True, False]
    assert len(client.requests) == 3
    by_text = {r["messages"][0]["content"][1]["text"]: r for r in client.requests}
    for i, prompt in enumerate(PROMPTS):
        req = by_text[build_task(prompt, strict=True)]
        assert req["model"] == "judge-7b" and req["temperature"] == 0 and req["max_tokens"] == 512
        png = np.asarray(_decode_png(req["messages"][0]["content"][0]["image_url"]["url"]))
        expected = (images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(png, expected)  # lossless PNG of the exact pixels
    assert "openai:injected-client:judge-7b" in judge.version and "strict=True" in judge.version


class _ChatHandler(BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append((self.path, self.headers.get("Authorization"), body))
        content = _reply(body["messages"][0]["content"][1]["text"])
        payload = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    _ChatHandler.bodies = []
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_server_backend_over_http(fake_server):
    pytest.importorskip("openai")
    judge = QwenVLJudge(base_url=fake_server, api_key="secret", served_model="Qwen2.5-VL-7B-Instruct",
                        max_concurrency=2)
    batch = judge.score(_images(3), PROMPTS)
    np.testing.assert_array_equal(batch.scores, [5.0, 3.0, 0.0])
    assert batch.details["quality"] == [4.0, None, None]
    assert len(_ChatHandler.bodies) == 3
    for path, auth, body in _ChatHandler.bodies:
        assert path == "/v1/chat/completions" and auth == "Bearer secret"
        assert body["model"] == "Qwen2.5-VL-7B-Instruct" and body["temperature"] == 0 and body["max_tokens"] == 2048
        assert body["messages"][0]["content"][0]["type"] == "image_url"


def test_parse_failure_policy_zero_by_default_nan_on_request_and_counted():
    """The release scores an unparsable reply 0 (our default, for comparable means); "nan" leaves it out of means.
    Either way results.json counts the failures (engine.parse_failures)."""
    import pandas as pd

    from flowopd.scorers.engine import engine_record

    tokenizer = tiny_qwen_tokenizer()
    replies = ["<OverallScore>4</OverallScore>", "no score here", "<OverallScore>9</OverallScore>"]

    def judge(**kw):
        model = ScriptedVLM(tokenizer, replies)
        return QwenVLJudge(factory=lambda: (model, TinyQwenProcessor(tokenizer)), device="cpu", dtype=torch.float32,
                           max_new_tokens=8, **kw)

    zero, nan = judge(), judge(parse_failure="nan")
    assert "parse_failure=0" in zero.version and "parse_failure=nan" in nan.version
    z, n = zero.score(_images(3), PROMPTS), nan.score(_images(3), PROMPTS)
    np.testing.assert_array_equal(z.scores, [4.0, 0.0, 0.0])
    np.testing.assert_array_equal(n.scores, [4.0, np.nan, np.nan])
    assert nanmean(n.scores) == 4.0 and z.details["parse_ok"] == n.details["parse_ok"] == [True, False, False]
    for scorer, batch in ((zero, z), (nan, n)):
        record = engine_record(scorer, pd.DataFrame(batch.rows()))
        assert record["parse_failures"] == 2 and record["official"] is False


@pytest.mark.parametrize("bad", ["zero", "NaN ", 1, None])
def test_bad_parse_failure_is_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match="parse_failure must be one of"):
        QwenVLJudge(client=object(), parse_failure=bad)
