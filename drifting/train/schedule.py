"""Learning-rate schedules as pure functions of the step.

The authors' code warms up linearly from 1e-6 to the peak over `warmup_steps`, then holds the peak ("const"; the
`total_steps` of their schedule config is unused). A cosine decay after the warmup is offered as an option.

`step` counts the optimiser updates already taken: the update at `step` uses `lr_at(step, ...)`, so the first update
uses `start` and the update at `step == warmup_steps` is the first at the peak. The trainer sets the rate itself:

    for group in opt.param_groups:
        group["lr"] = lr_at(step, peak=cfg.lr, warmup_steps=cfg.warmup_steps)
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "KINDS"]

KINDS = ("const", "cosine")


def lr_at(
    step: int,
    *,
    peak: float,
    warmup_steps: int,
    start: float = 1e-6,
    kind: str = "const",
    total_steps: int | None = None,
    final: float = 0.0,
) -> float:
    """The learning rate for the update at `step` (0-based).

    Args:
        step: updates already taken, >= 0.
        peak: the rate reached at the end of the warmup.
        warmup_steps: length of the linear ramp from `start` to `peak`; 0 starts at the peak.
        start: the rate at step 0 (the authors' 1e-6).
        kind: "const" holds the peak after the warmup; "cosine" decays it to `final` at `total_steps`
            (and stays at `final` after).
        total_steps: the end of the cosine decay; needed for "cosine" only.
        final: the rate at `total_steps` for "cosine".
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}")
    if kind == "cosine" and (total_steps is None or total_steps < warmup_steps):
        raise ValueError(f"kind='cosine' needs total_steps >= warmup_steps ({warmup_steps}), got {total_steps}")

    if step < warmup_steps:
        # Same ramp as optax.linear_schedule(start, peak, warmup_steps): exactly `start` at 0, `peak` at warmup_steps.
        return start + (peak - start) * step / warmup_steps
    if kind == "const":
        return peak
    decay_steps = total_steps - warmup_steps
    t = 1.0 if decay_steps == 0 else min((step - warmup_steps) / decay_steps, 1.0)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))
