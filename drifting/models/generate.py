"""One-step sampling: x = f(eps, class, alpha, style), one forward pass of any generator.

A generator here is any module with the interface of `DiT` and `MLPGenerator`: the attributes `num_classes`,
`noise_shape` (per sample), `style_tokens`, `style_codebook`, and `forward(noise, labels, alpha, style)`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["generate", "draw_inputs"]

_INTERFACE = ("num_classes", "noise_shape", "style_tokens", "style_codebook")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def draw_inputs(model: nn.Module, batch: int, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
    """The random inputs of `batch` samples: noise [batch, *noise_shape] ~ N(0, I) and style indices
    [batch, style_tokens] uniform in [0, style_codebook) (None when the model has no style tokens).

    Drawn in this order (noise, then style) on the generator's device (the default device's RNG when `generator` is
    None), then moved to `device` (default: the model's). A CPU generator therefore gives the same inputs whatever
    device the model runs on (sampling uses one); the generator trainer passes a generator on the model's device
    (a CPU draw of a large batch's noise costs ~0.1 s per step), whose numbers depend on the GPU's kind.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    source = generator.device if generator is not None else device
    noise = torch.randn(batch, *model.noise_shape, generator=generator, device=source)
    style = None
    if model.style_tokens:
        style = torch.randint(0, model.style_codebook, (batch, model.style_tokens), generator=generator,
                              device=source)
    # asynchronous: a blocking copy would also wait for all the work queued on the GPU (a host sync per step)
    return noise.to(device, non_blocking=True), (style.to(device, non_blocking=True) if style is not None else None)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module generator, got {type(model).__name__}")
    missing = [name for name in _INTERFACE if not hasattr(model, name)]
    if missing:
        raise ValueError(f"model: {type(model).__name__} lacks the generator interface attribute(s) {missing} "
                         "(see DiT or MLPGenerator)")


def _check_labels(labels: Tensor | Sequence[int], num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"labels: expected a 1-D tensor or sequence of integers, got {labels!r}") from e
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels: expected shape [B] with B >= 1, got {tuple(labels.shape)}")
    low, high = labels.min().item(), labels.max().item()  # one sync, before any model work
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"labels: expected class indices in [0, {num_classes}), got {bad}")
    return labels


def _check_alpha(alpha: Tensor | float, batch: int) -> Tensor:
    if isinstance(alpha, bool):
        raise ValueError(f"alpha: expected a number >= 1 or a tensor of shape [B], got {alpha!r}")
    if isinstance(alpha, (int, float)):
        if not math.isfinite(alpha) or alpha < 1:
            raise ValueError(f"alpha: expected a finite guidance scale >= 1 (1 = no guidance), got {alpha!r}")
        return torch.full((batch,), float(alpha))
    if not isinstance(alpha, Tensor):
        raise ValueError(f"alpha: expected a number >= 1 or a tensor of shape [B], got {type(alpha).__name__}")
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise ValueError(f"alpha: expected a real tensor, got dtype {alpha.dtype}")
    if alpha.dim() == 0:
        alpha = alpha.expand(batch)
    if tuple(alpha.shape) != (batch,):
        raise ValueError(f"alpha: expected one number or shape [{batch}] (one per label), got {tuple(alpha.shape)}")
    alpha = alpha.float()
    if not torch.isfinite(alpha).all():
        raise ValueError("alpha: expected finite values (no NaN or Inf)")
    if (alpha < 1).any():
        raise ValueError(f"alpha: expected guidance scales >= 1 (1 = no guidance), got min {alpha.min().item()}")
    return alpha


@torch.no_grad()
def generate(model: nn.Module, labels: Tensor | Sequence[int], alpha: Tensor | float = 1.0, *,
             generator: torch.Generator | None = None) -> Tensor:
    """Samples of the given classes in one forward pass: [B] labels -> [B, *model.noise_shape] samples.

    Args:
        model: a generator (`DiT`, `MLPGenerator`). Its train/eval mode is left as is (neither has dropout).
        labels: [B] class indices in [0, model.num_classes).
        alpha: the guidance scale, >= 1 and finite (1 = no guidance): one number, or [B] (one per sample).
        generator: the torch.Generator the noise and style indices are drawn from (`draw_inputs`); a seeded one
            reproduces the samples exactly. None uses the global RNG of the model's device.
    Returns:
        [B, *noise_shape] samples on the model's device (NCHW images for the DiT), in the noise dtype (fp32).

    Raises ValueError, before any model work, for a model without the generator interface, labels that are not
    integers of shape [B] or are out of range, and alpha that is < 1, non-finite or of the wrong shape.
    """
    _check_model(model)
    labels = _check_labels(labels, model.num_classes)
    alpha = _check_alpha(alpha, labels.shape[0])
    device = _model_device(model)
    noise, style = draw_inputs(model, labels.shape[0], generator=generator, device=device)
    return model(noise, labels.to(device), alpha.to(device), style)
