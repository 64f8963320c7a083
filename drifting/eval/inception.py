"""The FID Inception-v3: the TF 2015-12-05 graph that FID and IS are defined on, as a plain nn.Module.

Written from the pytorch-fid description of its "FID Inception" (the graph of the original TTUR FID code, ported to
PyTorch as `pt_inception-2015-12-05-6726825d.pth`) and `official-code-notes.md` section 8:

    uint8 [N, 3, H, W] -> bilinear resize to 299 (affine_grid + grid_sample) -> (x - 128) / 128    (N, 3, 299, 299)
    stem: 3 convs, max-pool, 2 convs, max-pool                                                      (N, 192, 35, 35)
    Mixed_5b..5d (A) -> Mixed_6a (B, /2) -> Mixed_6b..6e (C)                                         (N, 768, 17, 17)
    Mixed_7a (D, /2) -> Mixed_7b (E, avg-pool branch) -> Mixed_7c (E, max-pool branch)               (N, 2048, 8, 8)
    global average pool -> pool features                                                            (N, 2048)
    fc without bias -> logits over the graph's 1008 classes (for the Inception Score)                (N, 1008)

Where the 2015 graph differs from torchvision's Inception3 (and why torchvision's ImageNet weights give different,
incomparable FIDs): the 3x3 average pools in the A, C and first E blocks exclude the padding from the average
(`count_include_pad=False`), and the pool branch of the last E block (Mixed_7c) is a 3x3 max-pool, not an average.
Every other shape, stride and padding is torchvision's. Module names are those of the pytorch-fid weights file
(`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch3x3dbl_3b.bn.running_var`, ..., `fc.weight`), which are also the TF
graph's scope names, so loading is a rename-free `load_state_dict` after `convert_pytorch_fid_state_dict`.

The network is an evaluator, never trained: batch norm always uses its running statistics (even after `.train()`),
there is no dropout, and parameters are frozen. Weights are read from a local file only; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURE_DIM",
    "NUM_LOGITS",
    "INPUT_SIZE",
    "WEIGHTS_ENV",
    "WEIGHTS_URL",
    "InceptionFeatures",
    "ieee_fp32",
    "preprocess",
    "resize_bilinear",
    "resolve_weights_path",
    "convert_pytorch_fid_state_dict",
]

FEATURE_DIM = 2048  # pool features: the space FID is computed in
NUM_LOGITS = 1008  # the 2015 graph's softmax has 1008 outputs (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299
WEIGHTS_ENV = "DRIFTING_INCEPTION_WEIGHTS"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


# ---------------------------------------------------------------- preprocessing


def resize_bilinear(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of float x [N, C, H, W] to [N, C, size, size] via an identity affine_grid + grid_sample.

    This is the resize of the TorchScript Inception used by the StyleGAN/ADM evaluations and by the authors:
    align_corners=False (pixel centres map to pixel centres) and border padding (samples past the edge repeat the
    edge pixel). For upsampling it equals `F.interpolate(mode="bilinear", align_corners=False)`; for downsampling
    neither antialiases.
    """
    n, c = x.shape[:2]
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)  # (N, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """uint8 images [N, 3, H, W] in [0, 255] -> float32 [N, 3, size, size], resized then scaled by (x - 128) / 128.

    The resize runs on the 0..255 values before scaling, as the authors do. Images already at `size` pass through
    unchanged (the identity grid samples exactly the pixel centres).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255], got dtype {images.dtype}; convert samples in [0, 1] with "
            "(x * 255).clamp(0, 255).to(torch.uint8) (truncation, as the authors do)"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape [N, 3, H, W] (NCHW, RGB), got {tuple(images.shape)}; permute NHWC with "
            ".permute(0, 3, 1, 2) and repeat grayscale with .expand(-1, 3, -1, -1)"
        )
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = resize_bilinear(x, size)
    return (x - 128.0) / 128.0


# ---------------------------------------------------------------- blocks


