"""Merging LoRA adapters for the cold start (METHOD.md s.2 and s.3 "Merging").

Adapters are state dicts in peft's naming: ``<module>.lora_A.weight`` of shape (r, in) and
``<module>.lora_B.weight`` of shape (out, r) (as saved in ``adapter_model.safetensors``; the in-memory
form ``<module>.lora_A.<adapter>.weight`` is accepted too). A module's weight update is
``Delta W = scaling * B @ A`` with ``scaling = lora_alpha / r`` (64 / 32 = 2 for the paper's adapters).

Two families:
- :func:`factor_mean` / :func:`factor_sum`: the public code's merge (Flow-OPD ``scripts/merge.py``, modes
  ``average``, ``weighted``, ``sum``): every tensor combined element-wise, ``A`` and ``B`` separately.
  ``mean(B) @ mean(A)`` is not ``mean(B @ A)``; kept for parity.
- delta merges: :func:`delta_weights` -> :func:`merge_deltas` (linear/task arithmetic, TIES, DARE, via
  ``peft.utils.merge_utils``) -> :func:`deltas_to_lora` (truncated SVD back to LoRA factors).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from peft.utils import merge_utils

Adapter = Mapping[str, torch.Tensor]
MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def factor_mean(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Element-wise (weighted) mean of every tensor of the adapters, ``A`` and ``B`` separately.

    Parity with the public ``scripts/merge.py`` (``average`` mode; ``weighted`` mode normalises the
    weights to sum 1, as here). Tensors are averaged in float32 and returned in their own dtype.
    """
    _check_same_keys(adapters)
    w = _weights(weights, len(adapters), normalise=True)
    return {
        key: sum(wi * a[key].float() for wi, a in zip(w.tolist(), adapters)).to(adapters[0][key].dtype)
        for key in adapters[0]
    }


