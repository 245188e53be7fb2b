"""Resolve a CHECKPOINT argument once, to a :class:`Checkpoint`, and load it as a Policy.

Accepted forms: ``mini:NAME`` (a committed mini-world checkpoint or adapter under flowopd/assets/mini/),
a mini checkpoint directory (a pretrain run's directory: its final model), a diffusers SD3 directory or hub id,
a LoRA adapter directory (peft format) whose base is named by ``--base`` or by its ``adapter_config.json``, and
the training outputs that hold one: a checkpoint ``RUN/checkpoints/iteration-N`` (its ``adapter/``) or a run
directory ``RUN`` (the adapter of its newest checkpoint, as ``python -m flowopd.train publish`` takes it).

:func:`resolve_checkpoint` reads the file system once - where the model lies, which kind it is, an adapter's base -
and returns a frozen :class:`Checkpoint`; the evaluation harness, the image cache and :func:`load_policy` take that
value, and its :attr:`Checkpoint.identity` is what image and score caches are keyed by (flowopd.bench.evaluate).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from flowopd.models.policy import Policy
from flowopd.models.sd3 import SD35M_ID, SD3Policy, offline_hint

DEFAULT_CHECKPOINT = "mini:base"
#: how a name that can only be a local checkpoint begins (missing, it is an error, not a hub id)
LOCAL_PREFIXES = ("mini:", ".", "/", "~")


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
    if (path / "checkpoints").is_dir() and not (path / "adapter_config.json").is_file() and not _is_model(path):
        found = sorted((path / "checkpoints").glob("iteration-[0-9]*[0-9]"))
        if not found:
            raise FileNotFoundError(f"{checkpoint}: a training run directory without checkpoints "
                                    f"(checkpoints/iteration-N); pass an adapter or checkpoint directory")
        path = found[-1]
    if (path / "adapter" / "adapter_config.json").is_file() and not (path / "adapter_config.json").is_file():
        path = path / "adapter"
    return path


def _is_model(path: Path) -> bool:
    """A directory holding a whole model at its top (a pretrain run's final model.safetensors + config.json beside
    its resumable ``checkpoints/step_N.pt``), which is the model it names, not a run to look into."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; anything else is refused naming the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _base_of(adapter: Path, base: str | None) -> str:
    return base or _json_object(adapter / "adapter_config.json").get("base_model_name_or_path") or SD35M_ID


def adapter_base(checkpoint: str, base: str | None = None) -> str:
    """The base model of a LoRA adapter checkpoint string (a resolved one carries it: ``Checkpoint.base``)."""
    return _base_of(model_dir(checkpoint), base)


@dataclass(frozen=True)
class Checkpoint:
    """A CHECKPOINT argument resolved once (:func:`resolve_checkpoint`); pass this value down, not the string.

    Attributes:
        name: the argument as given (``mini:base``, a directory, a hub id).
        label: what results.json and image sets record it as: ``name``, or for a training run or checkpoint
            directory the adapter directory it resolves to (a run that trains on is then not taken for the one
            evaluated before).
        kind: ``mini`` (a mini-world model), ``sd3`` (a diffusers directory or hub id) or ``lora`` (a peft adapter).
        path: the directory of the model or adapter; for a hub id the id as a path, which does not exist.
        base: an adapter's base model (``--base``, else its adapter_config.json, else SD3.5-M), itself resolved.
        named_local: ``name`` can only be a local checkpoint (:data:`LOCAL_PREFIXES`), never a hub id.
    """

    name: str
    label: str
    kind: str
    path: Path
    base: Checkpoint | None = None
    named_local: bool = False

    @property
    def adapter(self) -> Path | None:
        """The peft adapter directory of a ``lora`` checkpoint, else None."""
        return self.path if self.kind == "lora" else None

    @property
    def is_mini(self) -> bool:
        """Whether it belongs to the mini world (directly, or as an adapter on a mini base)."""
        return self.kind == "mini" or (self.base is not None and self.base.is_mini)

    @property
    def hub_id(self) -> str | None:
        """The hub id it names when it is no local directory (and is not named as one), else None."""
        return None if self.named_local or self.path.exists() else self.name

    def check_exists(self) -> None:
        """Refuse a checkpoint named as local (``mini:NAME``, a path) that is not there."""
        if self.named_local and not self.path.exists():
            raise FileNotFoundError(f"{self.label}: no such checkpoint ({self.path})")

    @cached_property
    def identity(self) -> dict[str, Any]:
        """What it evaluates, computed on first use (it hashes files): a hub model by its id and the revision in the
        local Hugging Face cache (read it after loading the model, which caches that revision); a local model or
        adapter by the fingerprints of its model files (:func:`file_fingerprint`), an adapter together with its
        base's identity. Image and score caches are keyed by it (flowopd.bench.evaluate), so two checkpoints that
        differ in any weight never share images, whatever they are called. Callers copy it before changing it."""
        self.check_exists()
        if self.hub_id is not None:
            return {"kind": "hub", "id": self.hub_id, "revision": _hub_revision(self.hub_id) or "unresolved"}
        path = self.path
        if path.is_file():
            raise ValueError(f"{self.label}: a file; a checkpoint is a directory (model, adapter or training run)")
        files = {
            str(f.relative_to(path)): file_fingerprint(f)
            for f in sorted(path.rglob("*"))
            if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES
            and not any(p.startswith(".") for p in f.relative_to(path).parts)
            and not (self.kind == "mini" and f.relative_to(path).parts[0] == "checkpoints")
        }
        if not files:
            raise FileNotFoundError(f"{self.label}: {path} holds no model files ({', '.join(MODEL_FILE_SUFFIXES)})")
        identity: dict[str, Any] = {"kind": "local", "path": str(path.resolve()), "files": files}
        if self.base is not None:
            identity["base"] = self.base.identity
        return identity


