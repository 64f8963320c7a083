"""The latent cache: every training image encoded once by the SD-VAE, so latent-space training never runs the VAE.

As the authors' cache (official-code-notes.md 7.3): each image is ADM-center-cropped to `size` (256), and the cache
keeps one VAE posterior sample x `scaling` (0.18215) of the image and one of its horizontal flip; training picks one
of the two at random per draw, which is the 50% flip augmentation of the latent configs.

    build_latent_cache(images, vae_path, out)   encode once (resumable by shard)
    LatentDataset(out) / load_latents(out)      draw samples: ds.sample(index, generator) -> float32 [k, 4, h, w]
    LatentDecoder(vae_path)(z)                  generated latents -> uint8 pixels (sample grids, FID on pixels)

Layout of a cache (a folder; N images, shards of `shard_size` images, latent shape (C, h, w) = (4, size/8, size/8)
for the SD-VAE):

    meta.json          format, num_images, shard_size, num_shards, latent_shape [2, C, h, w], dtype "float16", size,
                       scaling, seed, vae_path, vae_dtype, classes (the folder's class names, or null), source
    labels.npy         int64 [N]
    latents_00000.npy  float16 [n, 2, C, h, w]: images [0, shard_size); [:, 0] the image, [:, 1] its flip
    latents_00001.npy  ...

Plain .npy shards so the loader memory-maps them: the ImageNet cache is 21 GB and each DDP rank maps the same pages
instead of holding its own copy. float16 rather than bfloat16: numpy stores it natively, and its 11-bit significand
keeps 8x finer steps than bfloat16's 8 bits (relative error <= 2^-11) while the range (65504) is far beyond the
scaled latents (|z| < ~10). Every file is written atomically (temp file + rename), so a killed build leaves whole
shards only, and running it again with the same arguments encodes just the missing ones.

The posterior noise of image i is `np.random.default_rng([seed, i]).standard_normal((2, C, h, w))`: the cache is a
function of (images, VAE, seed) alone, whatever the batch size, shard size, number of workers or resume points.

The VAE comes from a local folder only (`diffusers.AutoencoderKL.from_pretrained(path, local_files_only=True)`, e.g.
a download of stabilityai/sd-vae-ft-ema, or a Stable Diffusion folder with a vae/ subfolder): nothing is downloaded.
diffusers is needed only to build a cache, not to read one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from drifting.atomic import atomic_write
from drifting.data.datasets import image_folder_files, to_float, to_uint8

__all__ = ["center_crop_arr", "build_latent_cache", "load_vae", "LatentDataset", "LatentDecoder", "load_latents"]

FORMAT = "drifting-latent-cache-v1"
_STORE = np.float16


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image, size: int) -> np.ndarray:
    """ADM's center crop: PIL image -> uint8 array [size, size, C] ([size, size] for a one-band image).

    Halve the image with a 2x2 box filter while its short side is at least 2 * size (cheap and alias-free), resize
    bicubically so the short side is exactly `size`, then cut the central size x size square.
    """
    from PIL import Image

    while min(pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = size / min(pil_image.size)
    # Python's round (half to even), as ADM: the other side can differ by a pixel from a floor/half-up rounding
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # a writable copy
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class _CroppedImages(torch.utils.data.Dataset):
    """Image i -> (its center crop uint8 [3, size, size], its posterior noise float32 [2, C, h, w]).

    Runs in the loader's worker processes, so decoding, cropping and drawing noise overlap the VAE.
    items: image file paths, or a uint8 tensor [N, C, H, W] (C = 1 or 3).
    """

    def __init__(self, items: Sequence[str] | Tensor, size: int, noise_shape: tuple[int, ...], seed: int):
        self.items, self.size, self.noise_shape, self.seed = items, size, noise_shape, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        item = self.items[i]
        if isinstance(item, Tensor):
            hwc = item.permute(1, 2, 0).numpy()
            image = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).convert("RGB")
        else:
            try:
                with Image.open(item) as f:
                    image = f.convert("RGB")
            except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, ...)
                raise ValueError(f"{item}: cannot decode: {e}") from None
        pixels = center_crop_arr(image, self.size).transpose(2, 0, 1)  # (3, size, size)
        noise = np.random.default_rng([self.seed, i]).standard_normal(self.noise_shape, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(noise)


def _source(images_source) -> tuple[Sequence[str] | Tensor, np.ndarray, list[str] | None, str]:
    """An image folder path, or (uint8 images [N, C, H, W], labels [N]) -> (items, labels, classes, description)."""
    if isinstance(images_source, (str, os.PathLike)):
        root = Path(images_source)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        files, labels, classes = image_folder_files(root)
        return files, np.asarray(labels, dtype=np.int64), classes, str(root.resolve())
    if not (isinstance(images_source, (tuple, list)) and len(images_source) == 2):
        raise ValueError("images_source must be an image folder path or a pair (uint8 images [N, C, H, W], labels [N])")
    images, labels = images_source
    if not (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and images.shape[1] in (1, 3)):
        raise ValueError(f"images must be a uint8 tensor [N, C, H, W] with C = 1 or 3, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),) or labels.is_floating_point() or (len(labels) and labels.min() < 0):
        raise ValueError(f"labels must be {len(images)} non-negative integers, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return images.cpu(), labels.cpu().numpy().astype(np.int64), None, f"tensor {tuple(images.shape)}"


# ---------------------------------------------------------------------------------------------------------------------
# Building the cache
# ---------------------------------------------------------------------------------------------------------------------


def load_vae(vae_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers.AutoencoderKL from a local folder (config.json + weights, or a pipeline folder with vae/), frozen."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("building a latent cache needs diffusers: pip install diffusers "
                          "(or pip install 'drifting[latents]')") from None
    path = Path(vae_path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole Stable Diffusion folder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no AutoencoderKL at {vae_path}: expected a local folder with config.json and its "
                                f"weights (as AutoencoderKL.save_pretrained writes them); nothing is downloaded")
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def _encode_pairs(vae, pixels: Tensor, noise: Tensor, scaling: float) -> Tensor:
    """uint8 crops [B, 3, S, S] and noise [B, 2, C, h, w] -> posterior samples x scaling, float32 [B, 2, C, h, w]."""
    param = next(vae.parameters())
    x = to_float(pixels.to(param.device)).to(param.dtype)  # the VAE takes [-1, 1]
    x = torch.cat([x, x.flip(-1)])  # (2B, 3, S, S): the images, then their horizontal flips
    posterior = vae.encode(x).latent_dist
    # Sample in float32 from diffusers' (clamped) log-variance, whatever precision the VAE ran in.
    mean, std = posterior.mean.float(), torch.exp(0.5 * posterior.logvar.float())
    mean, std = (t.unflatten(0, (2, len(pixels))).transpose(0, 1) for t in (mean, std))  # (B, 2, C, h, w)
    if mean.shape[1:] != noise.shape[1:]:
        raise ValueError(f"the VAE gives latents {tuple(mean.shape[2:])}, expected {tuple(noise.shape[2:])}")
    return (mean + std * noise.to(mean.device)) * scaling


def _shard_path(out: Path, s: int) -> Path:
    return out / f"latents_{s:05d}.npy"


def _shard_done(path: Path, shape: tuple[int, ...]) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == _STORE


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def _start_or_resume(out: Path, meta: dict, labels: np.ndarray) -> None:
    """Write meta.json and labels.npy into a new cache folder, or check that an existing one was built alike."""
    meta_path = out / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diff = [k for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(f"{out} holds a latent cache built with other settings ({k}: {old.get(k)!r} there, "
                             f"{meta.get(k)!r} now); remove it or choose another out_path")
        if not np.array_equal(np.load(out / "labels.npy"), labels):
            raise ValueError(f"{out} holds a latent cache of other images (its labels differ); remove it or choose "
                             f"another out_path")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists, is not empty and holds no meta.json: not a latent cache; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / "labels.npy", labels)
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))


def build_latent_cache(
    images_source,
    vae_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    size: int = 256,
    batch: int = 64,
    device: str | torch.device | None = None,
    scaling: float = 0.18215,
    seed: int = 0,
    shard_size: int = 10_000,
    dtype: torch.dtype = torch.float32,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Encode every image and its flip once; returns the cache folder `out_path` (layout: module docstring).

    images_source: an image folder root/<class>/**/<image> (any sizes; classes = sorted subfolders), or a pair
        (uint8 images [N, C, H, W], labels [N]).
    vae_path: local folder of a diffusers AutoencoderKL. device: default CUDA when available. dtype: the precision the
        VAE runs in (float32 is the reference; bfloat16 is faster on a GPU; the sampling itself is always float32).
    num_workers: decoding processes; None picks up to 8 for a folder, 0 (this process) for a tensor.
    Running it again with the same arguments completes a cache whose build was interrupted; other arguments raise.
    """
    if size < 8 or batch < 1 or shard_size < 1:
        raise ValueError(f"expected size >= 8, batch >= 1, shard_size >= 1; got {size}, {batch}, {shard_size}")
    out = Path(out_path)
    items, labels, classes, description = _source(images_source)
    if len(labels) == 0:
        raise ValueError(f"images_source holds no images: {description}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(vae_path, device, dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # each encoder block but the last halves the resolution
    if size % factor:
        raise ValueError(f"size {size} does not divide by the VAE's downsampling factor {factor}")
    latent_shape = (2, vae.config.latent_channels, size // factor, size // factor)
    n = len(labels)
    meta = {
        "format": FORMAT, "num_images": n, "shard_size": shard_size, "num_shards": math.ceil(n / shard_size),
        "latent_shape": list(latent_shape), "dtype": "float16", "size": size, "scaling": scaling, "seed": seed,
        "vae_path": str(Path(vae_path).resolve()), "vae_dtype": str(dtype).removeprefix("torch."), "classes": classes,
        "source": description,
    }
    _start_or_resume(out, meta, labels)

    def bounds(s: int) -> tuple[int, int]:
        return s * shard_size, min((s + 1) * shard_size, n)

    todo = [s for s in range(meta["num_shards"])
            if not _shard_done(_shard_path(out, s), (bounds(s)[1] - bounds(s)[0], *latent_shape))]
    # Batches never straddle two shards, so each shard is written as soon as its last batch is encoded.
    batches = [list(range(b, min(b + batch, bounds(s)[1])))
               for s in todo for b in range(bounds(s)[0], bounds(s)[1], batch)]
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if isinstance(items, list) else 0
    loader = torch.utils.data.DataLoader(
        _CroppedImages(items, size, latent_shape, seed), batch_sampler=batches, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    buffer = None
    for index, (pixels, noise) in tqdm(zip(batches, loader), total=len(batches), desc="latents", disable=not progress):
        s = index[0] // shard_size
        start, stop = bounds(s)
        if buffer is None:
            buffer = np.empty((stop - start, *latent_shape), dtype=_STORE)
        z = _encode_pairs(vae, pixels, noise, scaling)
        if not (torch.isfinite(z).all() and z.abs().max() < 65504):
            hint = f"; did the VAE overflow in {dtype}? try dtype=torch.float32" if dtype != torch.float32 else ""
            raise ValueError(f"images {index[0]}..{index[-1]}: non-finite or float16-overflowing latents{hint}")
        buffer[index[0] - start : index[-1] + 1 - start] = z.cpu().numpy()
        if index[-1] + 1 == stop:
            _save_npy(_shard_path(out, s), buffer)
            buffer = None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reading the cache
# ---------------------------------------------------------------------------------------------------------------------


def _device_of(generator: torch.Generator | None) -> torch.device:
    # torch draws with a generator on the generator's device; the cache's bookkeeping stays on the CPU
    return generator.device if generator is not None else torch.device("cpu")


class LatentDataset:
    """A built latent cache: N labelled latent pairs (image, flipped image), memory-mapped.

    ds.sample(index, generator) -> float32 [k, C, h, w]   one of the two versions of each index, picked at random
    ds.pairs(index)             -> float32 [k, 2, C, h, w] both versions
    ds.labels int64 [N], ds.shape (C, h, w), ds.num_classes, ds.meta (meta.json), len(ds) = N.
    mmap=False reads the whole cache into memory instead.
    """

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"latent cache not found: {meta_path} (build it with build_latent_cache)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        n, shard_size, num_shards = self.meta["num_images"], self.meta["shard_size"], self.meta["num_shards"]
        missing = [s for s in range(num_shards) if not _shard_path(self.path, s).is_file()]
        if missing:
            raise ValueError(f"{self.path}: incomplete latent cache, {len(missing)} of {num_shards} shards missing "
                             f"(first: {_shard_path(self.path, missing[0]).name}); run build_latent_cache again with "
                             f"the same arguments to finish it")
        self.shards = [np.load(_shard_path(self.path, s), mmap_mode="r" if mmap else None) for s in range(num_shards)]
        self.labels = torch.from_numpy(np.load(self.path / "labels.npy"))
        self.shape = tuple(self.meta["latent_shape"][1:])
        for s, shard in enumerate(self.shards):
            expected = (min(shard_size, n - s * shard_size), 2, *self.shape)
            if shard.shape != expected or shard.dtype != _STORE:
                raise ValueError(f"{_shard_path(self.path, s)}: {shard.dtype} {shard.shape}, expected float16 "
                                 f"{expected}")
        if self.labels.shape != (n,):
            raise ValueError(f"{self.path / 'labels.npy'}: shape {tuple(self.labels.shape)}, expected ({n},)")
        classes = self.meta.get("classes")
        self.num_classes = len(classes) if classes else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def _gather(self, index, flip: np.ndarray | None) -> np.ndarray:
        index = torch.as_tensor(index).cpu().numpy().astype(np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"latent index out of range [0, {len(self)}): {index.min()}..{index.max()}")
        shard, local = np.divmod(index, self.meta["shard_size"])
        out = np.empty((len(index), *((2,) if flip is None else ()), *self.shape), dtype=_STORE)
        for s in np.unique(shard):
            rows = shard == s
            # Advanced indexing on the memmap reads just the rows asked for.
            out[rows] = self.shards[s][local[rows]] if flip is None else self.shards[s][local[rows], flip[rows]]
        return out

    def pairs(self, index: Tensor | Sequence[int]) -> Tensor:
        """Both versions of each index: float32 [k, 2, C, h, w]; [:, 0] the image, [:, 1] its horizontal flip."""
        return torch.from_numpy(self._gather(index, None)).float()

    def sample(self, index: Tensor | Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """float32 [k, C, h, w]: per index, the image's or its flip's latent with probability 1/2 each."""
        flip = torch.randint(2, (len(index),), generator=generator, device=_device_of(generator)).cpu().numpy()
        return torch.from_numpy(self._gather(index, flip)).float()

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass in random order: (latents float32 [b, C, h, w], labels [b]) batches, e.g. to prefill a queue."""
        perm = torch.randperm(len(self), generator=generator, device=_device_of(generator)).cpu()
        for index in perm.split(batch_size):
            yield self.sample(index, generator), self.labels[index]


class LatentDecoder:
    """Latents a generator made (scaled like the cache: z = VAE latent x scaling) -> uint8 pixels [k, 3, H, W].

    decode = LatentDecoder(vae_path, device="cuda"); pixels = decode(z)   # z float [k, C, h, w]

    The VAE's decoder sees z / scaling and returns [-1, 1] images, rounded to uint8 like every sample the project
    writes. `batch` bounds the decoder's memory (a 256x256 SD-VAE decode holds ~1 GB of activations per 8 images in
    fp32); the pixels do not depend on it beyond the device's rounding.
    """

    def __init__(self, vae_path: str | os.PathLike, *, scaling: float = 0.18215,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, batch: int = 32):
        if not (math.isfinite(scaling) and scaling > 0):
            raise ValueError(f"scaling: expected a positive number (the cache's meta.json has it), got {scaling!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an integer >= 1, got {batch!r}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae = load_vae(vae_path, device, dtype)
        self.scaling, self.batch = scaling, batch

    @classmethod
    def for_cache(cls, cache: str | os.PathLike, vae_path: str | os.PathLike | None = None, **kwargs) -> "LatentDecoder":
        """The decoder matching a latent cache: its scaling, and its VAE unless `vae_path` names another copy."""
        meta_path = Path(cache) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"latent cache not found: {meta_path}")
        meta = json.loads(meta_path.read_text())
        return cls(vae_path or meta["vae_path"], scaling=float(meta["scaling"]), **kwargs)

    @torch.no_grad()
    def __call__(self, z: Tensor) -> Tensor:
        if z.dim() != 4 or z.shape[1] != self.vae.config.latent_channels:
            raise ValueError(f"z: expected latents [k, {self.vae.config.latent_channels}, h, w], got "
                             f"{tuple(z.shape)}")
        param = next(self.vae.parameters())
        out = [to_uint8(self.vae.decode(part.to(param.device, param.dtype) / self.scaling).sample.float()).cpu()
               for part in z.split(self.batch)]
        return torch.cat(out)


def load_latents(path: str | os.PathLike, *, mmap: bool = True) -> tuple[LatentDataset, Tensor]:
    """(dataset, labels int64 [N]): draw training samples with dataset.sample(index, generator)."""
    ds = LatentDataset(path, mmap=mmap)
    return ds, ds.labels


if __name__ == "__main__":  # python -m drifting.data.latents IMAGES VAE OUT [--size 256 ...]
    import argparse

    p = argparse.ArgumentParser(description="Build a latent cache (the VAE loads from a local folder only).")
    p.add_argument("images", help="image folder root/<class>/**/<image>")
    p.add_argument("vae", help="local folder of a diffusers AutoencoderKL")
    p.add_argument("out", help="cache folder to create or finish")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true", help="run the VAE in bfloat16")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args()
    build_latent_cache(a.images, a.vae, a.out, size=a.size, batch=a.batch, seed=a.seed, device=a.device,
                       dtype=torch.bfloat16 if a.bf16 else torch.float32, num_workers=a.workers)
