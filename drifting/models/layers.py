"""The few blocks the generators share: RMSNorm, the alpha embedder, SwiGLU, attention with QK-norm and RoPE.

Written from `official-code-notes.md` section 5 (the authors' `LightningDiT`), not from any other code base, so the
generators need no timm or diffusers. Shapes: B batch, L tokens, D width, H heads, Dh = D / H head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RMSNorm",
    "TimestepEmbedder",
    "ConditionEmbedder",
    "SwiGLU",
    "Attention",
    "swiglu_hidden_size",
    "timestep_embedding",
    "rope_positions_1d",
    "rope_positions_2d",
    "rope_cos_sin",
    "apply_rope",
    "modulate",
    "sincos_pos_embed_2d",
    "no_autocast",
]


def no_autocast(device: torch.device):
    """A context that turns autocast off on `device`: the parts the authors' code keeps in fp32 run in fp32 even when
    the rest of the forward runs under bf16 autocast (autocast would otherwise cast every matmul to bf16)."""
    # Autocast knows only real backends; on the meta device (parameter counts, shape checks) there is nothing to undo.
    device_type = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gain over the last dimension: [..., D] -> [..., D] in the input dtype.

    The statistics (and the gain) are computed in fp32 whatever the input dtype, as in the authors' code, so a bf16
    residual stream is normalised without bf16 rounding in the mean of squares.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 1e4) -> Tensor:
    """DiT's sinusoid of a scalar per sample: [B] -> [B, dim] fp32, cosines first, then sines.

    Frequencies max_period^(-j / (dim/2)), j = 0 .. dim/2 - 1. The generator feeds the raw CFG scale alpha (about
    1 to 4), not a diffusion time, so only the low frequencies vary much across the alpha range; that is the code's
    choice and is kept.
    """
    if dim % 2:
        raise ValueError(f"timestep_embedding: expected an even dim, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear: [B] -> [B, D]. Here it embeds the guidance scale alpha (section 3).

    Weights N(0, 0.02) and zero biases, as the code initialises them.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 1e4):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim, self.max_period))


class ConditionEmbedder(nn.Module):
    """The generator's conditioning vector (sections 3 and 5.1): labels [B], alpha [B], style [B, T] -> c [B, D] fp32.

        c = class_embed[y] + sum_i style_embed[i, s_i] + 0.02 * RMSNorm(TimestepEmbedder(alpha))

    Each of the T style tokens has its own table of `style_codebook` entries (T = 0 turns styles off; style is then
    None). There is no null class: guidance enters through alpha, not through label dropout. Embeddings N(0, 0.02).
    Always computed in fp32 (autocast off): c is tiny and feeds the fp32 adaLN projections.
    """

    alpha_scale = 0.02  # the alpha embedding enters c at 1/50 of its RMS-normalised size

    def __init__(self, dim: int, num_classes: int, style_tokens: int = 0, style_codebook: int = 64):
        super().__init__()
        self.style_tokens = style_tokens
        self.class_embed = nn.Embedding(num_classes, dim)
        if style_tokens:
            self.style_embed = nn.Parameter(torch.empty(style_tokens, style_codebook, dim))
        self.alpha_embedder = TimestepEmbedder(dim)
        self.alpha_norm = RMSNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.class_embed.weight, std=0.02)
        if self.style_tokens:
            nn.init.normal_(self.style_embed, std=0.02)
        self.alpha_embedder.reset_parameters()
        self.alpha_norm.reset_parameters()

    def forward(self, labels: Tensor, alpha: Tensor, style: Tensor | None) -> Tensor:
        with no_autocast(labels.device):
            c = self.class_embed(labels).float()  # (B, D)
            if self.style_tokens:
                # Row s_i of table i is row i * K + s_i of the stacked tables; embedding_bag sums the T rows of a
                # sample without materialising [B, T, D] (512 MB in fp32 for the 4,096 samples of an ablation step).
                tables = self.style_embed.flatten(0, 1)  # (T * K, D)
                offsets = torch.arange(self.style_tokens, device=style.device) * self.style_embed.shape[1]
                c = c + F.embedding_bag(style + offsets, tables, mode="sum").float()  # (B, D)
            return c + self.alpha_scale * self.alpha_norm(self.alpha_embedder(alpha)).float()


def swiglu_hidden_size(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 32) -> int:
    """The code's SwiGLU width: int(2/3 * mlp_ratio * dim) rounded up to a multiple of 32 (768 -> 2048, 1024 -> 2752).

    The 2/3 keeps the parameter count of a 4x GELU MLP despite the third matrix.
    """
    hidden = int(2 * mlp_ratio * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """W2(SiLU(W1 x) * W3 x), biases on all three: [..., D] -> [..., D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ---------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half / NeoX convention)
# ---------------------------------------------------------------------------------------------------------------------


