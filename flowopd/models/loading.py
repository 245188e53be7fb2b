"""Resolve a CHECKPOINT argument to a Policy.

Accepted forms: ``mini:NAME`` (a committed mini-world checkpoint or adapter under flowopd/assets/mini/),
a mini checkpoint directory, a diffusers SD3 directory or hub id, a LoRA adapter directory (peft format)
whose base is named by ``--base`` or by its ``adapter_config.json``, and the training outputs that hold one:
a checkpoint ``RUN/checkpoints/iteration-N`` (its ``adapter/``) or a run directory ``RUN`` (the adapter of
its newest checkpoint, as ``python -m flowopd.train publish`` takes it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from flowopd.models.policy import Policy
from flowopd.models.sd3 import SD35M_ID, SD3Policy, offline_hint

DEFAULT_CHECKPOINT = "mini:base"


def checkpoint_dir(checkpoint: str) -> Path:
    if checkpoint.startswith("mini:"):
        from flowopd.models.mini import ASSETS_DIR

        return ASSETS_DIR / checkpoint.removeprefix("mini:")
    return Path(checkpoint)


def model_dir(checkpoint: str) -> Path:
    """Where the model of ``checkpoint`` lies: :func:`checkpoint_dir`, then into a training checkpoint's
    ``adapter/`` or a run directory's newest ``checkpoints/iteration-N/adapter``. A path that is none of
    these (a model directory, a hub id, a missing path) is returned as :func:`checkpoint_dir` gives it."""
    path = checkpoint_dir(checkpoint)
    if (path / "checkpoints").is_dir() and not (path / "adapter_config.json").is_file():
        found = sorted((path / "checkpoints").glob("iteration-[0-9]*[0-9]"))
        if not found:
            raise FileNotFoundError(f"{checkpoint}: a training run directory without checkpoints "
                                    f"(checkpoints/iteration-N); pass an adapter or checkpoint directory")
        path = found[-1]
    if (path / "adapter" / "adapter_config.json").is_file() and not (path / "adapter_config.json").is_file():
        path = path / "adapter"
    return path


def adapter_base(checkpoint: str, base: str | None = None) -> str:
    """The base model of a LoRA adapter checkpoint."""
    config = json.loads((model_dir(checkpoint) / "adapter_config.json").read_text())
    return base or config.get("base_model_name_or_path") or SD35M_ID


def checkpoint_kind(checkpoint: str) -> str:
    """One of ``mini``, ``sd3``, ``lora``."""
    path = model_dir(checkpoint)
    if (path / "adapter_config.json").is_file():
        return "lora"
    if checkpoint.startswith("mini:"):
        return "mini"
    config = path / "config.json"
    if config.is_file() and str(json.loads(config.read_text()).get("format", "")).startswith("flowopd-mini"):
        return "mini"
    return "sd3"  # a diffusers directory or a hub id


def is_mini(checkpoint: str, base: str | None = None) -> bool:
    """Whether a checkpoint belongs to the mini world (directly, or as an adapter on a mini base)."""
    kind = checkpoint_kind(checkpoint)
    return kind == "mini" or (kind == "lora" and checkpoint_kind(adapter_base(checkpoint, base)) == "mini")


#: files up to this size are hashed in full (every adapter, the mini models); larger ones by size, mtime and a
#: hash of their first HEADER_BYTES (a safetensors file's header names every tensor, its dtype, shape and offsets)
FULL_HASH_MAX_BYTES = 64 * 2**20
HEADER_BYTES = 2**20
#: what makes a model directory the model it is (README, logs and images do not)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".model", ".txt")


def file_fingerprint(path: Path) -> str:
    """``sha256:HEX`` of a small file; ``size+mtime+header:SIZE:MTIME_NS:HEX`` of a large one (recorded as such)."""
    stat = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= FULL_HASH_MAX_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        h.update(f.read(HEADER_BYTES))
    return f"size+mtime+header:{stat.st_size}:{stat.st_mtime_ns}:{h.hexdigest()}"


def _hub_revision(model_id: str) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (None when it is not cached)."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("model_index.json", "config.json", "adapter_config.json"):
        found = try_to_load_from_cache(model_id, name)
        if isinstance(found, str):
            return Path(found).parent.name  # .../snapshots/<commit>/<file>
    return None


def checkpoint_identity(checkpoint: str, base: str | None = None) -> dict[str, Any]:
    """What a CHECKPOINT argument evaluates, cheaply: a hub model by its id and resolved revision; a local model
    or adapter (``mini:NAME``, a directory, a run or training checkpoint resolved by :func:`model_dir`) by the
    fingerprints of its model files (:func:`file_fingerprint`), an adapter together with its base's identity.
    Image and score caches are keyed by it (flowopd.bench.evaluate), so two checkpoints that differ in any weight
    never share images, whatever they are called."""
    path = model_dir(checkpoint)
    if not path.exists():
        if checkpoint.startswith("mini:") or checkpoint.startswith((".", "/")):
            raise FileNotFoundError(f"{checkpoint}: no such checkpoint ({path})")
        return {"kind": "hub", "id": checkpoint, "revision": _hub_revision(checkpoint) or "unresolved"}
    if path.is_file():
        raise ValueError(f"{checkpoint}: a file; a checkpoint is a directory (model, adapter or training run)")
    files = {
        str(f.relative_to(path)): file_fingerprint(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES and not any(p.startswith(".") for p in f.relative_to(path).parts)
    }
    if not files:
        raise FileNotFoundError(f"{checkpoint}: {path} holds no model files ({', '.join(MODEL_FILE_SUFFIXES)})")
    identity: dict[str, Any] = {"kind": "local", "path": str(path.resolve()), "files": files}
    if checkpoint_kind(checkpoint) == "lora":
        identity["base"] = checkpoint_identity(adapter_base(checkpoint, base))
    return identity


def identity_summary(identity: dict[str, Any]) -> str:
    """A short, comparable description of a checkpoint identity: what it is and a digest of everything in it but
    paths (a copied model is the same model), e.g. ``local weights 3f2a9c01d4e7``, ``hub org/model@<commit>``."""
    kind = identity.get("kind")
    if kind == "hub":
        return f"hub {identity.get('id')}@{identity.get('revision')}"
    if kind != "local":
        return f"{kind} " + ", ".join(f"{k}={v}" for k, v in identity.items() if k != "kind")

    def strip(value: Any) -> Any:
        return {k: strip(v) for k, v in value.items() if k != "path"} if isinstance(value, dict) else value

    digest = hashlib.sha256(json.dumps(strip(identity), sort_keys=True).encode()).hexdigest()[:12]
    return f"local weights {digest}" + (" (adapter + base)" if "base" in identity else "")


def load_policy(
    checkpoint: str,
    base: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Policy:
    kind = checkpoint_kind(checkpoint)
    if kind == "mini":
        from flowopd.models.mini import load_mini

        return load_mini(checkpoint, device=device)
    if kind == "sd3":
        return SD3Policy.from_pretrained(checkpoint, device=device, dtype=dtype)
    base_name = adapter_base(checkpoint, base)
    policy = load_policy(base_name, device=device, dtype=dtype)
    target = policy.transformer if isinstance(policy, SD3Policy) else policy.net
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(target, str(model_dir(checkpoint))).merge_and_unload()
    except (OSError, ValueError) as e:
        raise offline_hint(checkpoint, e) from None
    if isinstance(policy, SD3Policy):
        policy.pipe.transformer = policy.transformer = merged.eval()
    else:
        policy.net = merged.eval()
    return policy
