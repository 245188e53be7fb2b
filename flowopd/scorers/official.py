"""``engine = "official"``: score with the official package instead of our port (docs/scorers/parity.md).

ImageReward (``image-reward``), HPS v2.1 (``hpsv2``) and the LAION aesthetic predictor (openai ``clip`` + the
predictor's MLP) have ports on transformers (the default, ``engine = "port"``). A user who distrusts a port scores
with the original in one option: ``engine = "official"`` runs the package in this process when it is installed
(as in its nox environment), and otherwise talks to the scorer server of that environment::

    nox -s "serve(scorer='imagereward-official')"      # serves on http://127.0.0.1:8771

The packages pin stacks that conflict with ours (image-reward: transformers < 4.47 and timm 0.6), hence the
separate environment. The wrappers below call the packages' own preprocessing and forward; nothing is re-typed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flowopd.scorers.base import ScoreBatch, check_images, to_uint8_hwc
from flowopd.scorers.clip_common import check_prompts, load_aesthetic_mlp, resolve_device
from flowopd.scorers.engine import engine_fields, package_version, version_fields

ENGINES = ("port", "official")
# scorer -> (loopback port of its official server, the import that proves the package is here, its distribution)
OFFICIAL = {
    "imagereward": (8771, "ImageReward", "image-reward"),
    "hps": (8772, "hpsv2", "hpsv2"),
    "aesthetic": (8773, "clip", "openai-clip"),
}


class OfficialEngineUnavailable(OSError):
    """engine='official' was asked for, but neither the package nor its server is available."""


def check_engine(name: str, engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"{name}: engine must be one of {ENGINES}, got {engine!r}")


def default_url(name: str) -> str:
    return f"http://127.0.0.1:{OFFICIAL[name][0]}"


def package_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(OFFICIAL[name][1]) is not None


def connect(name: str, url: str | None, startup_wait: float = 0.0) -> Any:
    """A RemoteScorer for the official engine of ``name``; one-line errors when it is not there."""
    from flowopd.scorers.client import RemoteScorer, RemoteScorerError, ScorerServerUnreachable

    url = url or default_url(name)
    session = f"nox -s \"serve(scorer='{name}-official')\""
    try:
        remote = RemoteScorer(url, startup_wait=startup_wait, expected_name=name)
    except ScorerServerUnreachable:
        raise OfficialEngineUnavailable(
            f"{name}: engine='official' needs the {OFFICIAL[name][2]} package, which is not installed here, or its "
            f"server, which does not answer at {url}; start it with {session} (or pass official_url=...)"
        ) from None
    except RemoteScorerError as e:
        raise OfficialEngineUnavailable(f"{name}: engine='official': {e}") from None
    if version_fields(remote.version).get("engine") != OFFICIAL[name][2]:
        raise OfficialEngineUnavailable(
            f"{name}: the server at {url} does not run the official engine (its version is {remote.version!r}); "
            f"start it with {session}"
        )
    return remote


def official_or_remote(name: str, url: str | None, build: Callable[[], Any]) -> Any:
    """The in-process official scorer when its package is installed, else the official server's client."""
    return build() if package_available(name) else connect(name, url)


def _pils(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8_hwc(check_images(images))]


class ImageRewardPackage:
    """``ImageReward.load(...).score(prompt, image)`` of the ``image-reward`` package, image by image.

    ``model`` is ``"ImageReward-v1.0"`` (downloaded by the package) or a local ``ImageReward.pt``; ``med_config``
    the BLIP text config (the package downloads it when None).
    """

    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", med_config: str | None = None,
                 device: str | torch.device | None = None) -> None:
        import ImageReward as RM

        self.device = resolve_device(device)
        self.model = RM.load(model, device=str(self.device), med_config=med_config).eval()
        official = model == "ImageReward-v1.0" or os.path.basename(model) == "ImageReward.pt"
        self.version = "code=1;" + engine_fields(
            "image-reward", package_version("image-reward"), model, "fp32", official
        )

    @torch.no_grad()
    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> ScoreBatch:
        prompts = check_prompts(images, prompts)
        return ScoreBatch(
            np.array([self.model.score(p, im) for p, im in zip(prompts, _pils(images))], dtype=np.float64)
        )


class HPSPackage:
    """``hpsv2.img_score.score(image, prompt, cp=..., hps_version="v2.1")``: the package's own model, transform,
    tokenizer and autocast (fp16 on CUDA, fp32 on CPU). ``checkpoint`` is a local ``HPS_v2.1_compressed.pt``
    (None: the package downloads it)."""

    name = "hps"

    def __init__(self, checkpoint: str | None = None, hps_version: str = "v2.1") -> None:
        from hpsv2 import img_score

        self._score = img_score.score
        self.checkpoint = checkpoint
        self.hps_version = hps_version
        precision = "amp-fp16" if torch.cuda.is_available() else "fp32"
        official = hps_version == "v2.1" and (
            checkpoint is None or os.path.basename(checkpoint) == "HPS_v2.1_compressed.pt"
        )
        self.version = "code=1;" + engine_fields(
            "hpsv2", package_version("hpsv2"), checkpoint or f"xswu/HPSv2:{hps_version}", precision, official
        )

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> ScoreBatch:
        prompts = check_prompts(images, prompts)
        kwargs = {"hps_version": self.hps_version} | ({"cp": self.checkpoint} if self.checkpoint else {})
        return ScoreBatch(np.array([float(self._score(im, p, **kwargs)[0]) for p, im in zip(prompts, _pils(images))]))


class AestheticPackage:
    """openai ``clip`` ViT-L/14 (``clip.load``) + the predictor's MLP on the L2-normalised image embedding, as
    improved-aesthetic-predictor's ``simple_inference.py`` (fp16 on CUDA, fp32 on CPU, as ``clip.load`` does)."""

    name = "aesthetic"

    def __init__(self, mlp_path: str, clip_model: str = "ViT-L/14", device: str | torch.device | None = None) -> None:
        import clip

        self.device = resolve_device(device)
        self.clip, self.preprocess = clip.load(clip_model, device=str(self.device), jit=False)
        self.mlp = load_aesthetic_mlp(mlp_path).to(self.device)
        precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.version = "code=1;" + engine_fields("openai-clip", package_version("openai-clip"),
                                                 f"{clip_model}+{os.path.basename(mlp_path)}", precision, True)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
              metadata: Sequence[Mapping[str, Any]] | None = None) -> ScoreBatch:
        pixels = torch.stack([self.preprocess(im) for im in _pils(images)]).to(self.device)
        features = self.clip.encode_image(pixels).float()
        features = features / features.norm(dim=-1, keepdim=True)
        return ScoreBatch(self.mlp(features).squeeze(-1).double().cpu().numpy())
