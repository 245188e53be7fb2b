"""flowopd: evaluation-first alignment of flow-matching text-to-image models (Flow-GRPO, Flow-OPD)."""

__version__ = "0.1.0"
