"""Pinned Python environments for the scorers whose official stacks conflict with ours.

Each entry of ``SCORER_ENVS`` is the recipe of one isolated environment that serves one scorer with
``flowopd.scorers.server`` (ARCHITECTURE.md, "Isolation of scorer environments"); ``serve_session`` is the body
of the parametrised nox session ``nox -s "serve(scorer='deqa')"``. This module imports only the standard
library (and no ``from __future__ import annotations``, whose dataclasses need the module in sys.modules), so a
noxfile can load it by path without torch in nox's own environment::

    spec = importlib.util.spec_from_file_location("flowopd_envs", "flowopd/scorers/envs.py")
    envs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(envs)

The pins follow each scorer's official repository (named in every entry) and are checked by resolution, not
on a GPU; where we deviate from the upstream pin the entry says why.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# One interpreter for every served environment: the oldest flowopd supports, and new enough for the pins below.
SERVE_PYTHON = "3.10"

# What flowopd itself needs to import and serve a scorer (flowopd is installed with --no-deps so that its own
# pins - transformers 5, torch 2.4+ - cannot override the environment's).
FLOWOPD_RUNTIME: tuple[str, ...] = (
    "numpy<2",  # every pinned torch below (2.0, 2.1) is built against numpy 1.x
    "pillow>=9",
    "tqdm>=4.66",
    "platformdirs>=3",
    "safetensors>=0.4",
    "rapidfuzz>=3.0",
    "tomli>=2.0; python_version < '3.11'",
)


@dataclass(frozen=True)
class ScorerEnv:
    """The recipe of one isolated scorer environment.

    Attributes:
        scorer: the registered scorer the environment serves.
        requirements: pinned pip requirements, installed first in one resolution.
        build_requirements: packages compiled against the torch installed above (``--no-build-isolation``).
        build_env: environment variables for that build (e.g. ``MMCV_WITH_OPS=1``).
        options: default scorer options passed as ``--option key=value`` (the command line can add more).
        needs_remote_code: the checkpoint ships its own modelling code; the session refuses to start unless the
            user passes ``--trust-remote-code`` after ``--`` (never implied on the user's behalf).
        port: the loopback port the server listens on by default (the official engines' clients look there).
        source: where the pins come from.
    """

    scorer: str
    requirements: tuple[str, ...]
    build_requirements: tuple[str, ...] = ()
    build_env: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_remote_code: bool = False
    port: int | None = None
    source: str = ""


SCORER_ENVS: dict[str, ScorerEnv] = {
    # DeQA-Score-Mix3 = mPLUG-Owl2 loaded with trust_remote_code; its code runs only on transformers 4.36.
    "deqa": ScorerEnv(
        scorer="deqa",
        requirements=(
            # upstream pins torch 2.0.1 (CUDA 11.7 wheels, no sm_90 kernels); 2.1.2 has CUDA 12.1 wheels for
            # H100/H200 and is within transformers 4.36's supported range.
            "torch==2.1.2",
            "transformers==4.36.1",
            "tokenizers==0.15.0",
            "sentencepiece==0.1.99",  # LlamaTokenizer of the remote code
            "accelerate==0.21.0",  # device_map="auto"
            "huggingface_hub==0.20.3",  # of transformers 4.36's time; later hubs drop APIs old releases import
            "icecream",  # imported by the remote mPLUG-Owl2 modelling code
            "protobuf<5",
        ),
        needs_remote_code=True,
        source="zhiyuanyou/DeQA-Score pyproject.toml (v1.2.0) and README 'Only with transformers==4.36.1'",
    ),
    # GenEval's official detector: Mask2Former Swin-S through mmdet 2.x + mmcv-full 1.7 CUDA ops.
    "geneval-mmdet": ScorerEnv(
        scorer="geneval",
        requirements=(
            # GenEval's environment.yml pins torch 1.12.1 + CUDA 11.3 (no H100 support); 2.0.1 is the newest
            # torch that mmcv-full 1.7 supports, and it runs on sm_90.
            "torch==2.0.1",
            "torchvision==0.15.2",
            # GenEvalScorer's colour classifier is transformers' CLIPModel (openai ViT-L/14); environment.yml's
            # transformers and hub versions, which run on torch 2.0.
            "transformers==4.36.1",
            "huggingface_hub==0.19.4",
            "setuptools<70",  # mmcv-full's setup.py builds with pkg_resources
            "wheel",
            "ninja",
        ),
        # PyPI has only mmcv-full's source: it compiles its CUDA ops against the torch above (nvcc of the same
        # CUDA major needed). Set PIP_FIND_LINKS to OpenMMLab's prebuilt wheel index to skip the build.
        build_requirements=("mmcv-full==1.7.1", "mmdet==2.27.0"),
        build_env={"MMCV_WITH_OPS": "1", "FORCE_CUDA": "1"},
        options={"detector": "mmdet"},
        source="djghosh13/geneval README ('mim install mmdet==2.27.0') and environment.yml (mmcv-full==1.7.1, "
        "transformers==4.36.1, huggingface_hub==0.19.4)",
    ),
    # The official packages behind engine="official" (flowopd.scorers.official): each serves on its own port.
    "imagereward-official": ScorerEnv(
        scorer="imagereward",
        requirements=(
            "torch==2.14.1",  # the pair measured with these packages (docs/scorers/parity.md)
            "torchvision==0.29.1",
            "image-reward==1.5",
            "transformers<4.47",  # BLIP's med.py imports names that transformers 4.47+ moved
            "timm==0.6.13",  # image-reward's pin
            "openai-clip==1.0.1",  # imported by the package, not declared
            "setuptools<81",  # openai-clip imports pkg_resources
            "fairscale==0.4.13",
        ),
        options={"engine": "official"},
        port=8771,
        source="THUDM/ImageReward README (pip install image-reward); pins measured in docs/scorers/parity.md",
    ),
    "hps-official": ScorerEnv(
        scorer="hps",
        requirements=("torch==2.14.1", "torchvision==0.29.1", "hpsv2==1.2.0", "open_clip_torch==2.32.0", "timm==0.6.13",
                      "ftfy"),
        options={"engine": "official"},
        port=8772,
        source="tgxs002/HPSv2 README (pip install hpsv2); open_clip_torch for the BPE file the 1.2.0 wheel lacks",
    ),
    "aesthetic-official": ScorerEnv(
        scorer="aesthetic",
        requirements=("torch==2.14.1", "torchvision==0.29.1", "openai-clip==1.0.1", "setuptools<81", "ftfy"),
        options={"engine": "official"},
        port=8773,
        source="christophschuhmann/improved-aesthetic-predictor simple_inference.py (openai clip ViT-L/14)",
    ),
    # PaddleOCR 2.x (English, no angle classifier) - the OCR reward of Flow-GRPO.
    "paddleocr": ScorerEnv(
        scorer="ocr",
        requirements=(
            "torch==2.1.2",  # flowopd.scorers imports torch (the Scorer protocol's tensors)
            "paddleocr==2.9.1",
            "paddlepaddle-gpu==2.6.2",
            "numpy==1.26.4",  # paddle 2.6 is built against numpy 1.x
            "protobuf==3.20.2",  # paddle 2.6's generated protobuf code predates protobuf 4's runtime
            "python-Levenshtein",
        ),
        options={"engine": "paddleocr"},
        source="yifan123/flow_grpo README, 'Reward Environments: OCR'",
    ),
}


def server_command(name: str) -> list[str]:
    """The server command line an environment runs (before any extra arguments given after ``--``)."""
    env = SCORER_ENVS[name]
    cmd = ["python", "-m", "flowopd.scorers.server", env.scorer]
    if env.port is not None:
        cmd += ["--port", str(env.port)]
    for key, value in env.options.items():
        cmd += ["--option", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return cmd


def serve_session(session: Any, name: str) -> None:
    """Body of ``nox -s "serve(scorer='NAME')"``: install the pinned environment, then serve its scorer.

    Arguments after ``--`` go to the server, e.g. ``nox -s "serve(scorer='deqa')" -- --port 8766 --option
    device=cuda:1``. ``session`` is a ``nox.Session`` (typed loosely so that this module needs no nox).
    """
    if name not in SCORER_ENVS:
        raise KeyError(
            f"no pinned environment {name!r} in flowopd/scorers/envs.py; known: {', '.join(SCORER_ENVS)}"
        )
    env = SCORER_ENVS[name]
    if env.needs_remote_code and "--trust-remote-code" not in session.posargs:
        session.error(
            f"the {env.scorer!r} checkpoint runs its own Python code (trust_remote_code); if you trust it, run "
            f'nox -s "serve(scorer={name!r})" -- --trust-remote-code'
        )
    session.install(*env.requirements, *FLOWOPD_RUNTIME)
    if env.build_requirements:
        session.install("--no-build-isolation", *env.build_requirements, env=dict(env.build_env))
    session.install("--no-deps", "-e", ".")
    session.run(*server_command(name), *session.posargs)


# ---------------------------------------------------------------------------------------------------- parity

# ``nox -s parity`` (tests/parity): the official packages in two environments, ours in the session's own.
PARITY_PYTHON = "3.11"
PARITY_ENVS: dict[str, tuple[str, ...]] = {
    # one torchvision environment for every torch-based official package (5-6 GB): image-reward pins timm 0.6.13,
    # which open_clip_torch 3.x refuses, so open_clip stays at 2.32 (the last release that accepts it)
    "official-torch": (
        "torch==2.14.1",
        "torchvision==0.29.1",
        "image-reward==1.5",
        "transformers<4.47",
        "diffusers==0.31.0",
        "setuptools<81",
        "openai-clip==1.0.1",
        "hpsv2==1.2.0",
        "open_clip_torch==2.32.0",
        "mmdet==3.3.0",
        "mmengine==0.10.7",
        "mmcv-lite==2.1.0",
        "ftfy",
        "safetensors",
    ),
    # PaddleOCR 2.9.1 as Flow-GRPO installs it (CPU paddle here), plus torch for flowopd's OCR scorer
    "official-paddle": (
        "paddleocr==2.9.1",
        "paddlepaddle==2.6.2",
        "numpy==1.26.4",
        "python-Levenshtein",
        "torch==2.13.0",
        "rapidfuzz",
        "platformdirs",
        "tqdm",
        "safetensors",
    ),
}
# the order the sides run in: official sides write weights and inputs that ours read; compare reads everything
PARITY_SIDES: tuple[tuple[str, str], ...] = (
    ("official-torch", "official-torch"),
    ("official-paddle", "official-paddle"),
    ("ours", ""),
    ("ours-paddle", "official-paddle"),
    ("compare", ""),
)


def parse_parity_args(posargs: list[str]) -> dict[str, Any]:
    """``nox -s parity -- [--only NAME,...] [--work DIR] [--full]``; ValueError naming a bad argument."""
    out: dict[str, Any] = {"only": None, "work": None, "full": False}
    args = list(posargs)
    while args:
        arg = args.pop(0)
        if arg == "--full":
            out["full"] = True
        elif arg in ("--only", "--work"):
            if not args:
                raise ValueError(f"nox -s parity: {arg} needs a value")
            out[arg[2:]] = args.pop(0)
        else:
            raise ValueError(f"nox -s parity: unknown argument {arg!r} (known: --only NAME,..., --work DIR, --full)")
    return out


def parity_session(session: Any, root: Any) -> None:
    """Body of ``nox -s parity``: build (or reuse) the official environments, run every side, print the table.

    The session's own environment is ours (flowopd with its CLIP extras); the official ones live under
    ``.nox/parity-envs/`` and are reinstalled only when their requirements change.
    """
    import os
    import tempfile
    from pathlib import Path

    try:
        args = parse_parity_args(list(session.posargs))
    except ValueError as e:
        session.error(str(e))
    root = Path(root)
    pythons = {}
    for name, requirements in PARITY_ENVS.items():
        env = root / ".nox" / "parity-envs" / name
        marker = env / "flowopd-requirements.txt"
        wanted = "\n".join(requirements) + "\n"
        if not (marker.is_file() and marker.read_text() == wanted):
            session.run(f"python{PARITY_PYTHON}", "-m", "venv", str(env), external=True)
            session.run(str(env / "bin" / "pip"), "install", *requirements, external=True)
            session.run(str(env / "bin" / "pip"), "install", "--no-deps", "-e", str(root), external=True)
            marker.write_text(wanted)
        pythons[name] = str(env / "bin" / "python")
    work = args["work"] or tempfile.mkdtemp(prefix="flowopd-parity-")
    only = ["--only", args["only"]] if args["only"] else []
    env = {"PARITY_FULL": "1" if args["full"] else "0", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v}
    script = str(root / "tests" / "parity" / "run.py")
    for side, where in PARITY_SIDES:
        python = pythons[where] if where else "python"
        session.run(python, script, side, work, *only, env=env, external=bool(where))
