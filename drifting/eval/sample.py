"""Samples to disk: `drifting sample`. EMA weights -> one-step samples -> `.npz` (uint8 NCHW + labels) and a PNG grid.

    model = load_generator("runs/train/mnist/ema.pt", device="cuda")
    sample_to_npz(model, "runs/train/mnist/samples.npz", num_per_class=1000, alpha=1.5)

The `.npz` holds `images` uint8 [N, C, H, W], `labels` int64 [N] (the requested class of each sample), and the
scalars `alpha`, `seed`, `num_classes`. Labels are balanced and interleaved: sample i has class classes[i % K], so
any prefix of the file is balanced too.

Reproducibility: sample i is a function of (seed, i, its label, alpha) only. Noise and style indices are drawn in
fixed blocks of `RNG_BLOCK` samples, block b from a CPU generator seeded by (seed, b), so neither the forward batch
size, the device nor the number of processes changes the inputs (outputs agree up to the device's rounding).

DDP: under torchrun each rank generates a contiguous slice of the indices; the slices are all-gathered (uint8, on the
process group's device) and rank 0 writes the files. Without torchrun's variables it is one process.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from drifting.data.datasets import to_uint8
from drifting.models.generate import draw_inputs
from drifting.train import dist

__all__ = ["RNG_BLOCK", "load_generator", "sample_to_npz", "save_image_grid", "save_png", "sample_main"]

RNG_BLOCK = 64  # samples per noise block: the unit of reproducibility (see the module docstring)


def load_generator(ema_file: str | os.PathLike, device: str | torch.device = "cpu", *, kind: str = "drifting"
                   ) -> nn.Module:
    """Rebuild the generator from the config stored in an exported `ema.pt` and load its weights (eval, frozen).

    kind: what the export must hold (its meta.kind, "drifting" when absent): "drifting" for one-step generators,
    "flow" for the flow-matching baseline's network (`drifting.train.flow.load_velocity_net` asks for it).
    """
    # gen.py is imported here, not at the top: it pulls in the whole trainer, which sampling from a model needs not.
    from drifting.train.gen import GenConfig, ModelConfig, build_model

    ema_file = Path(ema_file)
    if not ema_file.is_file():
        raise FileNotFoundError(f"generator weights not found: {ema_file} (`drifting train` writes <run>/ema.pt)")
    state = torch.load(ema_file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"model", "config", "meta"} <= set(state):
        raise ValueError(f"{ema_file} is not an exported generator (expected keys model, config, meta; got "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__})")
    meta, tree = state["meta"], state["config"]
    if meta.get("kind", "drifting") != kind:  # e.g. the flow-matching baseline's velocity network
        raise ValueError(f"{ema_file} holds a {meta.get('kind', 'drifting')!r} model, expected {kind!r}"
                         + (" (sample flow models with drifting sample-flow)" if kind == "drifting" else ""))
    if "num_classes" not in meta or "shape" not in meta or "model" not in tree:
        raise ValueError(f"{ema_file}: the export lacks meta.num_classes, meta.shape or config.model")
    try:
        cfg = GenConfig(model=ModelConfig(**tree["model"]))  # build_model reads only the model section
    except TypeError as e:
        raise ValueError(f"{ema_file}: config.model does not match this version's ModelConfig: {e}") from None
    model = build_model(cfg, int(meta["num_classes"]), tuple(meta["shape"]))
    model.load_state_dict(state["model"], strict=True)
    return model.to(device).eval().requires_grad_(False)


def _draw(model: nn.Module, start: int, stop: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Noise and style of samples [start, stop): the blocks that cover them, each from its own seeded generator."""
    noise, style = [], []
    for b in range(start // RNG_BLOCK, math.ceil(stop / RNG_BLOCK)):
        # The CPU generator keeps only the low 32 bits of a seed: mix seed and block within them.
        g = torch.Generator().manual_seed((seed * 1_000_003 + b) % 2**32)
        n, s = draw_inputs(model, RNG_BLOCK, generator=g, device="cpu")
        noise.append(n)
        style.append(s)
    lo = start - (start // RNG_BLOCK) * RNG_BLOCK
    noise = torch.cat(noise)[lo : lo + stop - start].to(device)
    style = None if style[0] is None else torch.cat(style)[lo : lo + stop - start].to(device)
    return noise, style


def _gather(local: Tensor, total: int) -> Tensor:
    """Concatenate each rank's slice (rank order) into [total, ...] on every rank; slices differ by at most one row."""
    world = dist.world_size()
    if world == 1:
        return local
    size = math.ceil(total / world)
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(size, *local.shape[1:], dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded)
    counts = [total * (r + 1) // world - total * r // world for r in range(world)]
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


@torch.no_grad()
def sample_to_npz(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    num_per_class: int,
    alpha: float = 1.0,
    seed: int = 0,
    batch: int = 256,
    device: str | torch.device | None = None,
    classes: Sequence[int] | None = None,
    grid: bool = True,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Path:
    """Generate num_per_class samples of each class and write them to `out` (.npz) and a grid `out.with_suffix(".png")`.

    Args:
        model: a generator with the interface of `drifting.models.generate` (e.g. from `load_generator`).
        out: the .npz to write (rank 0 writes; parent folders are created).
        num_per_class: samples per class; N = num_per_class * len(classes).
        alpha: the guidance scale, >= 1 (1 = no guidance).
        seed: with the sample index, determines each sample's noise (see the module docstring).
        batch: samples per forward pass (memory only; the samples do not depend on it).
        device: where the model runs (None: where its parameters are).
        classes: the classes to sample (default all, 0 .. K-1); each gets num_per_class samples.
        grid: also write the PNG grid (one row per class, at most 10 rows and 10 columns).
        decode: for latent generators, float latents [b, C, h, w] -> uint8 pixels [b, 3, H, W] (a
            `drifting.data.latents.LatentDecoder`); the file then holds the decoded images.
    Returns the path of the .npz (on every rank).
    """
    num_classes = int(model.num_classes)
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if not classes or any(not 0 <= c < num_classes for c in classes):
        raise ValueError(f"classes: expected a non-empty list of class indices in [0, {num_classes}), got {classes}")
    if isinstance(num_per_class, bool) or not isinstance(num_per_class, int) or num_per_class < 1:
        raise ValueError(f"num_per_class: expected an integer >= 1, got {num_per_class!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an integer >= 1, got {batch!r}")
    if not (math.isfinite(alpha) and alpha >= 1):
        raise ValueError(f"alpha: expected a finite guidance scale >= 1 (1 = no guidance), got {alpha!r}")
    if device is not None:
        model = model.to(device)
    device = next(model.parameters()).device
    model.eval()
    out = Path(out)

    total = num_per_class * len(classes)
    labels = torch.tensor(classes)[torch.arange(total) % len(classes)]  # (N,) interleaved: balanced prefixes
    rank, world = dist.rank(), dist.world_size()
    lo, hi = total * rank // world, total * (rank + 1) // world  # this rank's slice
    def images_of(start: int, stop: int) -> Tensor:  # uint8 [stop - start, C, H, W]
        noise, style = _draw(model, start, stop, seed, device)
        y = labels[start:stop].to(device)
        x = model(noise, y, torch.full((stop - start,), float(alpha), device=device), style).float()  # (b, C, H, W)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"the generator produced NaN or inf for samples {start}..{stop - 1}")
        return decode(x).cpu() if decode is not None else to_uint8(x).cpu()  # rounds, clips to [-1, 1]

    parts = [images_of(start, min(start + batch, hi)) for start in range(lo, hi, batch)]
    # A rank without samples (more ranks than samples) still takes part in the gather, with the right row shape.
    local = torch.cat(parts) if parts else images_of(0, 1)[:0]
    images = _gather(local, total)

    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Temp file beside `out`, then rename: a crash never leaves a truncated .npz to be evaluated.
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images.numpy(), labels=labels.numpy(), alpha=np.float64(alpha), seed=np.int64(seed),
                 num_classes=np.int64(num_classes))
        os.replace(tmp, out)
        if grid:
            save_image_grid(images, labels, out.with_suffix(".png"))
    dist.barrier()
    return out


def save_image_grid(images: Tensor, labels: Tensor, path: str | os.PathLike, *, per_class: int = 10,
                    max_classes: int = 10) -> Path:
    """One row per class (the first max_classes classes present), its first per_class images; PNG, upscaled."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    _, c, h, w = images.shape
    classes, counts = torch.unique(labels, return_counts=True)
    per_class = min(per_class, int(counts.max()))
    rows = []
    for cls in classes[:max_classes].tolist():
        row = images[labels == cls][:per_class]
        row = torch.cat([row, torch.zeros(per_class - len(row), c, h, w, dtype=torch.uint8)])  # black fill
        rows.append(row)
    grid = torch.stack(rows)  # (R, P, C, H, W)
    r = grid.shape[0]
    grid = grid.permute(0, 3, 1, 4, 2).reshape(r * h, per_class * w, c)  # (R*H, P*W, C)
    return save_png(grid, path, scale=max(1, 64 // h))


def save_png(pixels: Tensor, path: str | os.PathLike, scale: int = 1) -> Path:
    """uint8 [H, W, C] (C = 1 or 3) -> PNG, each pixel repeated scale x scale times."""
    from PIL import Image

    arr = pixels.numpy()
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
    return path


def sample_main(
    ema: str,
    out: str | None = None,
    *,
    num_per_class: int = 1000,
    alpha: float = 1.0,
    seed: int = 0,
    batch: int = 256,
    device: str | None = None,
    vae: str | None = None,
    vae_scaling: float = 0.18215,
) -> Path:
    """`drifting sample`: samples of an exported generator (`ema.pt`) to `out` (default <ema dir>/samples_a<alpha>.npz).

    Single process, or N processes under torchrun (each on its own GPU; rank 0 writes). `vae`: for a latent
    generator, the AutoencoderKL folder that decodes its samples (scaled by `vae_scaling`, as the cache) to pixels.
    """
    dev = dist.init_distributed()
    try:
        model = load_generator(ema, device=device or dev)
        decode = None
        if vae is not None:
            from drifting.data.latents import LatentDecoder

            decode = LatentDecoder(vae, scaling=vae_scaling, device=next(model.parameters()).device)
        out = out or str(Path(ema).parent / f"samples_a{alpha:g}.npz")
        path = sample_to_npz(model, out, num_per_class=num_per_class, alpha=alpha, seed=seed, batch=batch,
                             decode=decode)
        dist.print0(f"wrote {path} ({num_per_class * model.num_classes} samples, alpha {alpha:g}) and "
                    f"{path.with_suffix('.png')}")
        return path
    finally:
        dist.cleanup()
