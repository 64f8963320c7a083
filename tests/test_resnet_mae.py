"""ResNet-MAE: the patchify channel order, the taps (names, order, shapes), the decoder and head shapes, padding of
28x28 inputs, GroupNorm settings, and the paper's parameter counts (on the meta device, no memory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drifting.models.resnet_mae import (
    GN_EPS,
    BasicBlock,
    ResNetMAE,
    ResNetMAEConfig,
    mae_latent_256,
    mae_latent_640,
    mae_pixel_640,
    num_groups,
    patchify,
    resnet_maes,
    unpatchify,
)

LATENT_TAPS = [
    ("conv1", 1, 32), ("layer1_blk2", 1, 32), ("layer1", 1, 32),
    ("layer2_blk2", 2, 16), ("layer2_blk4", 2, 16), ("layer2", 2, 16),
    ("layer3_blk2", 4, 8), ("layer3_blk4", 4, 8), ("layer3_blk6", 4, 8), ("layer3", 4, 8),
    ("layer4_blk2", 8, 4), ("layer4", 8, 4),
]  # (name, width multiple of C, side)


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def test_patchify_channel_order_and_inverse():
    n, c, p = 2, 3, 4
    x = torch.randn(n, c, 8, 12)
    y = patchify(x, p)
    assert y.shape == (n, p * p * c, 2, 3)
    # Channel (row-in-patch r, col-in-patch s, C) of cell (i, j) is pixel (i p + r, j p + s) of channel C.
    for r in range(p):
        for s in range(p):
            for ch in range(c):
                torch.testing.assert_close(y[:, (r * p + s) * c + ch], x[:, ch, r::p, s::p], rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(y, p), x, rtol=0, atol=0)


def test_taps_names_order_and_shapes():
    model = ResNetMAE()  # the tiny default: latent-shaped, width 8
    c = model.cfg.width
    taps = model.taps(torch.randn(2, 4, 32, 32))
    assert [(k, v.shape) for k, v in taps.items()] == [(k, (2, m * c, s, s)) for k, m, s in LATENT_TAPS]


def test_block_taps_are_raw_and_stage_taps_after_the_stage_norm():
    model = ResNetMAE()
    taps = model.taps(torch.randn(2, 4, 32, 32))
    # layer2's last block is block 4: its raw output is tapped, and layer2 is the stage GroupNorm of it.
    torch.testing.assert_close(model.encoder.layers[1].norm(taps["layer2_blk4"]), taps["layer2"])
    assert not torch.allclose(taps["layer2_blk4"], taps["layer2"])
    assert (taps["layer1_blk2"] >= 0).all()  # a block ends in a ReLU; the stage GroupNorm output does not
    assert (taps["layer1"] < 0).any()


def test_every_k_block_option():
    model = ResNetMAE(ResNetMAEConfig(width=4, every_k_block=3))
    names = list(model.taps(torch.randn(1, 4, 32, 32)))
    assert names == ["conv1", "layer1_blk3", "layer1", "layer2_blk3", "layer2", "layer3_blk3", "layer3_blk6",
                     "layer3", "layer4_blk3", "layer4"]


def test_forward_shapes_latent_pixel_and_padded():
    # Latent: recon like the input, logits from the head.
    recon, logits = ResNetMAE()(torch.randn(2, 4, 32, 32))
    assert recon.shape == (2, 4, 32, 32) and logits.shape == (2, 10)
    # Pixel: patch 8 on 64x64 RGB -> an 8x8 grid of 192 channels.
    model = ResNetMAE(ResNetMAEConfig(in_channels=3, image_size=64, patch_size=8, width=4, num_classes=0))
    x = torch.randn(2, 3, 64, 64)
    assert model.patchify(x).shape == (2, 192, 8, 8)
    assert model.taps(x)["layer4"].shape == (2, 32, 1, 1)
    recon, logits = model(x)
    assert recon.shape == x.shape and logits is None
    # 28x28 (MNIST): the grid is padded to 32 by replicating the border and the reconstruction cropped back.
    model = ResNetMAE(ResNetMAEConfig(in_channels=1, image_size=28, width=4))
    x = torch.randn(2, 1, 28, 28)
    assert model.cfg.padded_grid_size == 32
    assert model.patchify(x).shape == (2, 1, 28, 28)  # norm_x sees the sample itself, unpadded
    taps = model.taps(x)
    assert [taps[k].shape[-1] for k in ("conv1", "layer1", "layer2", "layer3", "layer4")] == [32, 32, 16, 8, 4]
    grid = model._grid(x)
    torch.testing.assert_close(grid[..., 2:30, 2:30], x)
    torch.testing.assert_close(grid[..., :2, 2:30], x[..., :1, :].expand(-1, -1, 2, -1))
    assert model(x)[0].shape == x.shape


def test_backward_reaches_the_input():
    model = ResNetMAE(ResNetMAEConfig(width=4))
    x = torch.randn(2, 4, 32, 32, requires_grad=True)
    recon, logits = model(x)
    (recon.square().mean() + logits.square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_group_norm_and_shortcuts():
    # the authors' 32 groups for every width of the paper; at least 8 channels per group below 256
    assert [num_groups(c) for c in (256, 512, 640, 5120, 8, 12, 32, 48, 64, 96)] == [32, 32, 32, 32, 1, 1, 4, 6, 8, 12]
    model = ResNetMAE()
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.eps == GN_EPS == 1e-6 and m.affine for m in norms)
    blocks = [m for m in model.encoder.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 16
    # A shortcut projection only where the shape changes: the first block of stages 2-4.
    assert [i for i, b in enumerate(blocks) if b.shortcut is not None] == [3, 7, 13]
    assert all(m.bias is None for m in model.encoder.modules() if isinstance(m, nn.Conv2d))
    assert model.decoder.out.bias is not None


def test_paper_parameter_counts_on_meta_device():
    with torch.device("meta"):
        m256, m640, p640 = mae_latent_256(), mae_latent_640(), mae_pixel_640()
    # Notes 6.1: encoder ~340M (MAE-256) and ~2.1B (MAE-640); we count 340.2M and 2.126B.
    assert abs(count(m256.encoder) - 340e6) < 1e6
    assert abs(count(m640.encoder) - 2.1e9) < 0.05e9
    # The pixel encoder differs only in its stem (192 input channels instead of 4).
    assert count(p640.encoder) - count(m640.encoder) == (192 - 4) * 640 * 9
    assert m256.head.out_features == 1000 and m256.cfg.width == 256


def test_presets_build_and_config_errors():
    assert set(resnet_maes) == {"mae_latent_256", "mae_latent_640", "mae_pixel_640", "mae_mnist", "mae_cifar",
                                "mae_tiny"}
    with torch.device("meta"):
        for build in resnet_maes.values():
            assert isinstance(build(), ResNetMAE)
        assert resnet_maes["mae_cifar"](width=16).cfg.width == 16
    with pytest.raises(ValueError, match="not divisible"):
        ResNetMAEConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="depths"):
        ResNetMAEConfig(depths=(2, 2, 2))
    with pytest.raises(ValueError, match="expected input"):
        ResNetMAE().taps(torch.randn(1, 3, 32, 32))
