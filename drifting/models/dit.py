"""The paper's generator: a DiT with adaLN-zero, in-context conditioning tokens, RoPE, QK-norm and SwiGLU.

Written from `official-code-notes.md` section 5 (the authors' `DitGen` / `LightningDiT`):

    noise [B, C, H, W] -> patchify -> Linear + position embedding      (B, L, D), L = (H/p)(W/p)
    prepend 16 in-context tokens Linear(c) + learnable embeddings        (B, 16 + L, D)
    depth x block: x += gate * Attn(modulate(RMSNorm(x)));  x += gate * SwiGLU(modulate(RMSNorm(x)))
    RMSNorm -> modulate -> Linear (zero init) -> drop the prefix -> unpatchify -> x [B, C, H, W]

with the conditioning vector c = class embedding + sum of 32 style embeddings + 0.02 * RMSNorm(alpha embedding),
where alpha is the classifier-free guidance scale (section 3). The output is exactly zero at initialisation.

Layout: PyTorch's NCHW at the interface (noise and output; the authors' JAX code is NHWC). Inside, patches are
flattened in the code's (row in patch, column in patch, channel) order, so the patch embedding and the output head of
a port of the JAX weights need no permutation of their patch features.

Precision (section 5.5): parameters are fp32. With `bf16`, the forward runs under bf16 autocast and the residual
stream is bf16; the conditioning vector and every adaLN projection stay in fp32, and with `attn_fp32` so does the
attention. The output is returned in the noise's dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from drifting.models.layers import (
    Attention,
    ConditionEmbedder,
    RMSNorm,
    SwiGLU,
    modulate,
    no_autocast,
    rope_cos_sin,
    rope_positions_1d,
    rope_positions_2d,
    sincos_pos_embed_2d,
    swiglu_hidden_size,
)

__all__ = ["DiTConfig", "DiT", "DiTBlock", "GENERATORS", "generator_config", "build_generator"]

ROPE_BASE = 1e4


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT generator. Defaults are DiT-B/2 on 32x32x4 latents (the paper's ablation generator)."""

    image_size: int = 32  # H = W of the noise and of the output
    in_channels: int = 4  # C of the noise and of the output (4 for SD-VAE latents, 3 for pixels)
    patch_size: int = 2  # p: 2 on latents, 16 on pixels (both give a 16x16 grid of tokens at the paper's sizes)
    hidden_size: int = 768  # D, also the width of the conditioning vector c
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0  # SwiGLU width = int(2/3 * mlp_ratio * D) rounded up to a multiple of 32
    num_classes: int = 1000  # class labels 0 .. num_classes-1; no null class (guidance is alpha, not label dropout)
    style_tokens: int = 32  # number of style embeddings summed into c (0: off)
    style_codebook: int = 64  # entries of each style token's own table
    in_context_tokens: int = 16  # conditioning tokens prepended to the sequence (0: off)
    rope: Literal["1d", "2d"] = "1d"  # "1d": the code's RoPE over the flattened sequence; "2d": axial (row, col)
    bf16: bool = True  # bf16 autocast for activations (parameters stay fp32)
    attn_fp32: bool = True  # attention in fp32 under bf16 (the code's ablation and pixel configs; latent SOTA: off)
    activation_checkpointing: bool = False  # recompute each block in the backward pass (the code's pixel configs)

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes",
                     "style_codebook"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("style_tokens", "in_context_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0 (0 turns it off), got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size: the 2-D sin-cos position embedding needs a multiple of 4, got "
                             f"{self.hidden_size}")
        if self.rope not in ("1d", "2d"):
            raise ValueError(f"rope: expected '1d' or '2d', got {self.rope!r}")
        axes = 1 if self.rope == "1d" else 2
        if self.head_dim % (2 * axes):
            raise ValueError(f"rope={self.rope!r}: head_dim {self.head_dim} must be divisible by {2 * axes}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio: expected a number > 0, got {self.mlp_ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side: image_size / patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class DiTBlock(nn.Module):
    """x + gate * Attn(modulate(RMSNorm(x))), then x + gate * SwiGLU(modulate(RMSNorm(x))): [B, L, D] -> [B, L, D].

    The six modulation vectors come from SiLU(c) -> Linear(D, 6D) (zero init, so the block starts as the identity),
    computed in fp32, in the order shift, scale, gate for attention, then for the MLP.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = RMSNorm(d)
        self.attn = Attention(d, cfg.num_heads, fp32=cfg.attn_fp32)
        self.norm2 = RMSNorm(d)
        self.mlp = SwiGLU(d, swiglu_hidden_size(d, cfg.mlp_ratio))
        self.adaLN_modulation = nn.Linear(d, 6 * d)

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        with no_autocast(x.device):
            mod = self.adaLN_modulation(F.silu(c.float())).to(x.dtype)  # (B, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # (B, D) each
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(nn.Module):
    """One-step generator f(noise, class, alpha, style) -> sample, all tensors NCHW.

    The generator interface shared with `MLPGenerator` (and used by `generate`): the attributes `num_classes`,
    `noise_shape` (per sample), `style_tokens`, `style_codebook`, and `forward(noise, labels, alpha, style)`.
    """

    def __init__(self, cfg: DiTConfig | None = None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(cfg or DiTConfig(), **overrides)
        self.cfg = cfg
        d, p, c_in = cfg.hidden_size, cfg.patch_size, cfg.in_channels

        # Conditioning vector c (D): class + styles + 0.02 * RMSNorm(alpha embedding).
        self.cond_embedder = ConditionEmbedder(d, cfg.num_classes, cfg.style_tokens, cfg.style_codebook)
        self.x_embedder = nn.Linear(p * p * c_in, d)
        # Learnable (and weight-decayed in the code), initialised with the fixed sin-cos table.
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches, d))
        if cfg.in_context_tokens:
            self.context_proj = nn.Linear(d, d)
            self.context_embed = nn.Parameter(torch.empty(cfg.in_context_tokens, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = RMSNorm(d)
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.final_linear = nn.Linear(d, p * p * c_in)
        # RoPE's cos and sin, fp32, built once (not saved: they follow from the config). Built inside a compiled
        # forward, inductor fuses their cos/sin into the kernels that rotate q and k and evaluates them per element
        # of q and k, B x heads times over: ~0.2 s of the ablation step (docs/benchmarks.md, eleventh sitting).
        cos, sin = self.rope_tables(torch.device("meta"))
        self.register_buffer("rope_cos", torch.empty(cos.shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(sin.shape), persistent=False)
        self.reset_parameters()

    # The generator interface (see the class docstring).
    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    @property
    def style_tokens(self) -> int:
        return self.cfg.style_tokens

    @property
    def style_codebook(self) -> int:
        return self.cfg.style_codebook

    def reset_parameters(self) -> None:
        """The code's initialisation (section 5.4); after it the output is exactly zero for every input.

        Also usable after `to_empty()` on a model built on the meta device.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):  # Xavier-uniform, zero bias: the default of every Linear
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.cond_embedder.reset_parameters()  # N(0, 0.02) embeddings and alpha MLP, overriding the Xavier pass
        if self.cfg.in_context_tokens:
            nn.init.normal_(self.context_embed, std=0.02)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.grid_size))
            cos, sin = self.rope_tables(self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        # adaLN-zero: every block starts as the identity, and the zero head makes the output exactly 0.
        for layer in [block.adaLN_modulation for block in self.blocks] + [self.final_adaLN, self.final_linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, L, p*p*C], rows of patches first, features in (row in patch, col in patch, channel)."""
        b, ch, _, _ = x.shape
        p, g = self.cfg.patch_size, self.cfg.grid_size
        x = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, g, g, p, p, C)
        return x.reshape(b, g * g, p * p * ch)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, L, p*p*C] -> [B, C, H, W], the inverse of `patchify`."""
        b = x.shape[0]
        p, g, ch = self.cfg.patch_size, self.cfg.grid_size, self.cfg.in_channels
        x = x.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(b, ch, g * p, g * p)

    def rope_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [L_total, A, head_dim / A] fp32 for the configured RoPE, computed on `device`."""
        positions = (rope_positions_1d if self.cfg.rope == "1d" else rope_positions_2d)(
            self.cfg.grid_size, self.cfg.in_context_tokens, device=device)
        return rope_cos_sin(positions, self.cfg.head_dim, ROPE_BASE)

    def rope(self) -> tuple[Tensor, Tensor]:
        """The RoPE tables of `forward`: the fp32 buffers, or computed afresh if the module was cast (`model.half()`)."""
        if self.rope_cos.dtype != torch.float32:
            return self.rope_tables(self.rope_cos.device)
        return self.rope_cos, self.rope_sin

    def forward(self, noise: Tensor, labels: Tensor, alpha: Tensor | float, style: Tensor | None = None) -> Tensor:
        """x = f(noise, labels, alpha, style).

        Args:
            noise: [B, C, H, W] Gaussian noise (NCHW).
            labels: [B] class indices in [0, num_classes).
            alpha: [B] guidance scales (>= 1; 1 = no guidance), or one number for the whole batch.
            style: [B, style_tokens] indices in [0, style_codebook), drawn uniformly per sample; None if
                style_tokens == 0. Values are not checked here (no device sync); `generate` checks them.
        Returns:
            x: [B, C, H, W] in the noise's dtype.
        """
        b = noise.shape[0]
        if tuple(noise.shape[1:]) != self.noise_shape:
            raise ValueError(f"noise: expected shape [B, {', '.join(map(str, self.noise_shape))}], "
                             f"got {tuple(noise.shape)}")
        if self.cfg.style_tokens and (style is None or tuple(style.shape) != (b, self.cfg.style_tokens)):
            raise ValueError(f"style: expected indices of shape [{b}, {self.cfg.style_tokens}], got "
                             f"{None if style is None else tuple(style.shape)}")
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=noise.device).expand(b)  # a number -> [B]
        c = self.cond_embedder(labels, alpha, style)  # (B, D) fp32

        compute_dtype = torch.bfloat16 if self.cfg.bf16 else noise.dtype
        device_type = noise.device.type if noise.device.type != "meta" else "cpu"
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            x = self.x_embedder(self.patchify(noise)) + self.pos_embed  # (B, L, D)
            x = x.to(compute_dtype)
            if self.cfg.in_context_tokens:
                context = self.context_proj(c)[:, None] + self.context_embed  # (B, 1, D) + (T, D) -> (B, T, D)
                x = torch.cat([context.to(compute_dtype), x], dim=1)  # (B, T + L, D)
            rope = self.rope()
            for block in self.blocks:
                if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, c, rope, use_reentrant=False)
                else:
                    x = block(x, c, rope)
            with no_autocast(x.device):
                shift, scale = self.final_adaLN(F.silu(c)).to(x.dtype).chunk(2, dim=-1)  # (B, D) each
            x = self.final_linear(modulate(self.final_norm(x), shift, scale))  # (B, T + L, p*p*C)
        x = x[:, self.cfg.in_context_tokens:]  # drop the in-context tokens: (B, L, p*p*C)
        return self.unpatchify(x).to(noise.dtype)  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

_LATENT = dict(image_size=32, in_channels=4, patch_size=2, num_classes=1000)  # SD-VAE latents of 256x256 ImageNet
_PIXEL = dict(image_size=256, in_channels=3, patch_size=16, num_classes=1000)  # 256x256 ImageNet pixels
_S, _B = dict(hidden_size=384, depth=12, num_heads=6), dict(hidden_size=768, depth=12, num_heads=12)
_L, _XL = dict(hidden_size=1024, depth=24, num_heads=16), dict(hidden_size=1152, depth=28, num_heads=16)
_MINI = dict(hidden_size=256, depth=8, num_heads=4, style_tokens=32, style_codebook=64)

# Preset name -> architecture. Paper-scale presets: sizes of DiT (S/B/L/XL) and of the paper's Tables 5/6.
# The pixel presets checkpoint activations per block, as the code's pixel configs do (`use_remat`).
GENERATORS: dict[str, DiTConfig] = {
    "DiT-S/2": DiTConfig(**_LATENT, **_S),
    "DiT-B/2": DiTConfig(**_LATENT, **_B),  # 132.7M, the paper's ablation and latent-B generator
    "DiT-L/2": DiTConfig(**_LATENT, **_L),  # 462.9M, latent-L
    "DiT-XL/2": DiTConfig(**_LATENT, **_XL),
    "DiT-B/4": DiTConfig(**{**_LATENT, "patch_size": 4}, **_B),  # 64 tokens: a cheap B for quick experiments
    "DiT-B/16": DiTConfig(**_PIXEL, **_B, activation_checkpointing=True),  # 133.9M, pixel-B
    "DiT-L/16": DiTConfig(**_PIXEL, **_L, activation_checkpointing=True),  # 464.5M, pixel-L
    # Small image sets, 10 classes: 28x28x1 (MNIST-like) and 32x32x3 (CIFAR-10-like).
    "DiT-mini/2-28": DiTConfig(image_size=28, in_channels=1, patch_size=2, num_classes=10, **_MINI),
    "DiT-mini/2-32": DiTConfig(image_size=32, in_channels=3, patch_size=2, num_classes=10, **_MINI),
    # Tests and CPU smoke runs: every feature on, fp32, a few thousand parameters per block.
    "DiT-tiny": DiTConfig(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, style_tokens=4, style_codebook=8, in_context_tokens=4, bf16=False),
}


def generator_config(name: str, **overrides) -> DiTConfig:
    """The config of preset `name` with fields replaced by `overrides`; unknown names or fields raise ValueError."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; available: {', '.join(GENERATORS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(GENERATORS[name], **overrides)


def build_generator(name: str, **overrides) -> DiT:
    """A freshly initialised DiT of preset `name`, e.g. build_generator("DiT-B/2", bf16=False).

    Builds on the current default device, so `with torch.device("meta"): build_generator("DiT-L/2")` costs nothing.
    """
    return DiT(generator_config(name, **overrides))
