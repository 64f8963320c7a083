"""A tiny class-conditional image set made on the fly: the embedded default of `drifting train` (no download).

Class c is a bright square at a class-specific position on a dark background, with a class-specific colour, jittered
by a pixel and with pixel noise, so a one-step generator can learn it in seconds on a CPU and a wrong class is
visible at a glance in a sample grid.
"""

from __future__ import annotations

import torch
from torch import Tensor


def synthetic_images(
    num_classes: int = 4, per_class: int = 256, size: int = 8, channels: int = 3, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Returns (images uint8 [N, channels, size, size], labels int64 [N]) with N = num_classes * per_class."""
    if num_classes < 1 or per_class < 1 or size < 4 or channels < 1:
        raise ValueError(f"synthetic_images: expected num_classes, per_class >= 1, size >= 4, channels >= 1; got "
                         f"{num_classes}, {per_class}, {size}, {channels}")
    g = torch.Generator().manual_seed(seed)
    n = num_classes * per_class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    side = max(2, size // 3)
    grid = size - side + 1  # positions of the square's corner
    angles = 2 * torch.pi * labels.float() / num_classes
    # class-specific corner on a circle around the centre, jittered by one pixel
    rows = ((grid - 1) / 2 * (1 + torch.sin(angles))).round().long()
    cols = ((grid - 1) / 2 * (1 + torch.cos(angles))).round().long()
    rows = (rows + torch.randint(-1, 2, (n,), generator=g)).clamp(0, grid - 1)
    cols = (cols + torch.randint(-1, 2, (n,), generator=g)).clamp(0, grid - 1)
    colour = 0.5 + 0.5 * torch.stack([torch.cos(angles + k * 2.1) for k in range(channels)], dim=1)  # [N, C]
    y = torch.arange(size)
    inside = ((y[None, :, None] >= rows[:, None, None]) & (y[None, :, None] < rows[:, None, None] + side)
              & (y[None, None, :] >= cols[:, None, None]) & (y[None, None, :] < cols[:, None, None] + side))
    images = inside[:, None].float() * (0.3 + 0.7 * colour[:, :, None, None])
    images = images + 0.05 * torch.randn(images.shape, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels
