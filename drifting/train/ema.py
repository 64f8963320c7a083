"""Exponential moving averages of the generator's weights.

    ema <- decay * ema + (1 - decay) * model      for every parameter
    ema <- model                                  for every buffer (running statistics, caches, counters)

Usage (the DiT recipe): build the EMA copies once with `ema_copy(model)`, which gives fp32 modules in eval mode
without gradients, and initialise them with `ema_update(emas, model, 0.0)` after the model is wrapped. Then call
`ema_update(emas, model, decay)` after every optimiser step. Several decays (the paper reports four) share one pass:
pass a dict of EMA modules and a float or a dict of decays with the same keys. Each decay costs one fused
`torch._foreach_lerp_` over all parameters, not a Python loop per tensor.

Decay as a half-life: with batch size B, a decay d halves the weight of old parameters after
`B * ln 0.5 / ln d` samples. `decay_from_half_life` goes the other way (EDM's `ema_halflife_nimg`), so changing the
batch size does not silently change the averaging horizon. The authors use a fixed 0.999 from step 0.

Under FSDP2, take the EMA copies from the plain model before wrapping it, then shard each copy like the model
(`wrap_model(ema, strategy="fsdp")`, no mixed precision): parameters pair up shard for shard, the update stays local
to each rank, and `parallel.full_state_dict(ema)` gathers an EMA for export.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

from drifting.train.parallel import unwrap

__all__ = ["ema_update", "ema_copy", "decay_from_half_life", "half_life_from_decay"]


def ema_copy(model: nn.Module) -> nn.Module:
    """A detached fp32 copy of `model` (unwrapped from DDP / torch.compile) in eval mode, for `ema_update`."""
    ema = copy.deepcopy(unwrap(model)).float().eval()
    return ema.requires_grad_(False)


@torch.no_grad()
def ema_update(
    ema: nn.Module | Mapping[object, nn.Module],
    model: nn.Module,
    decay: float | Mapping[object, float],
) -> None:
    """Move the EMA module(s) towards `model` in place: parameters lerp, buffers are copied.

    Args:
        ema: one EMA module, or a dict {key: EMA module} (e.g. keyed by decay or by name).
        model: the trained module; a DDP or torch.compile wrapper is looked through.
        decay: the weight kept from the old EMA, in [0, 1]: 0 copies the model, 1 keeps the EMA parameters
            (buffers are still copied). A dict gives one decay per EMA key; a float applies to all.
    """
    emas = ema if isinstance(ema, Mapping) else {None: ema}
    if isinstance(decay, Mapping):
        if set(decay) != set(emas):
            raise KeyError(f"decay keys {sorted(map(str, decay))} differ from EMA keys {sorted(map(str, emas))}")
        decays = dict(decay)
    else:
        decays = dict.fromkeys(emas, decay)
    for key, d in decays.items():
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {d} (key {key!r})")

    model = unwrap(model)
    names, src = _named(model.named_parameters())
    buf_names, bufs = _named(model.named_buffers())
    cast: dict[tuple, list[torch.Tensor]] = {}  # model parameters in the EMAs' dtypes, shared by every EMA
    for key, e in emas.items():
        e_names, dst = _named(e.named_parameters())
        e_buf_names, e_bufs = _named(e.named_buffers())
        # Pair tensors by name, not just position, so a structural mismatch fails instead of averaging garbage.
        if e_names != names or e_buf_names != buf_names:
            raise ValueError(f"EMA module {key!r} does not have the model's parameter/buffer names")
        d = decays[key]
        if dst:
            # The EMA is usually fp32 while the model may hold another dtype; foreach ops need matching dtypes.
            dtypes = tuple(q.dtype for q in dst)
            if dtypes not in cast:
                cast[dtypes] = [p if p.dtype == t else p.to(t) for p, t in zip(src, dtypes)]
            s = cast[dtypes]
            if d == 0.0:
                torch._foreach_copy_(list(dst), s)  # exact copy (a lerp with weight 1 may round)
            elif d != 1.0:
                torch._foreach_lerp_(list(dst), s, 1.0 - d)
        if e_bufs:
            torch._foreach_copy_(list(e_bufs), list(bufs))


def decay_from_half_life(
    half_life: float,
    batch_size: int,
    *,
    seen: float | None = None,
    ramp_up: float | None = None,
) -> float:
    """Per-step decay that halves the weight of old parameters every `half_life` samples.

    Args:
        half_life: in samples (images, or class problems: whatever `batch_size` counts).
        batch_size: samples per optimiser step, over all ranks.
        seen: samples seen so far; with `ramp_up`, caps the half-life at `seen * ramp_up` so the early EMA
            does not average over the random initialisation (EDM's ramp-up, e.g. 0.05).
        ramp_up: see `seen`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if ramp_up is not None and seen is not None:
        half_life = min(half_life, seen * ramp_up)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch_size / half_life)


def half_life_from_decay(decay: float, batch_size: int) -> float:
    """Samples over which a per-step `decay` halves the weight of old parameters (inverse of the above)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1) for a finite half-life, got {decay}")
    return batch_size * math.log(0.5) / math.log(decay)


def _named(items) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    pairs = tuple(items)
    return tuple(n for n, _ in pairs), tuple(t for _, t in pairs)

