"""Policies: the SD3 family (diffusers + peft) and the mini world's small pixel-space model."""
