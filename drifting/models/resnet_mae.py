"""The ResNet-MAE feature encoder of the paper (A.3), laid out as in the authors' code (official-code-notes.md 6.1).

A ResNet-34 layout with GroupNorm and basic blocks over a 32x32 grid (a latent, or 8x8 pixel patches of a 256x256
image), a U-Net decoder that reconstructs the input (used only by MAE pre-training) and a linear classification head
(used only by the classification fine-tune). The drifting loss reads the encoder's intermediate maps through `taps`.

    sample [N, C, H, W] --patchify(p)--> [N, C p^2, H/p, W/p] --pad to a multiple of 8--> grid [N, C p^2, G, G]
      conv1 (3x3, GN, ReLU)                     [N,  C, G,   G  ]   tap conv1
      layer1: 3 basic blocks, then GN           [N,  C, G,   G  ]   taps layer1_blk2, layer1
      layer2: 4 blocks (first stride 2), GN     [N, 2C, G/2, G/2]   taps layer2_blk2, layer2_blk4, layer2
      layer3: 6 blocks (first stride 2), GN     [N, 4C, G/4, G/4]   taps layer3_blk2/4/6, layer3
      layer4: 3 blocks (first stride 2), GN     [N, 8C, G/8, G/8]   taps layer4_blk2, layer4
      decoder(conv1, layer1..4) -> [N, C p^2, G, G] -> crop, unpatchify -> reconstruction [N, C, H, W]
      head(spatial mean of layer4) -> logits [N, num_classes]

Inputs that do not fill the 32/16/8/4 layout (MNIST's 28x28) are padded on the grid to the next multiple of 8 by
replicating the border (the padding adds no artificial edge whatever the value range of the data, and for MNIST
the border is background); the reconstruction is cropped back. The padding happens after the patchify, so the
encoder input whose per-channel RMS is the `norm_x` feature (`patchify`) is the sample's own, unpadded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GN_GROUPS = 32
GN_EPS = 1e-6  # Flax's GroupNorm default, which the authors' code uses
# At least 8 channels per group, as in the paper's narrowest GroupNorm (256 channels / 32 groups). With one channel
# per group (the authors' 32-group rule at widths <= 32) a GroupNorm output has a spatial mean of exactly beta and a
# spatial std of |gamma| for every sample: the `layer1_mean` / `layer1_std` keys of a small encoder were constants,
# their distances rounding noise clamped to the 1e-4 scale, and their gradients (1e10 at the zero-output start)
# drowned every other key's after clipping: MNIST, Fashion-MNIST and CIFAR-10 generators with such an encoder
# collapsed to one image (docs/results.md). Every width of the paper (C >= 256) keeps 32 groups.
GN_MIN_CHANNELS_PER_GROUP = 8


@dataclass(frozen=True)
class ResNetMAEConfig:
    """Sizes of a ResNet-MAE. The defaults are the tiny debug encoder (latent-shaped, all 86 feature keys)."""

    in_channels: int = 4  # channels of the sample: 4 (SD-VAE latent), 3 (RGB), 1 (MNIST)
    image_size: int = 32  # H = W of the sample
    patch_size: int = 1  # p of the input space-to-depth: 1 for latents and small images, 8 for 256x256 pixels
    width: int = 8  # C of the paper: the stages have widths C, 2C, 4C, 8C
    depths: tuple[int, int, int, int] = (3, 4, 6, 3)  # basic blocks per stage (ResNet-34)
    num_classes: int = 10  # classes of the linear head on layer4; 0 for no head
    every_k_block: int = 2  # tap the raw output of every block whose 1-based index is divisible by this

    def __post_init__(self):
        for name in ("in_channels", "image_size", "patch_size", "width", "every_k_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes: expected an integer >= 0, got {self.num_classes}")
        if len(self.depths) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths: expected 4 stages of >= 1 blocks (the decoder has 4 up-blocks), "
                             f"got {self.depths}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Side of the patchified input, before padding."""
        return self.image_size // self.patch_size

    @property
    def padded_grid_size(self) -> int:
        """Side of the grid the encoder runs on: the next multiple of 8, so the three stride-2 stages halve exactly."""
        return -(-self.grid_size // 8) * 8


def num_groups(channels: int, max_groups: int = GN_GROUPS) -> int:
    """The largest divisor of `channels` that is at most 32 and leaves >= 8 channels per group (32 for every width of
    the paper; one group below 16 channels)."""
    limit = max(1, min(max_groups, channels // GN_MIN_CHANNELS_PER_GROUP))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=GN_EPS)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution of the encoder and decoder is followed by a GroupNorm.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def patchify(x: Tensor, p: int) -> Tensor:
    """Space-to-depth: [N, C, H, W] -> [N, p*p*C, H/p, W/p], channels ordered (row-in-patch, col-in-patch, C).

    The order is the authors' (NHWC patches flattened row, column, channel); torch's pixel_unshuffle orders the
    channels (C, row, col) instead, which would permute the `norm_x` feature and the reconstruction target.
    """
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)  # (N, C, h, r, w, s)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(n, p * p * c, h // p, w // p)  # (N, r s C, h, w)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Inverse of `patchify`: [N, p*p*C, h, w] -> [N, C, h*p, w*p]."""
    n, k, h, w = x.shape
    c = k // (p * p)
    x = x.reshape(n, p, p, c, h, w).permute(0, 3, 4, 1, 5, 2)  # (N, C, h, r, w, s)
    return x.reshape(n, c, h * p, w * p)


class BasicBlock(nn.Module):
    """ReLU(shortcut(x) + GN(conv(ReLU(GN(conv_s(x)))))); shortcut = 1x1 conv_s + GN only when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(c_in, c_out, stride), group_norm(c_out)
        self.conv2, self.norm2 = conv3x3(c_out, c_out), group_norm(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), group_norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class Stage(nn.Module):
    """Basic blocks (stride on the first) followed by a GroupNorm that stays in the main path (`layer{s}_norm`)."""

    def __init__(self, c_in: int, c_out: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList([BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(depth)])
        self.norm = group_norm(c_out)


class ResNetEncoder(nn.Module):
    """Stem and four stages on the (padded) grid: [N, C_in p^2, G, G] -> taps (see `taps`)."""

    def __init__(self, cfg: ResNetMAEConfig):
        super().__init__()
        c, widths = cfg.width, [cfg.width * 2**i for i in range(4)]
        self.every_k_block = cfg.every_k_block
        self.conv1 = nn.Sequential(conv3x3(cfg.in_channels * cfg.patch_size**2, c), group_norm(c), nn.ReLU())
        self.layers = nn.ModuleList(
            [Stage(widths[max(i - 1, 0)], widths[i], cfg.depths[i], 1 if i == 0 else 2) for i in range(4)]
        )

    def taps(self, grid: Tensor) -> dict[str, Tensor]:
        """Feature maps in network order: conv1, then per stage s its block taps and layer{s}.

        conv1:          stem output (conv, GN, ReLU)                               [N, C,  G,  G ]
        layer{s}_blk{k}: raw output of block k (1-based) for k % every_k_block == 0 [N, C_s, G_s, G_s]
        layer{s}:       stage output after the stage GroupNorm (which also feeds the next stage)
        The last block of a stage whose depth divides by every_k_block appears twice: before (blk) and after the GN.
        """
        h = self.conv1(grid)
        out = {"conv1": h}
        for s, stage in enumerate(self.layers, start=1):
            for k, block in enumerate(stage.blocks, start=1):
                h = block(h)
                if k % self.every_k_block == 0:
                    out[f"layer{s}_blk{k}"] = h
            h = stage.norm(h)
            out[f"layer{s}"] = h
        return out


class UpBlock(nn.Module):
    """Bilinear resize to the skip's size, concat [up, skip], GN, then two (3x3 conv, GN, ReLU)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.norm = group_norm(c_in + c_skip)
        self.conv = nn.Sequential(conv3x3(c_in + c_skip, c_out), group_norm(c_out), nn.ReLU(),
                                  conv3x3(c_out, c_out), group_norm(c_out), nn.ReLU())

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(self.norm(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    """Bridge (3x3 conv, GN, ReLU at 8C on layer4), up-blocks with skips layer3, layer2, layer1, conv1 to widths
    4C, 2C, C, C, and a final 1x1 conv with bias to C_in p^2 channels: taps -> [N, C_in p^2, G, G]."""

    SKIPS = ("layer3", "layer2", "layer1", "conv1")

    def __init__(self, cfg: ResNetMAEConfig):
        super().__init__()
        c = cfg.width
        self.bridge = nn.Sequential(conv3x3(8 * c, 8 * c), group_norm(8 * c), nn.ReLU())
        self.ups = nn.ModuleList([UpBlock(8 * c, 4 * c, 4 * c), UpBlock(4 * c, 2 * c, 2 * c),
                                  UpBlock(2 * c, c, c), UpBlock(c, c, c)])
        self.out = nn.Conv2d(c, cfg.in_channels * cfg.patch_size**2, 1)

    def forward(self, taps: dict[str, Tensor]) -> Tensor:
        h = self.bridge(taps["layer4"])
        for up, name in zip(self.ups, self.SKIPS):
            h = up(h, taps[name])
        return self.out(h)


class ResNetMAE(nn.Module):
    """The ResNet-MAE: `taps` for the drifting loss, `forward` (reconstruction, logits) for pre-training.

    The feature-encoder interface that `FeatureDriftLoss` relies on is `patchify(x)` and `taps(x)`.
    """

    def __init__(self, cfg: ResNetMAEConfig = ResNetMAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = ResNetEncoder(cfg)
        self.decoder = UNetDecoder(cfg)
        self.head = nn.Linear(8 * cfg.width, cfg.num_classes) if cfg.num_classes else None
        self.apply(_init_weights)

    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ResNetMAE: expected input [N, {', '.join(map(str, expected))}], got {tuple(x.shape)}")

    def patchify(self, x: Tensor) -> Tensor:
        """The encoder input: [N, C, H, W] -> [N, C p^2, H/p, W/p] (the `norm_x` feature is its per-channel RMS)."""
        self._check_input(x)
        return patchify(x, self.cfg.patch_size)

    def _grid(self, x: Tensor) -> Tensor:
        """Patchified input, replicate-padded to the padded grid (centred): [N, C p^2, G, G]."""
        grid = self.patchify(x)
        total = self.cfg.padded_grid_size - self.cfg.grid_size
        if total:
            a, b = total // 2, total - total // 2
            grid = F.pad(grid, (a, b, a, b), mode="replicate")
        return grid

    def taps(self, x: Tensor) -> dict[str, Tensor]:
        """Feature maps of the sample x [N, C, H, W], in network order (see `ResNetEncoder.taps`)."""
        return self.encoder.taps(self._grid(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x [N, C, H, W] (masked cells already zeroed) -> reconstruction [N, C, H, W], logits [N, classes] or None."""
        taps = self.taps(x)
        out = self.decoder(taps)  # (N, C p^2, G, G)
        total = self.cfg.padded_grid_size - self.cfg.grid_size
        if total:
            a, g = total // 2, self.cfg.grid_size
            out = out[..., a:a + g, a:a + g]
        recon = unpatchify(out, self.cfg.patch_size)
        logits = self.head(taps["layer4"].mean(dim=(2, 3))) if self.head is not None else None
        return recon, logits


def _init_weights(m: nn.Module) -> None:
    # Flax's defaults, the framework of the authors' code (their init is not documented; this is an assumption):
    # lecun normal (truncated, variance 1 / fan_in) for kernels, zero biases. GroupNorm keeps (1, 0).
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
        nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------


def _preset(**fields):
    def build(**overrides) -> ResNetMAE:
        return ResNetMAE(ResNetMAEConfig(**{**fields, **overrides}))

    return build


# The paper's encoders: MAE-256 (ablations; encoder ~340M parameters) and MAE-640 (best; ~2.1B), latent and pixel.
mae_latent_256 = _preset(in_channels=4, image_size=32, patch_size=1, width=256, num_classes=1000)
mae_latent_640 = _preset(in_channels=4, image_size=32, patch_size=1, width=640, num_classes=1000)
mae_pixel_640 = _preset(in_channels=3, image_size=256, patch_size=8, width=640, num_classes=1000)
# Small datasets, patch 1. MNIST's 28x28 grid is padded to 32 (stages 32/16/8/4, the paper's layout) and the
# reconstruction cropped back; CIFAR-10 fills it exactly. Widths 32 (5.3M encoder parameters) and 64 (21M, the
# ResNet-34 width) are ample for 10 classes of small images and train in minutes to hours on one GPU.
mae_mnist = _preset(in_channels=1, image_size=28, patch_size=1, width=32, num_classes=10)
mae_cifar = _preset(in_channels=3, image_size=32, patch_size=1, width=64, num_classes=10)
# Tests and debugging: latent-shaped, all 86 feature keys, width 8 (0.34M encoder parameters).
mae_tiny = _preset()

resnet_maes = {
    "mae_latent_256": mae_latent_256,
    "mae_latent_640": mae_latent_640,
    "mae_pixel_640": mae_pixel_640,
    "mae_mnist": mae_mnist,
    "mae_cifar": mae_cifar,
    "mae_tiny": mae_tiny,
}
