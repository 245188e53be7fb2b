"""The mini world's policy: a small pixel-space flow-matching UNet with its own trainable text encoder.

Pixel space, rectified flow (METHOD.md s.3): ``x0`` are images scaled to [-1, 1], ``x_t = (1 - t) x0 + t eps``,
``t = 1`` is noise and the network predicts ``v = eps - x0``. ``decode`` maps ``x0`` back to [0, 1].

Architecture (about 1.5M parameters at 32x32): a conv UNet (32 -> 16 -> 8 pixels) whose residual blocks are
FiLM-conditioned on the time and the pooled prompt, with joint text-pixel attention at 8x8 (image tokens and
text tokens attend to each other, as in SD3's MMDiT). The attention projections carry SD3's names (``to_q``,
``to_k``, ``to_v``, ``to_out.0``, ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``) so the same
peft ``LoraConfig(target_modules=...)`` serves both scales; the text encoder's projections have other names
(``q_proj``...) so that default LoRA targets leave it alone.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flowopd.models.policy import Conditioning, seeded_noise

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini"
# SD3's attention projection names; the default LoRA targets for the mini world too (METHOD.md s.3).
LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<q>")
PAD_ID, UNK_ID, BOS_ID, QUOTE_ID = range(len(SPECIAL_TOKENS))
_QUOTED = re.compile(r'"([^"]*)"')
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class MiniTokenizer:
    """Word-level tokenizer over the grammar's vocabulary; text inside double quotes is split into characters.

    A prompt becomes ``<bos> word ... <q> c:H c:I <q> ...`` padded with ``<pad>`` to ``max_length`` (longer
    prompts are truncated). Words are lower-cased; quoted characters keep their case. Anything not in the
    vocabulary maps to ``<unk>``.
    """

    def __init__(self, words: Sequence[str], chars: Sequence[str], max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (<bos> plus one token), got {max_length}")
        self.words = sorted({w.lower() for w in words})
        self.chars = sorted(set(chars))
        self.max_length = int(max_length)
        self.tokens = [*SPECIAL_TOKENS, *self.words, *(f"c:{c}" for c in self.chars)]
        self.index = {tok: i for i, tok in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_grammar(cls, max_length: int) -> MiniTokenizer:
        """The tokenizer of the mini world: the grammar's vocabulary plus the characters of its texts."""
        from flowopd.world import grammar

        # grammar.vocabulary() mixes words, the quote mark and the text alphabet's characters
        words = [w for w in grammar.vocabulary() if w != '"' and w not in grammar.ALPHABET]
        return cls(words, list(grammar.ALPHABET), max_length)

    def tokenize(self, prompt: str) -> list[str]:
        """Token strings of one prompt (no <bos>, no padding, no truncation)."""
        out: list[str] = []
        pos = 0
        for match in _QUOTED.finditer(prompt):
            out += _WORD.findall(prompt[pos : match.start()].lower())
            out += ["<q>", *(f"c:{c}" for c in match.group(1)), "<q>"]
            pos = match.end()
        out += _WORD.findall(prompt[pos:].lower())
        return out

    def encode(self, prompt: str) -> list[int]:
        """Token ids with <bos>, truncated to ``max_length`` (unpadded)."""
        ids = [BOS_ID, *(self.index.get(tok, UNK_ID) for tok in self.tokenize(prompt))]
        return ids[: self.max_length]

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids ``(N, max_length)`` (long) and the attention mask (bool, True = real token)."""
        tokens = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens, tokens != PAD_ID

    def to_dict(self) -> dict[str, Any]:
        return {"words": self.words, "chars": self.chars, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniTokenizer:
        return cls(d["words"], d["chars"], d["max_length"])


@dataclass
class MiniModelConfig:
    """Shape of the mini UNet. ``vocab_size`` and ``max_length`` must match the tokenizer's."""

    vocab_size: int = 0  # 0: taken from the tokenizer by build_mini
    max_length: int = 20  # tokens incl. <bos>; the grammar's longest prompt has 15
    image_size: int = 32
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # per resolution: 32, 16, 8 pixels
    text_dim: int = 96
    text_layers: int = 2
    heads: int = 4
    cond_dim: int = 128  # width of the time + pooled-text vector that drives FiLM
    groups: int = 8  # GroupNorm groups


