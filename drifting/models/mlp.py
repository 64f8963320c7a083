"""A plain MLP, the network of the toy generator (and of other vector-data generators)."""

from __future__ import annotations

from torch import nn


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