def rope_positions_1d(grid: int, prefix: int, device=None) -> Tensor:
    """Positions of the authors' 1-D RoPE: [prefix + grid^2, 1].

    The `prefix` in-context tokens get 0 .. prefix-1 and patch (r, c) gets prefix + grid * r + c: one index over the
    flattened sequence, not an axial 2-D position.
    """
    return torch.arange(prefix + grid * grid, device=device, dtype=torch.float32)[:, None]


def rope_positions_2d(grid: int, prefix: int, device=None) -> Tensor:
    """Positions (row, col) of the axial 2-D RoPE option: [prefix + grid^2, 2].

    In-context token i sits at (0, i) and patch (r, c) at (r + 1, c): a row of its own above the image, which is what
    the 1-D scheme amounts to when the grid is `prefix` patches wide (16 tokens before a 16x16 grid).
    """
    rows = torch.arange(grid, device=device, dtype=torch.float32)
    r, c = torch.meshgrid(rows + 1, rows, indexing="ij")
    prefix_pos = torch.stack([torch.zeros(prefix, device=device), torch.arange(prefix, device=device)], dim=-1)
    return torch.cat([prefix_pos.float(), torch.stack([r.flatten(), c.flatten()], dim=-1)], dim=0)


def rope_cos_sin(positions: Tensor, head_dim: int, base: float = 1e4) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles: positions [L, A] (A axes) -> two [L, A, head_dim / A] fp32 tensors.

    Each axis gets head_dim / A channels. Within an axis of n channels the frequencies are base^(-j / (n/2)),
    j = 0 .. n/2 - 1, duplicated for the two halves that rotate-half pairs (channel j with channel j + n/2).
    For A = 1 and head_dim 64 these are the code's 10^4^(-j/32), j = 0..31.
    """
    num_axes = positions.shape[-1]
    n = head_dim // num_axes
    if head_dim % num_axes or n % 2:
        raise ValueError(f"rope: head_dim {head_dim} must split into {num_axes} axes of an even number of channels")
    freqs = base ** (-torch.arange(n // 2, device=positions.device, dtype=torch.float32) / (n // 2))  # (n/2,)
    angles = positions.float()[..., None] * freqs  # (L, A, n/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, A, n)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, L, Dh] by the angles of `rope_cos_sin` ([L, A, Dh / A] each); returns x's dtype.

    For x [B, L, H, Dh] pass cos[:, None] and sin[:, None] ([L, 1, A, Dh / A]): they broadcast over the heads.

    Rotate-half: within each axis' n channels, channel j pairs with channel j + n/2. Computed in fp32.
    """
    shape, dtype = x.shape, x.dtype
    x = x.float().unflatten(-1, cos.shape[-2:])  # (B, H, L, A, n)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).reshape(shape).to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv (bias) -> QK-norm -> RoPE -> softmax attention -> output projection.

    [B, L, D] -> [B, L, D]. QK-norm is an RMSNorm over head_dim whose gain is shared by all heads. With `fp32`, the
    attention itself (scores, softmax, weighted sum) runs in fp32 even under bf16 autocast, as the code's
    `attn_fp32`; the projections stay in the autocast dtype.
    """

    def __init__(self, dim: int, num_heads: int, fp32: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fp32 = fp32
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, length, dim = x.shape
        # QK-norm and RoPE work on the tokens' own (B, L, H, Dh) layout, and attention takes q, k, v as (B, H, L, Dh)
        # transposed views of it (the layout flash attention and cuDNN read natively). Permuting to (B, H, L, Dh)
        # first made the compiled generator copy q, k, v and their gradients across the layouts, strided, in every
        # block: the DiT-B/2's forward + backward took 104 ms for 256 samples on an H200, now 96 ms
        # (docs/benchmarks.md, twenty-third sitting). Same values.
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).unbind(2)  # (B, L, H, Dh) each
        q, k = self.q_norm(q), self.k_norm(k)  # the norm comes before the rotation, as in the code
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]  # (L, 1, A, Dh / A): broadcast over the heads
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, Dh) views
        if self.fp32:
            with no_autocast(x.device):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            out = F.scaled_dot_product_attention(q, k, v.to(q.dtype))
        out = out.to(v.dtype).transpose(1, 2).reshape(b, length, dim)  # (B, L, D)
        return self.proj(out)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift: x [B, L, D], shift and scale [B, D] -> [B, L, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding: [grid * grid, dim] fp32, tokens in row-major order.

    The first dim/2 channels encode the column index, the last dim/2 the row index (MAE's order); within each half,
    dim/4 sines then dim/4 cosines at frequencies 10^4^(-j / (dim/4)). Computed in float64, then rounded once.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: expected dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def embed_1d(pos: Tensor) -> Tensor:
        args = pos.flatten()[:, None] * omega[None]  # (grid^2, dim/4)
        return torch.cat([args.sin(), args.cos()], dim=-1)  # (grid^2, dim/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=-1).float()  # (grid^2, dim)
