"""The policy network (a 1-D temporal convolutional U-Net over action chunks) and the policy around it.

`ChunkUNet` maps a chunk-shaped input x [B, H, D_a] and the flattened normalised observations [B, T_o * D_o] (plus,
for the diffusion baseline, a timestep [B]) to an output of the same shape as x. Every residual block is
FiLM-conditioned: the conditioning vector gives a per-channel scale and shift after the first convolution.

    Drifting Policy   x = noise eps ~ N(0, I)    output = the normalised action chunk, in one forward pass
    DDPM baseline     x = noisy chunk x_t, t     output = the predicted noise; 100 denoising passes per chunk

`ChunkPolicy` holds the network, the two normalisers (saved in its state_dict) and the sampler, and implements the
contract of drifting/policy/env.py: `predict_action(obs (B, T_o, D_o)) -> action (B, T_a, D_a)` in raw units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from drifting.policy.demos import MinMaxNormalizer


@dataclass(frozen=True)
class PolicyModelConfig:
    down_dims: tuple[int, ...] = (64, 128)  # channels per U-Net level (Diffusion Policy: 256, 512, 1024)
    kernel_size: int = 5
    groups: int = 8  # GroupNorm groups
    time_dim: int = 64  # sinusoidal timestep embedding (DDPM only)


# ---------------------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [B] -> [B, dim] (log-spaced frequencies, as in the Transformer)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(groups, c_out),
                         nn.Mish())


class FiLMResBlock(nn.Module):
    """conv -> FiLM(cond) -> conv, plus a (1x1 when channels change) skip connection."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, groups: int):
        super().__init__()
        self.conv1 = ConvNormAct(c_in, c_out, kernel_size, groups)
        self.conv2 = ConvNormAct(c_out, c_out, kernel_size, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:  # x (B, C_in, H), cond (B, cond_dim)
        scale, shift = self.film(cond)[:, :, None].chunk(2, dim=1)  # (B, C_out, 1) each
        h = self.conv1(x) * (1 + scale) + shift  # 1 + scale: starts as the identity modulation
        return self.conv2(h) + self.skip(x)


class ChunkUNet(nn.Module):
    """[B, H, D_a] (+ cond [B, cond_dim], + t [B] when `timestep`) -> [B, H, D_a]. H must divide 2^(levels-1)."""

    def __init__(self, action_dim: int, cond_dim: int, cfg: PolicyModelConfig = PolicyModelConfig(),
                 timestep: bool = False):
        super().__init__()
        self.timestep = timestep
        k, g = cfg.kernel_size, cfg.groups
        if timestep:
            self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, 4 * cfg.time_dim), nn.Mish(),
                                          nn.Linear(4 * cfg.time_dim, cfg.time_dim))
            cond_dim += cfg.time_dim
        self.time_dim = cfg.time_dim
        dims = [action_dim, *cfg.down_dims]
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dims) - 2
            self.down.append(nn.ModuleList([FiLMResBlock(a, b, cond_dim, k, g), FiLMResBlock(b, b, cond_dim, k, g),
                                            nn.Identity() if last else nn.Conv1d(b, b, 3, stride=2, padding=1)]))
        mid = cfg.down_dims[-1]
        self.mid = nn.ModuleList([FiLMResBlock(mid, mid, cond_dim, k, g), FiLMResBlock(mid, mid, cond_dim, k, g)])
        self.up = nn.ModuleList()
        for i, (a, b) in enumerate(reversed(list(zip(cfg.down_dims[:-1], cfg.down_dims[1:])))):
            # input: the deeper level's output concatenated with the skip of this level (both b channels)
            self.up.append(nn.ModuleList([FiLMResBlock(2 * b, a, cond_dim, k, g), FiLMResBlock(a, a, cond_dim, k, g),
                                          nn.ConvTranspose1d(a, a, 4, stride=2, padding=1)]))
        self.head = nn.Sequential(ConvNormAct(cfg.down_dims[0], cfg.down_dims[0], k, g),
                                  nn.Conv1d(cfg.down_dims[0], action_dim, 1))
        self.levels = len(cfg.down_dims)

    def forward(self, x: Tensor, cond: Tensor, t: Tensor | None = None) -> Tensor:
        if self.timestep:
            if t is None:
                raise ValueError("ChunkUNet(timestep=True) needs the timestep t [B]")
            cond = torch.cat([cond, self.time_mlp(timestep_embedding(t, self.time_dim))], dim=-1)
        if x.shape[1] % 2 ** (self.levels - 1):
            raise ValueError(f"chunk length {x.shape[1]} must divide by 2^{self.levels - 1}")
        h = x.transpose(1, 2)  # (B, D_a, H)
        skips = []
        for block1, block2, down in self.down:
            h = block2(block1(h, cond), cond)  # (B, C_i, H_i)
            skips.append(h)
            h = down(h)  # (B, C_i, H_i / 2), except at the last level
        for block in self.mid:
            h = block(h, cond)
        for block1, block2, upsample in self.up:
            # the skip of the same resolution (deepest first); the top level's skip is not needed: the last
            # upsampling returns to full length H just before the head
            h = block2(block1(torch.cat([h, skips.pop()], dim=1), cond), cond)
            h = upsample(h)  # (B, C, 2 H)
        return self.head(h).transpose(1, 2)  # (B, H, D_a)