class FrozenBatchNorm2d(nn.Module):
    """Batch norm that always normalises with its running statistics; state-dict names match nn.BatchNorm2d's.

    There is no `num_batches_tracked` (nothing is ever tracked), and `.train()` cannot switch it to batch
    statistics, which would silently make features depend on the batch they are computed in.
    """

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps  # 0.001, the TF graph's epsilon
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU, the unit every Inception layer is made of."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # The 2015 graph averages only over the pixels inside the image at the borders (torchvision counts the padding).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1 -> 64 + 64 + 96 + pool_features channels."""

    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2 -> 384 + 96 + in_ch channels."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1): 4 x 192 = 768 channels."""

    def __init__(self, in_ch: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2 -> 320 + 192 + in_ch."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs: 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels.

    `pool` is "avg" for Mixed_7b and "max" for Mixed_7c: the 2015 graph's last block max-pools its pool branch.
    """

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], dim=1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], dim=1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)


# ---------------------------------------------------------------- the network


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run fp32 convolutions and matmuls in full precision on GPUs (TF32 off), restoring the settings after.

    cuDNN convolutions default to TF32 on Ampere and later, which moves Inception features by ~1e-3 relative
    (measured on an H200: max |CPU - GPU| 1.2e-3 on features up to 1.6); a metric must not depend on a training
    script's speed settings. The cost is small: evaluation is a few seconds of convolutions per 50k images.
    """
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


class InceptionFeatures(nn.Module):
    """FID Inception-v3: uint8 images [N, 3, H, W] -> (pool features [N, 2048], logits [N, 1008]).

    `InceptionFeatures()` has random weights (for tests and plumbing; its features mean nothing);
    `InceptionFeatures.from_file(path)` loads the pytorch-fid weights. The module is frozen and always in
    inference mode; move it with `.to(device)` and feed it images on any device.
    """

    def __init__(self, seed: int | None = 0):
        """Random weights drawn from `seed`; None keeps PyTorch's default init (for weights about to be loaded)."""
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # The IS head is the graph's softmax matmul on the pool features with no bias, as in the original IS code
        # and the authors' port; a `fc.bias` in the weights file is dropped on load.
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS, bias=False)
        if seed is not None:
            self._init_random(seed)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _init_random(self, seed: int) -> None:
        """He-normal convs and an identity batch norm: activations keep their scale through the 94 layers, so
        random-weight features are neither vanishing nor exploding (tests can tell images apart)."""
        gen = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, std=(2.0 / fan_in) ** 0.5, generator=gen)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None = None, map_location="cpu") -> InceptionFeatures:
        """Load the pytorch-fid FID-Inception weights from `path`, or from $DRIFTING_INCEPTION_WEIGHTS if None."""
        path = resolve_weights_path(path)
        state_dict = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
        model = cls(seed=None)
        model.load_pytorch_fid_state_dict(state_dict, source=str(path))
        return model

    def load_pytorch_fid_state_dict(self, state_dict: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load a pytorch-fid FID-Inception state dict (strictly: every weight present, nothing unexplained)."""
        converted = convert_pytorch_fid_state_dict(state_dict)
        own = self.state_dict()
        missing = sorted(set(own) - set(converted))
        unexpected = sorted(set(converted) - set(own))
        wrong_shape = [
            f"{k}: {tuple(converted[k].shape)} vs {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(converted))
            if converted[k].shape != own[k].shape
        ]
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"{source} is not the pytorch-fid FID-Inception (pt_inception-2015-12-05) state dict: "
                f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
                f"{len(wrong_shape)} shape mismatches {wrong_shape[:5]}. torchvision's ImageNet Inception-v3 "
                f"weights are a different network and give incomparable FIDs; get the FID weights from {WEIGHTS_URL}"
            )
        self.load_state_dict(converted, strict=True)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images [N, 3, H, W] -> (pool features [N, 2048], logits [N, 1008]), float32 on the model's device."""
        x = preprocess(images.to(self.fc.weight.device))
        return self.forward_normalized(x)

    def forward_normalized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Preprocessed float x [N, 3, 299, 299] in [-1, 1] -> (pool features [N, 2048], logits [N, 1008])."""
        with ieee_fp32():
            return self._trunk_and_head(x)

    def _trunk_and_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        return pool, self.fc(pool)  # (N, 2048), (N, 1008)

    @torch.no_grad()
    def extract(self, images: Tensor | np.ndarray, batch_size: int = 200) -> tuple[Tensor, Tensor]:
        """Run over a large uint8 array [N, 3, H, W] (CPU tensor or ndarray) in batches.

        Returns (pool features [N, 2048], logits [N, 1008]) as float32 CPU tensors.
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must have shape [N, 3, H, W] with N > 0, got {tuple(images.shape)}")
        pools, logits = [], []
        for i in range(0, len(images), batch_size):
            pool, logit = self(images[i : i + batch_size])
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        return torch.cat(pools), torch.cat(logits)


# ---------------------------------------------------------------- weights


def resolve_weights_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file: `path` if given, else $DRIFTING_INCEPTION_WEIGHTS; FileNotFoundError if absent."""
    how = (
        f"download {WEIGHTS_URL} (the pytorch-fid FID-Inception weights, about 95 MB) on a machine with network "
        f"access, then pass its path or set {WEIGHTS_ENV}=/path/to/pt_inception-2015-12-05-6726825d.pth"
    )
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
        if path is None:
            raise FileNotFoundError(f"No Inception weights file given and {WEIGHTS_ENV} is not set: {how}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}. To obtain it, {how}")
    return path


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map pytorch-fid FID-Inception names onto this module's: identical names, minus what it does not keep.

    - `module.` prefixes (a state dict saved from a DataParallel wrapper) are stripped;
    - `*.bn.num_batches_tracked` (a training counter, meaningless for frozen batch norm) is dropped;
    - `fc.bias` is dropped: the IS logits are the bias-free matmul of the 2015 graph (authors' port, original IS).
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.endswith(".num_batches_tracked") or key == "fc.bias":
            continue
        out[key] = value
    return out
