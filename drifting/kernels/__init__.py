"""Fused GPU implementations of the drifting loss and of its feature keys, behind a guarded import.

`drifting.drift.drift_loss(..., impl="auto")` calls the fused Triton kernel for CUDA tensors when Triton is
installed and the problem fits the kernel (C_g, C_p <= 128, C_n <= 64), and the reference implementation otherwise.
`impl="fused"` insists (a ValueError says why it cannot run), `impl="reference"` never uses the kernel. The partial
sums of the statistics over class chunks (`drift.scale_sums`, `drift.field_square_sums`) take the same `impl`: they
are the kernel's passes 1 and 2.

`features.tap_sets(..., fused=True)` computes a tap's mean and std keys (whole map, 2x2 and 4x4 windows) in one
Triton kernel (`tap_stats_triton`) where `use_fused_taps` says it runs; `FeatureDriftLoss` asks for it unless its
impl is "reference", and likewise lays out its keys' vectors as problems in one kernel (`layout_triton`) where
`fused_taps_run_on` says Triton runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
IMPLS = ("auto", "reference", "fused")


def kernel_variant(text: str) -> str:
    """argparse `type=` of the benchmarks' --kernel-variant: applies "name=value,..." to `drift_triton.VARIANT`
    (every item checked first), so a bad item is a usage error naming the option, before any work."""
    if text:
        from drifting.kernels import drift_triton  # needs Triton: only when a variant is asked for

        try:
            drift_triton.set_variant(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_fused(impl: str, gen: Tensor, pos: Tensor, neg: Tensor | None) -> bool:
    """Whether `drift_loss` should take the fused path; for impl="fused", a ValueError when it cannot."""
    if impl == "reference":
        return False
    reason = None
    if not HAS_TRITON:
        reason = "Triton is not installed"
    elif not (gen.is_cuda or _interpreting()):
        reason = f"the inputs are on {gen.device}, not on a CUDA device"
    else:
        from drifting.kernels.drift_triton import supports

        if not supports(gen, pos, neg):
            reason = "the problem is larger than the kernel handles (C_g, C_p <= 128, C_n <= 64)"
    if reason is None:
        return True
    if impl == "fused":
        raise ValueError(f"impl: 'fused' cannot run here: {reason}; use impl='auto' or 'reference'")
    return False


def fused_drift_loss(*args, **kwargs):
    from drifting.kernels.drift_triton import fused_drift_loss as fused

    return fused(*args, **kwargs)


def fused_scale_sums(*args, **kwargs):
    from drifting.kernels.drift_triton import fused_scale_sums as fused

    return fused(*args, **kwargs)


def fused_square_sums(*args, **kwargs):
    from drifting.kernels.drift_triton import fused_square_sums as fused

    return fused(*args, **kwargs)


def fused_taps_run_on(device: torch.device) -> bool:
    """Whether the fused statistics keys run on this device: Triton and CUDA (or Triton's interpreter)."""
    return HAS_TRITON and (device.type == "cuda" or _interpreting())


MAX_TAP_LOCATIONS = 64 * 64  # one program holds a channel's whole map in registers: larger maps stay on the reference


def use_fused_taps(fmap: Tensor) -> bool:
    """Whether a tap's statistics keys can take the fused kernel: where it runs, a map [N, C, h, w] of at most
    64 x 64 locations in float32, bfloat16 or float16 (float64 maps, used to check gradients, stay on the
    reference). The encoders' taps here are 32 x 32 at most."""
    return (fused_taps_run_on(fmap.device) and fmap.dim() == 4 and fmap.numel() > 0
            and fmap.shape[-2] * fmap.shape[-1] <= MAX_TAP_LOCATIONS
            and fmap.dtype in (torch.float32, torch.bfloat16, torch.float16))


def fused_tap_statistics(*args, **kwargs):
    from drifting.kernels.tap_stats_triton import tap_statistics as fused

    return fused(*args, **kwargs)


def fused_problem_layout(*args, **kwargs):
    from drifting.kernels.layout_triton import problem_layout as fused

    return fused(*args, **kwargs)
