"""Training-time classifier-free guidance: the guidance scale alpha and the weight of the unconditional negatives.

Pure functions, no state (official-code-notes.md section 3). Each step draws one alpha per class, shared by that
class's C_g generated samples and fed to the generator as an input. The drift loss then gives each of the class's
C_n unconditional negatives (real samples of any class) the weight

    w = (alpha - 1) * (C_g - 1) / max(1, C_n),

which is the paper's A.7, alpha = ((C_g - 1) + C_n * w) / (C_g - 1), solved for w. alpha = 1 means no guidance
(w = 0: the unconditional columns still sit in both softmaxes but pull nothing). There is no null class and no
label dropout: guidance exists only at training time, and sampling picks alpha.

alpha follows the law p(alpha) ~ alpha^-power on [alpha_min, alpha_max], drawn by inverse CDF:

    power == 1:  alpha = a * (b / a)^u                                       (log-uniform)
    otherwise:   alpha = (a^(1-k) + u * (b^(1-k) - a^(1-k)))^(1 / (1-k))     (k = power)

with u ~ U(0, 1); then, with probability `no_guidance_frac`, alpha = 1. The paper's configurations use [1, 4] with
k = 3 (ablation; latent L also sets no_guidance_frac = 0.5) or k = 5 (latent B, pixel B/L).

Paper symbol -> name used here:

    alpha, k          alpha, power          guidance scale and the exponent of its law
    C_g, C_n          num_gen, num_uncond   generated samples and unconditional negatives per class
    w                 guidance_weight       weight of every unconditional negative of a class
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alpha_quantile", "sample_alpha", "guidance_weight"]


def _check_law(power: float, alpha_min: float, alpha_max: float) -> None:
    for name, value in (("power", power), ("alpha_min", alpha_min), ("alpha_max", alpha_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    # alpha < 1 would make w negative: the unconditional negatives would attract instead of repel.
    if alpha_min < 1.0:
        raise ValueError(f"alpha_min must be >= 1 (alpha < 1 gives a negative unconditional weight), got {alpha_min}")
    if alpha_max < alpha_min:
        raise ValueError(f"alpha_max must be >= alpha_min, got alpha_min={alpha_min}, alpha_max={alpha_max}")


def alpha_quantile(u: Tensor, *, power: float, alpha_min: float = 1.0, alpha_max: float = 4.0) -> Tensor:
    """Inverse CDF of p(alpha) ~ alpha^-power on [alpha_min, alpha_max]: u [...] in [0, 1] -> alpha [...].

    Computed as a * exp(log1p(u * expm1(s * L)) / s) with s = 1 - power and L = log(b / a), which is the closed form
    above rewritten so that it stays accurate as power -> 1 and equals the log-uniform a * exp(u * L) at power == 1.
    """
    _check_law(power, alpha_min, alpha_max)
    if not isinstance(u, Tensor) or not u.is_floating_point():
        raise ValueError(f"u must be a floating-point tensor, got {type(u).__name__}")
    s, log_ratio = 1.0 - float(power), math.log(alpha_max / alpha_min)
    u64 = u.double()  # float32 loses ~1e-7 relative here, which would show in the quantile tests
    if s == 0.0:
        alpha = alpha_min * torch.exp(u64 * log_ratio)
    else:
        alpha = alpha_min * torch.exp(torch.log1p(u64 * math.expm1(s * log_ratio)) / s)
    # Rounding can step a hair outside [a, b] at u = 0 or 1.
    return alpha.clamp(alpha_min, alpha_max).to(u.dtype)


def sample_alpha(
    n: int,
    *,
    power: float,
    alpha_min: float = 1.0,
    alpha_max: float = 4.0,
    no_guidance_frac: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw n guidance scales, float32 [n] on the generator's device (CPU without one).

    Two uniform draws of n values each are always made (the inverse-CDF u, then the no-guidance coin), so the random
    stream advances by the same amount whatever `no_guidance_frac` is.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_law(power, alpha_min, alpha_max)
    if isinstance(no_guidance_frac, bool) or not isinstance(no_guidance_frac, (int, float)) or not (
        0.0 <= no_guidance_frac <= 1.0
    ):
        raise ValueError(f"no_guidance_frac must be a probability in [0, 1], got {no_guidance_frac!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    coin = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    alpha = alpha_quantile(u, power=power, alpha_min=alpha_min, alpha_max=alpha_max)
    alpha = torch.where(coin < no_guidance_frac, torch.ones_like(alpha), alpha)
    return alpha.float()


def guidance_weight(alpha: Tensor | float, num_gen: int, num_uncond: int) -> Tensor | float:
    """Weight of the unconditional negatives, w = (alpha - 1)(C_g - 1) / max(1, C_n), same shape as alpha.

    alpha: a float or a floating tensor [...] (one value per class); num_gen = C_g >= 1; num_uncond = C_n >= 0.
    alpha < 1 is rejected for floats and CPU tensors; a tensor on an accelerator is not inspected, since that would
    cost a host sync every step (sample_alpha never returns alpha < 1).
    """
    for name, value, low in (("num_gen", num_gen, 1), ("num_uncond", num_uncond, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    scale = (num_gen - 1) / max(1, num_uncond)
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise ValueError(f"alpha must be a floating-point tensor, got dtype {alpha.dtype}")
        if alpha.device.type == "cpu" and alpha.numel() and bool((alpha < 1).any() | alpha.isnan().any()):
            raise ValueError(f"alpha must be >= 1, got min {alpha.min().item()}")
        return (alpha - 1.0) * scale
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 1.0:  # `not >=` catches NaN
        raise ValueError(f"alpha must be a number >= 1 or a tensor, got {alpha!r}")
    return (float(alpha) - 1.0) * scale
