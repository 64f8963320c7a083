"""MLPs for vector data: the plain `mlp` of the 2-D toy, and `MLPGenerator`, the DiT's conditioning on an MLP."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drifting.models.layers import ConditionEmbedder, RMSNorm, SwiGLU, swiglu_hidden_size

__all__ = ["mlp", "MLPConfig", "MLPGenerator"]


def mlp(in_dim: int, out_dim: int, hidden: int = 256, depth: int = 3) -> nn.Sequential:
    """`depth` hidden layers of width `hidden` with SiLU, then a linear output: [..., in_dim] -> [..., out_dim]."""
    if depth < 1 or hidden < 1 or in_dim < 1 or out_dim < 1:
        raise ValueError(f"mlp: expected positive sizes, got in_dim={in_dim}, out_dim={out_dim}, hidden={hidden}, "
                         f"depth={depth}")
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class MLPConfig:
    """Architecture of an MLP generator for vector data (toys, policies, tabular)."""

    dim: int = 2  # D_x: dimension of a sample (and of the output)
    noise_dim: int | None = None  # D_eps: dimension of the noise; None means dim
    num_classes: int = 1  # class labels 0 .. num_classes-1 (1: unconditional, every label is 0)
    hidden: int = 256  # D: width of the residual stream and of the conditioning vector c
    depth: int = 3  # residual blocks
    mlp_ratio: float = 4.0  # SwiGLU width rule of the DiT
    style_tokens: int = 0  # style embeddings summed into c (0: off; the DiT uses 32)
    style_codebook: int = 64

    def __post_init__(self) -> None:
        for name in ("dim", "num_classes", "hidden", "depth", "style_codebook"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.noise_dim is not None and (isinstance(self.noise_dim, bool) or not isinstance(self.noise_dim, int)
                                           or self.noise_dim < 1):
            raise ValueError(f"noise_dim: expected None or an integer >= 1, got {self.noise_dim!r}")
        if isinstance(self.style_tokens, bool) or not isinstance(self.style_tokens, int) or self.style_tokens < 0:
            raise ValueError(f"style_tokens: expected an integer >= 0 (0 turns it off), got {self.style_tokens!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio: expected a number > 0, got {self.mlp_ratio!r}")


class _ResidualBlock(nn.Module):
    """x + gate * SwiGLU(modulate(RMSNorm(x))), shift/scale/gate from SiLU(c) (zero init): [B, D] -> [B, D]."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden_size(dim, mlp_ratio))
        self.adaLN_modulation = nn.Linear(dim, 3 * dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(F.silu(c)).chunk(3, dim=-1)  # (B, D) each
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class MLPGenerator(nn.Module):
    """One-step generator for vectors, f(noise, class, alpha, style) -> x: the DiT's conditioning on an MLP.

    noise [B, D_eps] -> Linear -> depth x adaLN-zero SwiGLU block -> RMSNorm -> modulate -> Linear -> x [B, D_x]

    The conditioning vector c = class embedding + sum of style embeddings + 0.02 * RMSNorm(alpha embedding) is built
    as in the DiT, and the output layer is zero-initialised, so the output is exactly 0 at initialisation. Same
    generator interface as `DiT`: `num_classes`, `noise_shape`, `style_tokens`, `style_codebook`,
    `forward(noise, labels, alpha, style)`. Everything runs in the parameters' dtype (fp32): these networks are small.
    """

    def __init__(self, cfg: MLPConfig | None = None, **overrides):
        super().__init__()
        cfg = replace(cfg or MLPConfig(), **overrides)
        self.cfg = cfg
        d = cfg.hidden
        self.cond_embedder = ConditionEmbedder(d, cfg.num_classes, cfg.style_tokens, cfg.style_codebook)
        self.in_proj = nn.Linear(self.noise_shape[0], d)
        self.blocks = nn.ModuleList(_ResidualBlock(d, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = RMSNorm(d)
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.final_linear = nn.Linear(d, cfg.dim)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def noise_shape(self) -> tuple[int]:
        return (self.cfg.noise_dim or self.cfg.dim,)

    @property
    def style_tokens(self) -> int:
        return self.cfg.style_tokens

    @property
    def style_codebook(self) -> int:
        return self.cfg.style_codebook

    def reset_parameters(self) -> None:
        """The DiT's initialisation: Xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.cond_embedder.reset_parameters()  # N(0, 0.02) embeddings and alpha MLP, overriding the Xavier pass
        for layer in [block.adaLN_modulation for block in self.blocks] + [self.final_adaLN, self.final_linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, noise: Tensor, labels: Tensor, alpha: Tensor | float, style: Tensor | None = None) -> Tensor:
        """noise [B, D_eps], labels [B], alpha [B] or a number, style [B, style_tokens] (None when off) -> [B, D_x]."""
        b = noise.shape[0]
        if tuple(noise.shape[1:]) != self.noise_shape:
            raise ValueError(f"noise: expected shape [B, {self.noise_shape[0]}], got {tuple(noise.shape)}")
        if self.cfg.style_tokens and (style is None or tuple(style.shape) != (b, self.cfg.style_tokens)):
            raise ValueError(f"style: expected indices of shape [{b}, {self.cfg.style_tokens}], got "
                             f"{None if style is None else tuple(style.shape)}")
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=noise.device).expand(b)  # a number -> [B]
        c = self.cond_embedder(labels, alpha, style).to(noise.dtype)  # (B, D)
        x = self.in_proj(noise)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_adaLN(F.silu(c)).chunk(2, dim=-1)
        return self.final_linear(self.final_norm(x) * (1 + scale) + shift)  # (B, D_x)
