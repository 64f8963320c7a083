"""Pretrained ImageNet encoders as feature sources for the drifting loss: a ResNet-50 and a ConvNeXt-V2.

Both are plain-torch re-implementations whose parameter names are those of torchvision's `resnet50` and timm's
`convnextv2_*`, so their published state dicts load with strict=True from a local file (nothing is downloaded;
torchvision and timm are not dependencies). Inputs are generator samples: images in [-1, 1], [N, 3, H, W].

    ResNet50Features   torchvision ResNet-50 (v1.5: stride on the 3x3 conv), BatchNorm always in eval mode
      (x + 1) / 2 -> ImageNet mean/std -> [optional resize]                          (N, 3, H, W)
      stem: conv1 7x7/2, bn1, ReLU, maxpool 3x3/2        tap "stem"                   (N,   w, H/4,  W/4 )
      layer1..layer4: 3, 4, 6, 3 bottlenecks             taps "layer1".."layer4"     (N, 4w, H/4 ...) ... (N, 32w, H/32)
      `taps(x)` -> the encoder interface of FeatureDriftLoss (keys from features.tap_sets, as for ResNet-MAE).
      `from_file` also reads MoCo (module.encoder_q.), MoCo-v3 (module.base_encoder.) and SimCLR (encoder., backbone.)
      checkpoints; the fc / projection head is dropped.

    ConvNeXtV2Features   timm ConvNeXt-V2 (base: depths 3,3,27,3, dims 128..1024), the authors' pixel-space encoder
      (x + 1) / 2 -> ImageNet mean/std -> bilinear antialiased resize to 224          (N, 3, 224, 224)
      stem: conv 4x4/4 + LayerNorm2d                                                  (N, 128, 56, 56)
      stage i: [LayerNorm2d + conv 2x2/2 for i > 0], blocks                           56^2, 28^2, 14^2, 7^2
      block: x + pwconv2(GRN(GELU(pwconv1(LN(dwconv7x7(x))))))     (pwconv = mlp.fc1 / mlp.fc2 in timm's names)
      `feature_sets(x)` -> the authors' 13 ConvNeXt keys (official-code-notes.md 6.3), see `ConvNeXtV2Features`.

Where the weights come from (each loads with `from_file`):
    ResNet50Features:   torchvision `ResNet50_Weights.IMAGENET1K_V1/V2` files, MoCo-v2/v3 and SimCLR(-converted)
                        checkpoints (`.pth`, `.pth.tar`, `.safetensors`).
    ConvNeXtV2Features: timm `convnextv2_base.fcmae_ft_in22k_in1k` (timm's copy of FB's
                        `convnextv2_base_22k_224_ema.pt`), that FB file itself, or HF `facebook/convnextv2-base-22k-224`
                        (the authors' source, in transformers' names): the three formats load.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDARDIZE_EPS = 1e-3  # added to the per-location std over channels (outside the square root), as the authors
STD_EPS = 1e-6  # under the square root of the spatial variance, as features.py (models/ does not import it)


# ---------------------------------------------------------------------------------------------------------------------
# Shared: preprocessing and weight files
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def _imagenet_stats(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """ImageNet's mean and std [1, 3, 1, 1] on the device, made once: a copy from host numbers at every call waits for
    the GPU's queue, and is an error inside a CUDA graph capture (`FeatureDriftLoss.stats(cuda_graph=True)`)."""
    return tuple(torch.tensor(v, dtype=dtype, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def imagenet_input(x: Tensor, size: int | None = None) -> Tensor:
    """Generator images x [N, 3, H, W] in [-1, 1] -> ImageNet-normalised [N, 3, size, size] (or H x W if size None).

    (x + 1) / 2 is not clipped (as the authors). The resize is bilinear with antialiasing, which matters only when
    shrinking: JAX's `jax.image.resize`, the authors' call, antialiases by default, torch's only when asked. With
    it, torch agrees with jax.image.resize(..., "bilinear") to 3e-7 for 256 -> 224 and 2e-6 for 64 -> 224 on [0, 1]
    data (checked against jax 0.10.2); without it, 256 -> 224 differs by 0.2.
    The normalisation and the resize commute (the resize weights sum to 1); the order is the authors'.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images [N, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
    mean, std = _imagenet_stats(x.device, x.dtype)
    x = ((x + 1) / 2 - mean) / std
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file: `.safetensors`, or a torch file read with weights_only=True.

    Training checkpoints are unwrapped: a top-level "state_dict" (MoCo, SimCLR, timm training) or "model" (FB
    ConvNeXt) entry is taken, and non-tensor entries (epoch, arch, ...) are dropped.

    Raises:
        FileNotFoundError: no file at `path` (the message names it).
        ValueError: the file holds pickled objects that weights_only=True refuses to run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights: no file at {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # optional: only these files need it
            raise ImportError(f"{path}: reading .safetensors needs the `safetensors` package") from err
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: holds pickled objects that torch.load(weights_only=True) refuses; "
                         f"save its state dict alone (torch.save(ckpt['state_dict'], ...))") from err
    for name in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(name), Mapping):
            obj = obj[name]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def strip_prefix(state: Mapping[str, Tensor], anchor: str, prefixes: Sequence[str]) -> tuple[dict[str, Tensor], str]:
    """The entries under the first prefix p of `prefixes` for which p + anchor is a key, with p removed.

    Entries outside the prefix are dropped: MoCo's momentum encoder (module.encoder_k.) and queue, SimCLR's projector.
    Returns (stripped state, p).
    """
    for p in prefixes:
        if p + anchor in state:
            return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}, p
    raise ValueError(f"no known prefix {list(prefixes)} leads to {anchor!r}; first keys: {list(state)[:5]}")


def _load_strict(model: nn.Module, state: Mapping[str, Tensor], path: Path | str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # torch lists the missing/unexpected/mis-shaped names
        raise ValueError(f"{path}: does not match {type(model).__name__}({model.cfg}): {err}") from err


# ---------------------------------------------------------------------------------------------------------------------
# ResNet-50 (torchvision names)
# ---------------------------------------------------------------------------------------------------------------------

# Checked in order: the first under which `conv1.weight` exists is used.
RESNET_PREFIXES = ("", "module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.",
                   "module.encoder.", "encoder.", "module.backbone.", "backbone.", "module.")


@dataclass(frozen=True)
class ResNet50Config:
    """Sizes of the ResNet. The defaults are torchvision's `resnet50` without its classifier."""

    depths: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottlenecks per stage
    width: int = 64  # stem channels and layer1's bottleneck width; stage outputs are 4w, 8w, 16w, 32w
    num_classes: int = 0  # 0: no `fc` (features only, fc of a file is ignored); 1000: holds torchvision's fc
    image_size: int | None = None  # resize inputs to this side first (bilinear, antialiased); None: as given

    def __post_init__(self):
        if len(self.depths) != 4 or min(self.depths) < 1 or self.width < 1 or self.num_classes < 0:
            raise ValueError(f"ResNet50Config: expected 4 stages of >= 1 blocks, width >= 1, num_classes >= 0; "
                             f"got {self}")


class Bottleneck(nn.Module):
    """ReLU(x' + bn3(conv3(ReLU(bn2(conv2_s(ReLU(bn1(conv1(x))))))))), x' = downsample(x) when the shape changes.

    conv1/conv3 are 1x1, conv2 is 3x3 and carries the stride (torchvision's "v1.5"; the paper's v1 strides conv1).
    """

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None  # None (no parameters) when the shapes match, as torchvision
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet50Features(nn.Module):
    """A torchvision-compatible ResNet-50 exposing `taps` (and `patchify`) for FeatureDriftLoss.

    State dict names are torchvision's (`conv1.weight`, `bn1.running_mean`, `layer1.0.downsample.1.running_var`,
    `layer4.2.conv3.weight`, `fc.weight` when num_classes > 0). BatchNorm always uses its running statistics:
    `train()` leaves every module in eval mode, since a feature encoder must not depend on the batch it sees.
    """

    def __init__(self, cfg: ResNet50Config = ResNet50Config()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = w
        for s, depth in enumerate(cfg.depths):
            width, stride = w * 2**s, 1 if s == 0 else 2
            blocks = [Bottleneck(c_in if i == 0 else 4 * width, width, stride if i == 0 else 1) for i in range(depth)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))  # layer1..layer4, torchvision's names
            c_in = 4 * width
        self.num_features = c_in  # 2048 for resnet50
        if cfg.num_classes:
            self.fc = nn.Linear(c_in, cfg.num_classes)
        self._init_weights()
        self.eval()

    def _init_weights(self) -> None:
        # torchvision's init (kaiming fan_out for convs, BN (1, 0)); only matters for random-weight tests.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def train(self, mode: bool = True) -> ResNet50Features:
        return super().train(False)  # BatchNorm stays on running statistics, whatever the caller asks

    def patchify(self, x: Tensor) -> Tensor:
        """The network input, [-1, 1] images [N, 3, H, W] -> ImageNet-normalised (and resized) [N, 3, H', W'].

        Named for FeatureDriftLoss's `norm_x` key (the per-channel RMS of the encoder input); here 3-dimensional.
        """
        return imagenet_input(x, self.cfg.image_size)

    def taps(self, x: Tensor) -> dict[str, Tensor]:
        """Feature maps of [-1, 1] images x [N, 3, H, W], in network order.

        stem [N, w, H/4, W/4] (after the max-pool: the input of layer1), layer1 [N, 4w, H/4, W/4],
        layer2 [N, 8w, H/8, W/8], layer3 [N, 16w, H/16, W/16], layer4 [N, 32w, H/32, W/32] (w = 64: 256 ... 2048).
        """
        h = self.maxpool(F.relu(self.bn1(self.conv1(self.patchify(x)))))
        out = {"stem": h}
        for s in range(1, 5):
            h = getattr(self, f"layer{s}")(h)
            out[f"layer{s}"] = h
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, num_classes] if the model has `fc`, else the pooled features [N, 32w]."""
        pooled = self.taps(x)["layer4"].mean(dim=(2, 3))
        return self.fc(pooled) if self.cfg.num_classes else pooled

    @classmethod
    def from_file(cls, path: str | os.PathLike, cfg: ResNet50Config = ResNet50Config(), *,
                  prefix: str | None = None) -> ResNet50Features:
        """A ResNet with the weights of a torchvision-format file, checked strictly.

        The key prefix is found among RESNET_PREFIXES (torchvision: none; MoCo-v2: module.encoder_q.; MoCo-v3:
        module.base_encoder.; SimCLR ports: encoder. or backbone.) unless `prefix` is given. Without `cfg.num_classes`,
        the file's fc (a classifier, or MoCo's fc.0/fc.2 MLP) is ignored. Raises FileNotFoundError naming a missing
        path, ValueError when the names or shapes do not match `cfg`.
        """
        state = load_weights_file(path)
        state, _ = strip_prefix(state, "conv1.weight", RESNET_PREFIXES if prefix is None else (prefix,))
        if not cfg.num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model = cls(cfg)
        _load_strict(model, state, path)
        return model


# ---------------------------------------------------------------------------------------------------------------------
# ConvNeXt-V2 (timm names)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvNeXtV2Config:
    """Sizes of the ConvNeXt-V2. The defaults are `convnextv2_base` as the authors use it (224x224, no classifier)."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (128, 256, 512, 1024)
    num_classes: int = 0  # 0: no `head.fc` (a file's head.fc is ignored); 1000: holds the classifier
    image_size: int = 224  # inputs are resized to this side (the authors: 224)
    token_stages: tuple[int, ...] = (1, 2, 3)  # stages whose per-location vectors are keys (stage 0's 56^2 are not)

    def __post_init__(self):
        if len(self.depths) != 4 or len(self.dims) != 4 or min(self.depths) < 1 or min(self.dims) < 1:
            raise ValueError(f"ConvNeXtV2Config: expected 4 stages of >= 1 blocks and widths >= 1, got {self}")
        if self.image_size % 32 or self.num_classes < 0 or not set(self.token_stages) <= {0, 1, 2, 3}:
            raise ValueError(f"ConvNeXtV2Config: image_size must divide by 32, num_classes >= 0, token_stages in "
                             f"0..3; got {self}")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [N, C, H, W] map (timm's LayerNorm2d; eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last x [N, H, W, C]: x + weight * (x * n) + bias, where
    g_c = ||x_c||_2 over (H, W) and n_c = g_c / (mean_c g_c + 1e-6).

    The paper's gamma/beta are named weight/bias, as in timm (its checkpoint filter renames FB's grn.gamma/grn.beta).
    Stored as [C]; timm releases that store [1, 1, 1, C] (and the FB and HF files) load too (`_load_from_state_dict`).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (N, 1, 1, C)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)  # (N, 1, 1, C)
        return x + torch.addcmul(self.bias, self.weight, x * n)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept [1, 1, 1, C] as well as [C]: the layouts differ between timm versions, FB and HF.
        for name in ("weight", "bias"):
            v = state_dict.get(prefix + name)
            if isinstance(v, Tensor) and v.dim() != 1 and v.numel() == self.weight.numel():
                state_dict[prefix + name] = v.reshape(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GRNMlp(nn.Module):
    """fc1 (Linear C -> 4C), GELU (exact), GRN, fc2 (4C -> C) on channels-last vectors (timm: GlobalResponseNormMlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))


class ConvNeXtV2Block(nn.Module):
    """x + mlp(norm(conv_dw(x))): depthwise 7x7, LayerNorm and the GRN MLP; no layer scale (ConvNeXt-V2 has none)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = GRNMlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_dw(x).permute(0, 2, 3, 1)  # (N, H, W, C): the norm and the MLP act on channels-last vectors
        h = self.mlp(self.norm(h)).permute(0, 3, 1, 2)  # (N, C, H, W)
        return x + h


class ConvNeXtV2Stage(nn.Module):
    """downsample (LayerNorm2d + conv 2x2/2, absent in stage 0, whose input the stem already reduced), then blocks."""

    def __init__(self, c_in: int, c_out: int, depth: int, downsample: bool):
        super().__init__()
        # nn.Identity holds no parameters, so stage 0 has no `stages.0.downsample.*` names, as timm.
        self.downsample = (nn.Sequential(LayerNorm2d(c_in), nn.Conv2d(c_in, c_out, 2, 2)) if downsample
                           else nn.Identity())
        self.blocks = nn.Sequential(*[ConvNeXtV2Block(c_out) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtV2Head(nn.Module):
    """timm's head: `norm` (LayerNorm of the spatially pooled last stage) and, with classes, `fc`."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if num_classes:
            self.fc = nn.Linear(dim, num_classes)


class ConvNeXtV2Features(nn.Module):
    """A timm-compatible ConvNeXt-V2 that produces the authors' 13 ConvNeXt feature keys (`feature_sets`).

    State dict names are timm's: `stem.0/1`, `stages.{i}.downsample.{0,1}` (i > 0),
    `stages.{i}.blocks.{j}.{conv_dw, norm, mlp.fc1, mlp.grn, mlp.fc2}`, `head.norm`, `head.fc` (num_classes > 0).

    It runs in the dtype of its weights whatever the caller's autocast (the authors run it in fp32,
    `convnext_bf16: false`), and is meant to be frozen: `train()` is a no-op (no dropout or drop-path anyway).
    """

    def __init__(self, cfg: ConvNeXtV2Config = ConvNeXtV2Config()):
        super().__init__()
        self.cfg = cfg
        d = cfg.dims
        self.stem = nn.Sequential(nn.Conv2d(3, d[0], 4, 4), LayerNorm2d(d[0]))
        self.stages = nn.ModuleList(
            [ConvNeXtV2Stage(d[max(i - 1, 0)], d[i], cfg.depths[i], downsample=i > 0) for i in range(4)])
        self.head = ConvNeXtV2Head(d[-1], cfg.num_classes)
        self.apply(_init_convnext)
        self.eval()

    def train(self, mode: bool = True) -> ConvNeXtV2Features:
        return super().train(False)

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """Raw outputs of the 4 stages for [-1, 1] images x [N, 3, H, W]: [N, dims[i], S/4/2^i, S/4/2^i] (S = 224:
        56^2, 28^2, 14^2, 7^2). Autocast is off inside; the input is cast to the weights' dtype."""
        w = self.stem[0].weight
        with torch.autocast(x.device.type, enabled=False):
            h = self.stem(imagenet_input(x.to(w.dtype), self.cfg.image_size))
            outs = []
            for stage in self.stages:
                h = stage(h)
                outs.append(h)
        return outs

    def pooled(self, last: Tensor) -> Tensor:
        """head.norm of the spatial mean of the last raw stage [N, C, h, w] -> [N, C] (timm's pre-logits)."""
        return self.head.norm(last.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, num_classes] if the model has `head.fc`, else the pooled embedding [N, dims[-1]]."""
        emb = self.pooled(self.stage_outputs(x)[-1])
        return self.head.fc(emb) if self.cfg.num_classes else emb

    def feature_sets(self, x: Tensor) -> dict[str, Tensor]:
        """The authors' ConvNeXt keys of [-1, 1] images x [N, 3, H, W] (official-code-notes.md 6.3): key -> [N, L, C].

        Each stage output y_i [N, C_i, h_i, w_i] is first standardised at every location over its channels,
        z = (y - mean_c y) / (std_c y + 1e-3) (population std). Then, with C = dims (base: 128, 256, 512, 1024):

            convnext_stage_{i}        [N, h_i w_i, C_i]  z at every location, i in token_stages (1..3: 784, 196, 49)
            convnext_stage_{i}_mean   [N, 1, C_i]        spatial mean of z, i = 0..3
            convnext_stage_{i}_std    [N, 1, C_i]        sqrt(spatial population variance of z + 1e-6), i = 0..3
            global_mean               [N, 1, C_3]        head.norm(spatial mean of the raw y_3): the usual embedding
            global_std                [N, 1, C_3]        the same tensor as convnext_stage_3_std (the authors'
                                                         duplicate, so that statistic counts twice in the loss)

        13 keys for the default token_stages. The authors' key names spell the prefix "convenxt_" (a typo); the
        names here are spelled correctly and are otherwise theirs. Statistics are float32 (float64 for float64
        weights). Locations are row-major, as features.location_vectors.
        """
        maps = self.stage_outputs(x)
        stat_dtype = torch.float64 if maps[0].dtype == torch.float64 else torch.float32
        out: dict[str, Tensor] = {}
        for i, y in enumerate(maps):
            y = y.to(stat_dtype)
            std_c, mean_c = torch.std_mean(y, dim=1, keepdim=True, correction=0)  # (N, 1, h, w)
            z = (y - mean_c) / (std_c + STANDARDIZE_EPS)  # (N, C, h, w)
            name = f"convnext_stage_{i}"
            if i in self.cfg.token_stages:
                out[name] = z.flatten(2).transpose(1, 2)  # (N, h w, C)
            out[f"{name}_mean"] = z.mean(dim=(2, 3))[:, None]  # (N, 1, C)
            out[f"{name}_std"] = (z.var(dim=(2, 3), correction=0) + STD_EPS).sqrt()[:, None]  # (N, 1, C)
        last = maps[-1].to(stat_dtype).mean(dim=(2, 3))  # (N, C_3): raw, not standardised
        norm = self.head.norm
        out["global_mean"] = F.layer_norm(last, norm.normalized_shape, norm.weight.to(stat_dtype),
                                          norm.bias.to(stat_dtype), norm.eps)[:, None]  # (N, 1, C_3)
        out["global_std"] = out["convnext_stage_3_std"]
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike, cfg: ConvNeXtV2Config = ConvNeXtV2Config()) -> ConvNeXtV2Features:
        """A ConvNeXt-V2 with the weights of a file in timm, original FB or HF transformers format, checked strictly.

        The format is recognised from the names (`timm_convnext_state_dict`). Without `cfg.num_classes` the file's
        classifier is ignored. The final norm (`head.norm`) is required: `global_mean` needs it, and FCMAE-only
        pre-training files (`*.fcmae`, `*_fcmae.pt`) have none; use the fine-tuned weights. Raises
        FileNotFoundError naming a missing path, ValueError when the names or shapes do not match `cfg`.
        """
        state = timm_convnext_state_dict(load_weights_file(path))
        if not cfg.num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
        if "head.norm.weight" not in state:
            raise ValueError(f"{path}: no final norm (head.norm); FCMAE pre-training weights lack it and "
                             f"global_mean needs it: use fine-tuned weights (e.g. convnextv2_base.fcmae_ft_in22k_in1k)")
        model = cls(cfg)
        _load_strict(model, state, path)
        return model


# Name conversions to timm's (first match wins, applied once per name). Written from timm's FB checkpoint filter
# (timm/models/convnext.py) and HF transformers' ConvNextV2 module names (modeling_convnextv2.py).
_FB_TO_TIMM = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.norm\.", r"stages.\1.blocks.\2.norm."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv(\d)\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^stages\.(\d+)\.(\d+)\.grn\.gamma$", r"stages.\1.blocks.\2.mlp.grn.weight"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.beta$", r"stages.\1.blocks.\2.mlp.grn.bias"),
    (r"^norm\.", "head.norm."),
    (r"^head\.", "head.fc."),
]
_HF_TO_TIMM = [
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv(\d)\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.", r"stages.\1.blocks.\2.mlp.grn."),
    (r"^layernorm\.", "head.norm."),
    (r"^classifier\.", "head.fc."),
]


def timm_convnext_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ConvNeXt-V2 state dict in timm's names, from timm (returned as is, less a `module.` prefix), original FB
    (`downsample_layers.0.0.weight`, ...) or HF transformers (`convnextv2.embeddings.patch_embeddings.weight`, ...)."""
    for p in ("", "module.", "model."):
        if p + "stem.0.weight" in state:
            return strip_prefix(state, "stem.0.weight", (p,))[0]
    if "downsample_layers.0.0.weight" in state:
        rules, state = _FB_TO_TIMM, dict(state)
    elif "convnextv2.embeddings.patch_embeddings.weight" in state or "embeddings.patch_embeddings.weight" in state:
        rules = _HF_TO_TIMM
        state = {k.removeprefix("convnextv2."): v for k, v in state.items()}
    else:
        raise ValueError(f"not a ConvNeXt-V2 state dict in timm, FB or HF format; first keys: {list(state)[:5]}")
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, k)
            if n:
                k = new
                break
        out[k] = v
    return out


def _init_convnext(m: nn.Module) -> None:
    # timm's init (truncated normal, std 0.02; zero biases); GRN starts at zero (identity). For random-weight tests.
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

resnet50 = ResNet50Config()  # torchvision resnet50 without fc (23.5M parameters; 25.6M with num_classes=1000)
resnet50_tiny = ResNet50Config(depths=(1, 1, 1, 1), width=4)  # tests: same names pattern, 4..128 channels
convnextv2_base = ConvNeXtV2Config()  # the authors' encoder (87.7M parameters without head.fc)
convnextv2_tiny_test = ConvNeXtV2Config(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), image_size=64)  # tests only

adapter_configs = {
    "resnet50": resnet50,
    "resnet50_tiny": resnet50_tiny,
    "convnextv2_base": convnextv2_base,
    "convnextv2_tiny_test": convnextv2_tiny_test,
}

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "imagenet_input", "load_weights_file", "strip_prefix", "RESNET_PREFIXES",
    "ResNet50Config", "ResNet50Features", "Bottleneck", "ConvNeXtV2Config", "ConvNeXtV2Features",
    "GlobalResponseNorm", "LayerNorm2d", "timm_convnext_state_dict", "adapter_configs",
]