class ResBlock(nn.Module):
    """Two 3x3 convolutions; the second normalisation is modulated (FiLM) by the time + text vector."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace``: the elementwise ops overwrite their (temporary) inputs - the same values, no autograd."""
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        if not inplace:
            h = self.conv1(F.silu(self.norm1(x)))
            h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
            return self.skip(x) + h
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h).mul_(1 + scale).add_(shift), inplace=True))
        return h.add_(self.skip(x))  # IEEE addition commutes: skip(x) + h, bit for bit


class JointAttention(nn.Module):
    """Attention over the concatenation of image tokens and text tokens (SD3's joint attention)."""

    def __init__(self, dim: int, text_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # a Sequential so the name is SD3's "to_out.0"
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(text_dim, dim) for _ in range(3))
        self.to_add_out = nn.Linear(dim, text_dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, l_img, _ = img.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = heads(torch.cat([self.to_q(img), self.add_q_proj(txt)], dim=1))
        k = heads(torch.cat([self.to_k(img), self.add_k_proj(txt)], dim=1))
        v = heads(torch.cat([self.to_v(img), self.add_v_proj(txt)], dim=1))
        keep = torch.cat([txt_mask.new_ones(n, l_img), txt_mask], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)
        return self.to_out(out[:, :l_img]), self.to_add_out(out[:, l_img:])


class JointBlock(nn.Module):
    """Pre-norm residual joint attention between an 8x8 feature map and the text tokens."""

    def __init__(self, dim: int, text_dim: int, heads: int, tokens: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.norm_context = nn.LayerNorm(text_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))  # where each pixel is, for "left of"
        self.attn = JointAttention(dim, text_dim, heads)

    def forward(
        self, x: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        img = self.norm(x).flatten(2).transpose(1, 2) + self.pos_embed
        d_img, d_txt = self.attn(img, self.norm_context(txt), txt_mask)
        return x + d_img.transpose(1, 2).reshape(n, c, h, w), txt + d_txt


class TextLayer(nn.Module):
    """A pre-norm transformer layer of the text encoder."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = (
            p(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.out_proj(att.transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    """Token + position embeddings and a few transformer layers; returns per-token states and a pooled vector."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        self.layers = nn.ModuleList(TextLayer(dim, heads) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm_out(x)
        m = mask[..., None].to(x.dtype)
        return x, (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``1000 t`` (t in [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MiniUNet(nn.Module):
    """The velocity network ``v(x_t, t, tokens)`` on (N, 3, 32, 32) pixels in [-1, 1]."""

    def __init__(self, config: MiniModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        cd, g, td = config.cond_dim, config.groups, config.text_dim
        low = config.image_size // 4
        self.text_encoder = TextEncoder(config.vocab_size, config.max_length, td, config.text_layers, config.heads)
        self.time_mlp = nn.Sequential(nn.Linear(64, cd), nn.SiLU(), nn.Linear(cd, cd))
        self.text_pool = nn.Linear(td, cd)
        self.conv_in = nn.Conv2d(3, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, cd, g)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, cd, g)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.down3 = ResBlock(c2, c3, cd, g)
        self.attn_down = JointBlock(c3, td, config.heads, low * low, g)
        self.mid = ResBlock(c3, c3, cd, g)
        self.attn_mid = JointBlock(c3, td, config.heads, low * low, g)
        self.up3 = ResBlock(2 * c3, c3, cd, g)
        self.attn_up = JointBlock(c3, td, config.heads, low * low, g)
        self.unpool2 = nn.Conv2d(c3, c2, 3, padding=1)
        self.up2 = ResBlock(2 * c2, c2, cd, g)
        self.unpool1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = ResBlock(2 * c1, c1, cd, g)
        self.norm_out = nn.GroupNorm(g, c1)
        self.conv_out = nn.Conv2d(c1, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start from v = 0 so early training is stable
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t, self.encode_text(tokens, mask), mask)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token text states and the pooled text's FiLM term: what the velocity needs of the prompt."""
        txt, pooled = self.text_encoder(tokens, mask)
        return txt, self.text_pool(pooled)

    def denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        inference: bool = False,
    ) -> torch.Tensor:
        """The velocity from :meth:`encode_text`'s ``text``. ``inference`` (no autograd) computes the same values
        with in-place elementwise ops and nearest upsampling by a strided copy (interpolate's backward would
        sum the gradient in its own order, so training keeps interpolate)."""
        txt, text_cond = text
        cond = F.silu(self.time_mlp(timestep_embedding(t, 64)) + text_cond)
        upsample = _repeat2x if inference else _interpolate2x
        h1 = self.down1(self.conv_in(x), cond, inference)
        h2 = self.down2(self.pool1(h1), cond, inference)
        h3 = self.down3(self.pool2(h2), cond, inference)
        h3, txt = self.attn_down(h3, txt, mask)
        h, txt = self.attn_mid(self.mid(h3, cond, inference), txt, mask)
        h, _ = self.attn_up(self.up3(torch.cat([h, h3], 1), cond, inference), txt, mask)
        h = self.unpool2(upsample(h))
        h = self.up2(torch.cat([h, h2], 1), cond, inference)
        h = self.unpool1(upsample(h))
        h = self.up1(torch.cat([h, h1], 1), cond, inference)
        return self.conv_out(F.silu(self.norm_out(h), inplace=inference))


def _interpolate2x(h: torch.Tensor) -> torch.Tensor:
    return F.interpolate(h, scale_factor=2, mode="nearest")


def _repeat2x(h: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling as one strided copy: interpolate's values, faster on a CPU."""
    n, c, height, width = h.shape
    return h[:, :, :, None, :, None].expand(n, c, height, 2, width, 2).reshape(n, c, 2 * height, 2 * width)


class MiniPolicy(nn.Module):
    """The mini world's flow-matching model behind the Policy interface (flowopd.models.policy).

    ``net`` is the trainable velocity network (the target of LoRA adapters); the tokenizer turns prompts into
    the ``tokens``/``mask`` conditioning, with ``negative_tokens``/``negative_mask`` for the empty prompt of CFG.
    """

    def __init__(self, net: MiniUNet, tokenizer: MiniTokenizer, shift: float = 1.0) -> None:
        super().__init__()
        if tokenizer.vocab_size != net.config.vocab_size or tokenizer.max_length != net.config.max_length:
            raise ValueError(
                f"tokenizer (vocab {tokenizer.vocab_size}, max_length {tokenizer.max_length}) does not match the "
                f"network (vocab {net.config.vocab_size}, max_length {net.config.max_length})"
            )
        self.net = net
        self.tokenizer = tokenizer
        self.shift = float(shift)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        tokens, mask = self.tokenizer(list(prompts))
        neg_tokens, neg_mask = self.tokenizer([""] * len(prompts))
        cond = {"tokens": tokens, "mask": mask, "negative_tokens": neg_tokens, "negative_mask": neg_mask}
        return {k: v.to(self.device) for k, v in cond.items()}

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unguided velocity for the given token ids."""
        return self.net(x, t, tokens, mask)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """CFG velocity ``v_uncond + g (v_cond - v_uncond)`` from one batched forward of 2N (g = 1: conditional)."""
        t = t.to(x.device).expand(x.shape[0])
        if guidance_scale == 1.0:
            return self.net(x, t, cond["tokens"], cond["mask"])
        tokens = torch.cat([cond["tokens"], cond["negative_tokens"]])
        mask = torch.cat([cond["mask"], cond["negative_mask"]])
        v_cond, v_uncond = self.net(torch.cat([x, x]), torch.cat([t, t]), tokens, mask).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def sampling_velocity(
        self, cond: Conditioning, guidance_scale: float
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x, t) -> velocity(x, t, cond, guidance_scale)`` for a sampling loop over fixed weights without
        autograd: the same bits, faster.

        The prompts are encoded once instead of at every step (the same rows that :meth:`velocity`'s one forward
        encodes), the network runs with :meth:`MiniUNet.denoise`'s inference ops, and on a CPU glibc keeps freed
        memory for the next step (:func:`keep_freed_memory`). Every op sees the shapes it sees in
        :meth:`velocity`. With autograd on, or a wrapped network (DDP), this is :meth:`velocity` itself.
        """
        net = self.net
        if torch.is_grad_enabled() or not hasattr(net, "denoise"):
            return lambda x, t: self.velocity(x, t, cond, guidance_scale)
        tokens, mask = cond["tokens"], cond["mask"]
        if guidance_scale != 1.0:
            tokens, mask = torch.cat([tokens, cond["negative_tokens"]]), torch.cat([mask, cond["negative_mask"]])
        text = net.encode_text(tokens, mask)
        if self.device.type == "cpu":
            keep_freed_memory()

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.to(x.device).expand(x.shape[0])
            if guidance_scale == 1.0:
                return net.denoise(x, t, text, mask, inference=True)
            v_cond, v_uncond = net.denoise(torch.cat([x, x]), torch.cat([t, t]), text, mask, inference=True).chunk(2)
            return v_uncond + guidance_scale * (v_cond - v_uncond)

        return velocity

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        return seeded_noise(seeds, (3, height, width)).to(self.device)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """Linear 1 -> 0, then SD3's shift ``s t / (1 + (s - 1) t)`` (s = 1: unchanged)."""
        t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1) / 2).clamp(0, 1)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS (once per process; the heap
    then stays at its peak size). A sampling step frees and allocates the same large activations again; by
    default glibc unmaps or trims them and the next step faults them in again page by page, which costs system
    time. Returns False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def build_mini(tokenizer: MiniTokenizer, shift: float = 1.0, **model_options: Any) -> MiniPolicy:
    """A freshly initialised policy whose network matches ``tokenizer`` (options: MiniModelConfig fields)."""
    config = MiniModelConfig(**{**model_options, "max_length": tokenizer.max_length})
    if config.vocab_size not in (0, tokenizer.vocab_size):
        raise ValueError(f"vocab_size={config.vocab_size} does not match the tokenizer's {tokenizer.vocab_size}")
    config.vocab_size = tokenizer.vocab_size
    return MiniPolicy(MiniUNet(config), tokenizer, shift)


def save_mini(
    model: MiniPolicy, path: str | Path, dtype: torch.dtype = torch.float32, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` (weights stored in ``dtype``) and ``config.json`` into directory ``path``.

    ``extra`` is stored under ``"extra"`` in config.json (e.g. the recommended sampling settings).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    config = {
        "format": "flowopd-mini/1",
        "model": asdict(model.net.config),
        "tokenizer": model.tokenizer.to_dict(),
        "shift": model.shift,
        "storage_dtype": str(dtype).removeprefix("torch."),
        "extra": extra or {},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def available_minis() -> list[str]:
    """Names ``mini:<name>`` of the checkpoints bundled in flowopd/assets/mini/."""
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(f"mini:{p.name}" for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_mini(name_or_path: str | Path) -> Path:
    """``"mini:<name>"`` -> flowopd/assets/mini/<name>/; anything else is a directory path."""
    s = str(name_or_path)
    path = ASSETS_DIR / s.removeprefix("mini:") if s.startswith("mini:") else Path(s)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no mini checkpoint at {s!r} (looked for config.json and model.safetensors in {path}); "
            f"available names: {', '.join(available_minis()) or 'none'}; or pass a directory written by save_mini"
        )
    return path


def load_mini(name_or_path: str | Path, device: str | torch.device = "cpu") -> MiniPolicy:
    """Load a checkpoint written by :func:`save_mini` (weights come back in float32)."""
    path = resolve_mini(name_or_path)
    config = json.loads((path / "config.json").read_text())
    tokenizer = MiniTokenizer.from_dict(config["tokenizer"])
    net = MiniUNet(MiniModelConfig(**config["model"]))
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / 'model.safetensors'}: missing keys {missing}, unexpected keys {unexpected}")
    return MiniPolicy(net, tokenizer, config.get("shift", 1.0)).to(device).eval()
