"""Encoder feature maps -> the keyed sets of vectors that the drifting loss works on (official-code-notes.md 2.1).

Pure functions of tensors. Every key maps N samples to a set of L vectors of dimension S, [N, L, S]; the loss then
treats each (class, location) pair as one drift problem with S-dimensional particles. The authors' key set:

    global             [N, 1, H W C]      the raw sample flattened in (H, W, C) order: the loss without an encoder
    norm_x             [N, 1, C_in]       per-channel sqrt(mean_{h,w} x^2 + 1e-6) of the patchified encoder input
    for each tap <name> [N, C, h, w]:
      <name>           [N, h w, C]        every location's vector                                   (a)
      <name>_mean      [N, 1, C]          spatial mean                                              (b)
      <name>_std       [N, 1, C]          spatial std, sqrt(population var + 1e-6)                  (b)
      <name>_mean_2    [N, h w / 4, C]    means over non-overlapping 2x2 windows, if 2 divides h, w (c)
      <name>_std_2     [N, h w / 4, C]    stds over the same windows                                (c)
      <name>_mean_4    [N, h w / 16, C]   the same over 4x4 windows, if 4 divides h, w              (d)
      <name>_std_4     [N, h w / 16, C]                                                             (d)

Locations are ordered row-major (h, then w), as the authors' NHWC reshape. Letters (a)-(d) are the paper's feature
groups (A.5); `FeatureConfig.subset` selects the paper's ablations (a,b), (a-c) and (a-d) (the default, the code's).
With the 12 taps of a ResNet-MAE on a 32x32 grid this gives 2 + 12 x 7 = 86 keys.

Statistics (means, stds, norm_x) are computed in float32 (float64 for float64 maps) and returned in that dtype;
per-location vectors keep the dtype of the map (the drift loss upcasts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

import torch
from torch import Tensor

from drifting.kernels import fused_tap_statistics, use_fused_taps

Subset = Literal["a,b", "a-c", "a-d"]
InputStat = Literal["rms", "mean_square"]

STD_EPS = 1e-6  # under the square root of the variance, as the authors' code
NORM_X_EPS = 1e-6  # under the square root of the mean square of the input
PATCH_SIZES: dict[str, tuple[int, ...]] = {"a,b": (), "a-c": (2,), "a-d": (2, 4)}


@dataclass(frozen=True)
class FeatureConfig:
    """Which vector sets the loss uses. The defaults are the authors' 86-key set."""

    subset: Subset = "a-d"  # per-tap groups: (a,b) locations + mean/std, (a-c) + 2x2 windows, (a-d) + 4x4 windows
    input_stat: InputStat = "rms"  # norm_x as the code's RMS, or the paper's mean of squares (A.5)
    use_global: bool = True  # the `global` key (the raw sample, "vanilla drifting loss without phi")
    use_norm_x: bool = True  # the `norm_x` key (needs the encoder's `patchify`)

    def __post_init__(self):
        if self.subset not in PATCH_SIZES:
            raise ValueError(f"subset: expected one of {list(PATCH_SIZES)}, got {self.subset!r}")
        if self.input_stat not in ("rms", "mean_square"):
            raise ValueError(f"input_stat: expected 'rms' or 'mean_square', got {self.input_stat!r}")


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def flatten_sample(x: Tensor) -> Tensor:
    """The `global` key: x [N, C, H, W] -> [N, 1, H W C], flattened in (H, W, C) order as the authors' NHWC arrays."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], 1, -1)


def channel_norm(x_in: Tensor, stat: InputStat = "rms") -> Tensor:
    """The `norm_x` key: x_in [N, C_in, h, w] -> [N, 1, C_in].

    "rms": sqrt(mean_{h,w} x^2 + 1e-6) (the code); "mean_square": mean_{h,w} x^2 (the paper's wording).
    """
    ms = x_in.to(_stat_dtype(x_in)).square().mean(dim=(2, 3))[:, None, :]  # (N, 1, C_in)
    return (ms + NORM_X_EPS).sqrt() if stat == "rms" else ms


def location_vectors(fmap: Tensor) -> Tensor:
    """The `<name>` key: fmap [N, C, h, w] -> [N, h w, C] (a view; row-major locations)."""
    return fmap.flatten(2).transpose(1, 2)


def _cells(fmap: Tensor, window: int | None) -> tuple[Tensor, tuple[int, ...]]:
    """fmap [N, C, h, w] in the statistics dtype, viewed as windows, and the dims to reduce over."""
    f = fmap.to(_stat_dtype(fmap))
    if window is None:
        return f, (2, 3)
    n, c, h, w = f.shape
    if h % window or w % window:
        raise ValueError(f"window {window} does not divide the map size {h}x{w}")
    return f.reshape(n, c, h // window, window, w // window, window), (3, 5)  # (N, C, h', s, w', s)


def _as_sets(stat: Tensor) -> Tensor:
    """[N, C] (whole map) -> [N, 1, C]; [N, C, h', w'] (windows) -> [N, h' w', C]."""
    return stat[:, None, :] if stat.dim() == 2 else location_vectors(stat)


def spatial_mean(fmap: Tensor, window: int | None = None) -> Tensor:
    """Mean of fmap [N, C, h, w] over the whole map ([N, 1, C]) or over non-overlapping window x window cells
    ([N, (h/window) (w/window), C]), in float32 (float64 for float64 maps)."""
    f, dims = _cells(fmap, window)
    return _as_sets(f.mean(dim=dims))


def spatial_std(fmap: Tensor, window: int | None = None) -> Tensor:
    """sqrt(population variance + 1e-6) over the same regions as `spatial_mean`, same shapes and dtype."""
    f, dims = _cells(fmap, window)
    return _as_sets((f.var(dim=dims, correction=0) + STD_EPS).sqrt())


def tap_sets(name: str, fmap: Tensor, subset: Subset = "a-d", fused: bool = False) -> Iterator[tuple[str, Tensor]]:
    """The keys of one tapped map [N, C, h, w], lazily: each is computed when the iterator reaches it.

    The statistics keys share one cast of the map to their dtype (a bf16 map is cast once, not six times; the
    cast's autograd node holds no tensors). Otherwise every key has its own autograd graph from fmap, so a consumer
    may differentiate and free one key before computing the next.

    fused: where the fused kernel runs (`kernels.use_fused_taps`: CUDA, a float32/bf16/fp16 map), the statistics
    keys come from one kernel that reads the map once (`kernels/tap_stats_triton.py`), the same keys to float
    rounding. They then share one autograd node, which a backward frees: differentiate them together (one
    `torch.autograd.grad` over all of them), or not at all.
    """
    yield name, location_vectors(fmap)
    h, w = fmap.shape[-2:]
    windows = tuple(s for s in PATCH_SIZES[subset] if h % s == 0 and w % s == 0)
    if fused and use_fused_taps(fmap):
        names = [f"{name}_mean", f"{name}_std"] + [f"{name}_{stat}_{s}" for s in windows for stat in ("mean", "std")]
        yield from zip(names, fused_tap_statistics(fmap, windows, STD_EPS))
        return
    f = fmap.to(_stat_dtype(fmap))  # kept while this tap's keys are computed: one map in the statistics dtype
    yield f"{name}_mean", spatial_mean(f)
    yield f"{name}_std", spatial_std(f)
    for s in windows:
        yield f"{name}_mean_{s}", spatial_mean(f, s)
        yield f"{name}_std_{s}", spatial_std(f, s)


def input_sets(x: Tensor, x_in: Tensor | None, cfg: FeatureConfig = FeatureConfig()) -> Iterator[tuple[str, Tensor]]:
    """The keys that do not come from the taps: `global` from the sample x, `norm_x` from the encoder input x_in."""
    if cfg.use_global:
        yield "global", flatten_sample(x)
    if cfg.use_norm_x:
        if x_in is None:
            raise ValueError("norm_x needs the encoder input x_in (or FeatureConfig(use_norm_x=False))")
        yield "norm_x", channel_norm(x_in, cfg.input_stat)


def feature_sets(
    x: Tensor, x_in: Tensor | None, taps: Mapping[str, Tensor], cfg: FeatureConfig = FeatureConfig()
) -> dict[str, Tensor]:
    """All keys at once: x [N, C, H, W] the sample, x_in [N, C_in, h, w] the encoder input, taps name -> [N, C, h, w].

    Returns key -> [N, L, S], in the order global, norm_x, then per tap (in the taps' order) the keys of `tap_sets`.
    Holding every key at once costs ~1.6x the taps; `FeatureDriftLoss` goes through `input_sets` and `tap_sets`
    one key at a time instead.
    """
    out = dict(input_sets(x, x_in, cfg))
    for name, fmap in taps.items():
        out.update(tap_sets(name, fmap, cfg.subset))
    return out