# ---------------------------------------------------------------------------------------------------------------------
# DDPM (the baseline): squared-cosine betas, epsilon prediction, ancestral sampling with x0 clipped to [-1, 1]
# ---------------------------------------------------------------------------------------------------------------------


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """beta_t such that alpha_bar(t) follows cos^2(((t / T) + s) / (1 + s) * pi / 2) (Nichol & Dhariwal)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float64)


class DDPM(nn.Module):
    def __init__(self, steps: int = 100):
        super().__init__()
        betas = cosine_betas(steps)
        alpha_bar = torch.cumprod(1 - betas, 0)
        self.steps = steps
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.register_buffer("alpha_bar_prev", prev.float(), persistent=False)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:  # x0, eps (B, H, D); t (B,)
        ab = self.alpha_bar[t][:, None, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    @torch.no_grad()
    def sample(self, net: ChunkUNet, cond: Tensor, shape: tuple[int, ...], generator=None) -> Tensor:
        x = torch.randn(shape, generator=generator, device=cond.device)
        for t in range(self.steps - 1, -1, -1):
            tt = torch.full((shape[0],), t, device=cond.device, dtype=torch.long)
            eps = net(x, cond, tt)
            ab, ab_prev, beta = self.alpha_bar[t], self.alpha_bar_prev[t], self.betas[t]
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            # posterior q(x_{t-1} | x_t, x0): mean and the "fixed small" variance
            mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
            if t > 0:
                var = beta * (1 - ab_prev) / (1 - ab)
                mean = mean + var.sqrt() * torch.randn(shape, generator=generator, device=cond.device)
            x = mean
        return x


# ---------------------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------------------


class ChunkPolicy(nn.Module):
    """Observations in, action chunks out, both in raw units; the normalisers are part of the state_dict.

    kind "drift": one network pass from noise; kind "ddpm": `ddpm_steps` denoising passes.
    """

    def __init__(self, kind: str = "drift", obs_dim: int = 5, action_dim: int = 2, obs_horizon: int = 2,
                 pred_horizon: int = 16, action_horizon: int = 8, model: PolicyModelConfig = PolicyModelConfig(),
                 ddpm_steps: int = 100):
        super().__init__()
        if kind not in ("drift", "ddpm"):
            raise ValueError(f"kind: expected 'drift' or 'ddpm', got {kind!r}")
        self.kind = kind
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.pred_horizon, self.action_horizon = obs_horizon, pred_horizon, action_horizon
        self.net = ChunkUNet(action_dim, obs_horizon * obs_dim, model, timestep=kind == "ddpm")
        self.obs_norm = MinMaxNormalizer(obs_dim)
        self.action_norm = MinMaxNormalizer(action_dim)
        self.ddpm = DDPM(ddpm_steps) if kind == "ddpm" else None

    def cond(self, obs: Tensor) -> Tensor:
        """Raw obs (B, T_o, D_o) -> the conditioning vector (B, T_o * D_o) in normalised units."""
        return self.obs_norm.normalize(obs).flatten(1)

    def generate(self, cond: Tensor, noise: Tensor) -> Tensor:
        """Drifting Policy: normalised chunks (B, H, D_a) from noise (B, H, D_a), with gradients (training)."""
        return self.net(noise, cond)

    @torch.no_grad()
    def sample_chunk(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Raw obs (B, T_o, D_o) -> the whole predicted chunk (B, H, D_a), raw units."""
        cond = self.cond(obs.float())
        shape = (obs.shape[0], self.pred_horizon, self.action_dim)
        if self.kind == "drift":
            y = self.net(torch.randn(shape, generator=generator, device=obs.device), cond)
        else:
            y = self.ddpm.sample(self.net, cond, shape, generator)
        return self.action_norm.unnormalize(y)

    @torch.no_grad()
    def predict_action(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The contract: obs (B, T_o, D_o) -> the actions to execute (B, T_a, D_a), chunk[T_o - 1 : T_o - 1 + T_a]
        (the chunk's first T_o - 1 actions belong to past observation steps)."""
        start = self.obs_horizon - 1
        return self.sample_chunk(obs, generator)[:, start: start + self.action_horizon]