def factor_sum(adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """Element-wise sum of every tensor of the adapters, ``A`` and ``B`` separately (the public ``sum`` mode).

    ``(sum B)(sum A)`` holds every cross term ``B_i A_j``: n identical adapters give ``n^2 B A``. Summed in
    float32 and returned in each tensor's own dtype.
    """
    _check_same_keys(adapters)
    return {key: sum(a[key].float() for a in adapters).to(adapters[0][key].dtype) for key in adapters[0]}


def delta_weights(adapter: Adapter, scaling: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """``{module: scaling * B @ A}`` in float32 for every LoRA module of ``adapter``.

    Args:
        scaling: ``lora_alpha / r``, one value or one per module name (peft's ``rank_pattern``).
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = tensor
    if not factors:
        raise ValueError("delta_weights: no '<module>.lora_A.weight' / '<module>.lora_B.weight' keys in the adapter")
    deltas = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise ValueError(f"delta_weights: module {module!r} has no lora_{missing} weight")
        s = scaling[module] if isinstance(scaling, Mapping) else scaling
        deltas[module] = s * (ab["B"].float() @ ab["A"].float())
    return deltas


def merge_deltas(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod = "linear",
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    seed: int = 0,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> dict[str, torch.Tensor]:
    """Merge dense weight updates module by module with peft's ``merge_utils``.

    Args:
        deltas: one ``{module: Delta W}`` per adapter (from :func:`delta_weights`), same modules/shapes.
        method: ``"linear"`` (weighted sum, task arithmetic), ``"ties"`` (magnitude prune to ``density``,
            elect signs, disjoint mean), ``"dare_linear"`` / ``"dare_ties"`` (random drop to ``density``
            with rescaling, then sum / TIES), ``"magnitude_prune"`` (prune, then sum).
        weights: per-adapter weights. Default: ``1/n`` for the summing methods (so the default linear
            merge is the mean of the updates), 1 for the TIES methods (whose disjoint merge already averages
            the entries that agree in sign).
        density: fraction of entries kept by the pruning methods (ignored by ``"linear"``).
        seed: seeds DARE's random masks (drawn module by module in sorted order, so a seed fixes the result).
    """
    _check_same_keys(deltas)
    n = len(deltas)
    if weights is None:
        w = torch.full((n,), 1.0 if method in ("ties", "dare_ties") else 1.0 / n)
    else:
        w = _weights(weights, n, normalise=False)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"merge_deltas: density must lie in [0, 1], got {density}")
    # Gradients never matter here; fork the RNG so a DARE seed neither reads nor moves the global stream.
    devices = sorted({d.device.index or 0 for delta in deltas for d in delta.values() if d.device.type == "cuda"})
    merged = {}
    with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # density = 1 means "no pruning" here, not a mistake worth peft's warning.
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        # Seed only the generators DARE draws from (those of the tensors' devices), inside the fork.
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        for module in sorted(deltas[0]):
            tensors = [d[module].float() for d in deltas]
            if any(t.shape != tensors[0].shape for t in tensors):
                raise ValueError(f"merge_deltas: module {module!r} has shapes {[tuple(t.shape) for t in tensors]}")
            ww = w.to(tensors[0].device)
            if method == "linear":
                merged[module] = merge_utils.task_arithmetic(tensors, ww)
            elif method == "magnitude_prune":
                merged[module] = merge_utils.magnitude_prune(tensors, ww, density)
            elif method == "ties":
                merged[module] = merge_utils.ties(tensors, ww, density, majority_sign_method)
            elif method == "dare_linear":
                merged[module] = merge_utils.dare_linear(tensors, ww, density)
            elif method == "dare_ties":
                merged[module] = merge_utils.dare_ties(tensors, ww, density, majority_sign_method)
            else:
                raise ValueError(
                    f"merge_deltas: unknown method {method!r}; "
                    "use linear, ties, dare_linear, dare_ties or magnitude_prune"
                )
    return merged


def deltas_to_lora(
    deltas: Mapping[str, torch.Tensor], rank: int, scaling: float = 1.0
) -> dict[str, torch.Tensor]:
    """LoRA factors of rank ``rank`` whose ``scaling * B @ A`` is the best rank-``rank`` approximation.

    Truncated SVD ``Delta W / scaling ~ U_r S_r V_r^T`` with ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``
    (balanced factors). It is exact when ``rank`` is at least the rank of ``Delta W``: for a linear merge
    of adapters of ranks ``r_i``, ``rank = sum(r_i)`` is exact; TIES/DARE prune entries of ``Delta W``, so
    their merge is generally full-rank and any smaller ``rank`` truncates it. Modules with
    ``min(out, in) < rank`` are zero-padded so that every module has the same rank (one peft ``r``).
    Save the result with an adapter config of ``r = rank`` and ``lora_alpha = scaling * rank``.

    Returns:
        ``{"<module>.lora_A.weight": (rank, in), "<module>.lora_B.weight": (out, rank)}`` in float32.
    """
    if rank < 1:
        raise ValueError(f"deltas_to_lora: rank must be >= 1, got {rank}")
    out: dict[str, torch.Tensor] = {}
    for module, delta in sorted(deltas.items()):
        if delta.ndim != 2:
            raise ValueError(
                f"deltas_to_lora: module {module!r} has a {delta.ndim}-D update; only Linear (2-D) is supported"
            )
        u, s, vh = torch.linalg.svd(delta.float() / scaling, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float32, device=delta.device)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float32, device=delta.device)
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        out[f"{module}.lora_A.weight"] = a
        out[f"{module}.lora_B.weight"] = b
    return out


def _check_same_keys(dicts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if not dicts:
        raise ValueError("merge: need at least one adapter")
    ref = set(dicts[0])
    for i, d in enumerate(dicts[1:], start=1):
        if set(d) != ref:
            raise ValueError(
                f"merge: adapter {i} has different keys than adapter 0: "
                f"missing {sorted(ref - set(d))[:5]}, extra {sorted(set(d) - ref)[:5]}"
            )


def _weights(weights: Sequence[float] | None, n: int, normalise: bool) -> torch.Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n)
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if w.numel() != n:
        raise ValueError(f"merge: got {w.numel()} weights for {n} adapters")
    if normalise:
        if float(w.sum()) == 0:
            raise ValueError("merge: weights sum to 0 and cannot be normalised")
        w = w / w.sum()
    return w
