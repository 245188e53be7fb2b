"""The SD3 family (Stable Diffusion 3 / 3.5) as a Policy, through diffusers.

The sampler, CFG and timestep schedule follow diffusers' StableDiffusion3Pipeline exactly (a test
checks that our ODE sampling reproduces the stock pipeline), so evaluation numbers are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowopd.models.policy import Conditioning, seeded_noise

SD35M_ID = "stabilityai/stable-diffusion-3.5-medium"


class ModelNotAvailableError(OSError):
    """Weights that cannot be loaded (offline, gated, wrong path); the message says how to fix it."""


def offline_hint(model_id: str, error: BaseException) -> ModelNotAvailableError:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if Path(model_id).exists():  # a local path that holds no loadable model: a download would not help
        return ModelNotAvailableError(
            f"could not load {model_id!r} ({reason}). A local model is a diffusers SD3 directory "
            f"(model_index.json), a peft adapter directory (adapter_config.json), a training checkpoint "
            f"(RUN/checkpoints/iteration-N) or a training run directory (RUN)."
        )
    return ModelNotAvailableError(
        f"could not load {model_id!r} ({reason}). "
        f"Without network access, download it where you have access "
        f"(`huggingface-cli download {model_id} --local-dir DIR`) and pass DIR instead of the id, "
        f"or set HF_HOME to a cache that holds it."
    )


class SD3Policy:
    """Velocity, CFG, latents and decoding of a diffusers StableDiffusion3Pipeline."""

    def __init__(self, pipe: Any, max_sequence_length: int = 256) -> None:
        self.pipe = pipe
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.eval()  # modules built in code start in train mode (dropout); sampling is deterministic
        self.transformer = pipe.transformer
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = pipe.vae_scale_factor
        self.name = str(getattr(pipe.config, "_name_or_path", "") or "")

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> SD3Policy:
        from diffusers import StableDiffusion3Pipeline

        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(str(model_id_or_path), torch_dtype=dtype, **kwargs)
        except (OSError, ValueError) as e:
            raise offline_hint(str(model_id_or_path), e) from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            negative_prompt=[""] * len(prompts),
            do_classifier_free_guidance=True,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled, "neg_embeds": neg_embeds, "neg_pooled": neg_pooled}

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        timestep = (t.to(self.device, torch.float32) * 1000).expand(x.shape[0])
        x = x.to(self.dtype)
        if guidance_scale > 1.0:
            out = self.transformer(
                hidden_states=torch.cat([x, x]),
                timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([cond["neg_embeds"], cond["embeds"]]),
                pooled_projections=torch.cat([cond["neg_pooled"], cond["pooled"]]),
                return_dict=False,
            )[0]
            uncond, cond_v = out.chunk(2)
            return uncond + guidance_scale * (cond_v - uncond)
        return self.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=cond["embeds"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        shape = (
            self.transformer.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        return seeded_noise(seeds, shape).to(self.device, self.dtype)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The scheduler's sigmas (shift applied), ``num_steps + 1`` values ending at 0."""
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.to(torch.float32).clone()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
