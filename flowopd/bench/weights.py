"""Whether an official weight is already on this machine (nothing is downloaded): used by ``list`` to say
whether a benchmark can run here, and by the paper's tables to say whether a row's checkpoint is available."""

from __future__ import annotations

from flowopd.data import cache_root


def weights_cached(entry: str) -> bool:
    """Whether an official weight is available offline: ``repo`` or ``repo:file`` in the Hugging Face
    cache, or ``cache:file`` in flowopd's own weight cache (files pinned by URL + sha256)."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, filename = entry.partition(":")
    if repo == "cache":
        return (cache_root() / "weights" / filename).is_file()
    if "/" not in repo:
        return False
    for name in [filename] if filename else ["config.json", "model_index.json", "preprocessor_config.json"]:
        if isinstance(try_to_load_from_cache(repo, name), str):
            return True
    return False