def resolve_checkpoint(name: str, base: str | None = None) -> Checkpoint:
    """Resolve a CHECKPOINT argument (the forms of this module's docstring) and an adapter's ``--base``, once.

    Refused, naming the argument: an empty name, a training run directory without checkpoints, ``base`` for a
    checkpoint that is no adapter, an adapter_config.json (or a mini config.json) that is not a JSON object. A
    local name that is not there resolves (a loader then says what it looked for); :meth:`Checkpoint.check_exists`
    and :attr:`Checkpoint.identity` refuse it.
    """
    if not name:
        raise ValueError("CHECKPOINT '': empty; pass mini:NAME, a model, adapter or run directory, or a hub id")
    path = model_dir(name)
    label = name if path == checkpoint_dir(name) else str(path)
    named_local = label.startswith(LOCAL_PREFIXES)
    if (path / "adapter_config.json").is_file():
        kind = "lora"
    elif label.startswith("mini:") or (
        (path / "config.json").is_file()
        and str(_json_object(path / "config.json").get("format", "")).startswith("flowopd-mini")
    ):
        kind = "mini"
    else:
        kind = "sd3"  # a diffusers directory or a hub id
    if base is not None and kind != "lora" and not (named_local and not path.exists()):
        raise ValueError(f"--base {base}: only a LoRA adapter checkpoint takes a base model, not {label}")
    resolved_base = resolve_checkpoint(_base_of(path, base)) if kind == "lora" else None
    return Checkpoint(name=name, label=label, kind=kind, path=path, base=resolved_base, named_local=named_local)


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
    checkpoint: Checkpoint | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Policy:
    """The Policy of a resolved checkpoint; a string (the trainers' ``model``) is resolved here, once."""
    if isinstance(checkpoint, str):
        checkpoint = resolve_checkpoint(checkpoint)
    if checkpoint.kind == "mini":
        from flowopd.models.mini import load_mini

        return load_mini(checkpoint.label, device=device)  # as named: a missing one is refused naming it
    if checkpoint.base is None:  # sd3: a diffusers directory or a hub id (every adapter has a base)
        return SD3Policy.from_pretrained(checkpoint.label, device=device, dtype=dtype)
    policy = load_policy(checkpoint.base, device=device, dtype=dtype)
    target = policy.transformer if isinstance(policy, SD3Policy) else policy.net
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(target, str(checkpoint.path)).merge_and_unload()
    except (OSError, ValueError) as e:
        raise offline_hint(checkpoint.label, e) from None
    if isinstance(policy, SD3Policy):
        policy.pipe.transformer = policy.transformer = merged.eval()
    else:
        policy.net = merged.eval()
    return policy
