"""A streaming image-folder source: images decoded, cropped and flipped on demand, for pixel-space training on
ImageNet-sized folders (the 256x256 pixel presets).

The in-memory readers of `drifting.data.datasets` hold a whole split as one uint8 tensor, which suits MNIST or
CIFAR-10 but not ImageNet (1.28M images, ~200 GB as 256x256 pixels). `ImageFolderStream` keeps only the file list
and decodes the images a batch asks for:

    ds = ImageFolderStream(root, 256)                  root/<class>/**/<image>, classes in sorted order
    ds.sample(index, generator) -> uint8 [k, 3, 256, 256]
    ds.labels                   -> int64 [N]

Augmentations (`augment`), each followed by a horizontal flip with probability 1/2 when `flip`:

    "rrc"     RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic): the authors' augmentation of
              real images for pixel generators
    "center"  ADM's center crop (`center_crop_arr`), as for the authors' latent cache

Decoding runs in a thread pool: Pillow releases the GIL while it decodes and resizes, so threads run in parallel
without pickling paths and pixels to worker processes, and the pool lives inside the dataset object the trainer
already holds.

Determinism: `sample` first draws one seed per image from `generator` (a single `torch.randint` call), then crops and
flips image i with its own generator seeded by seed i. The output is a pure function of (index, the generator's
state), whatever the number of threads or the order in which they finish, so the trainer's (seed, step) generators
make a resumed run draw exactly the same crops.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from drifting.data.datasets import image_folder_files
from drifting.data.latents import center_crop_arr

__all__ = ["ImageFolderStream", "AUGMENTS"]

AUGMENTS = ("rrc", "center")
RRC_SCALE = (0.2, 1.0)  # area fraction of the crop
RRC_RATIO = (3 / 4, 4 / 3)  # width / height of the crop
_RRC_ATTEMPTS = 10


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def _randint(g: torch.Generator, high: int) -> int:
    """An integer in [0, high)."""
    return int(torch.randint(high, (), generator=g).item())


def rrc_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """The crop box (left, top, w, h) of a random resized crop of a width x height image.

    Up to 10 tries: area fraction uniform in RRC_SCALE, log aspect ratio uniform in log RRC_RATIO; the first box that
    fits is placed uniformly. If none fits (very elongated images), a central crop of the largest box whose ratio is
    the image's clamped to RRC_RATIO.
    """
    area = width * height
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(_RRC_ATTEMPTS):
        target = area * _uniform(g, *RRC_SCALE)
        ratio = math.exp(_uniform(g, log_lo, log_hi))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, width - w + 1), _randint(g, height - h + 1), w, h
    ratio = width / height
    if ratio < RRC_RATIO[0]:  # too tall: full width, height cut to the narrowest allowed ratio
        w, h = width, round(width / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:  # too wide: full height
        w, h = round(height * RRC_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageFolderStream:
    """Labelled images of root/<class>/**/<image>, decoded on demand (see the module docstring).

    size: side of the square output; augment: "rrc" or "center"; flip: mirror horizontally with probability 1/2;
    workers: decoding threads (None: min(8, cpu count); 0 or 1: decode in the calling thread).
    Attributes: files (list[str], N), labels (int64 [N]), classes (list[str]), num_classes, shape (3, size, size).
    """

    def __init__(self, root: str | os.PathLike, size: int, *, augment: str = "rrc", flip: bool = True,
                 workers: int | None = None):
        # Check the cheap arguments before listing the folder (a million files takes a while).
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(map(repr, AUGMENTS))}, got {augment!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"workers must be a non-negative int or None, got {workers!r}")
        root = Path(root)
        self.root, self.size, self.augment, self.flip = root, size, augment, bool(flip)
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        # FileNotFoundError naming root if it is missing, ValueError if it has no class folders or one has no images
        self.files, labels, self.classes = image_folder_files(root)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.classes)
        self.shape = (3, size, size)
        self._pool: ThreadPoolExecutor | None = None  # made on first use: a dataset that is only listed needs none

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int, seed: int) -> np.ndarray:
        """Image i, augmented with draws from a generator seeded by `seed` -> uint8 array [size, size, 3]."""
        from PIL import Image  # Pillow comes with matplotlib; imported here, as in datasets.py

        g = torch.Generator().manual_seed(seed)
        path = self.files[i]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")  # grey, palette, RGBA or CMYK files all become 3 channels
        except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, SyntaxError...)
            raise ValueError(f"{path}: cannot decode: {e}") from None
        if self.augment == "center":
            arr = center_crop_arr(image, self.size)
        else:
            left, top, w, h = rrc_box(*image.size, g)
            # resize's box crops and resizes in one pass (antialiased when shrinking, as a crop then resize)
            arr = np.asarray(image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h)))
        if self.flip and torch.rand((), generator=g).item() < 0.5:
            arr = arr[:, ::-1]
        return arr

    def _check_index(self, index: Tensor | Sequence[int]) -> Tensor:
        index = torch.as_tensor(index).cpu()
        if index.ndim != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"index must be a 1-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}")
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range [0, {len(self)}): min {index.min().item()}, "
                             f"max {index.max().item()}")
        return index.to(torch.int64)

    def sample(self, index: Tensor | Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """uint8 [k, 3, size, size]: images index [k], augmented; a pure function of (index, generator state).

        Draws exactly one torch.randint of k seeds from `generator` (on the generator's device), so the caller's
        random stream advances the same way whatever `workers` is.
        """
        index = self._check_index(index)
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2**62, (len(index),), generator=generator, device=device).cpu().tolist()
        items = index.tolist()
        out = torch.empty((len(items), *self.shape), dtype=torch.uint8)

        def work(j: int) -> None:  # each task writes its own row, so no locking
            out[j] = torch.from_numpy(np.ascontiguousarray(self.load(items[j], seeds[j]).transpose(2, 0, 1)))

        if self.workers <= 1 or len(items) <= 1:
            for j in range(len(items)):
                work(j)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="image-stream")
            list(self._pool.map(work, range(len(items))))  # waits for all; re-raises a task's error here
        return out

    def close(self) -> None:
        """Stop the decoding threads (a later `sample` starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __getstate__(self) -> dict:  # a pool cannot be pickled (DataLoader workers, spawn): the copy makes its own
        return {**self.__dict__, "_pool": None}

    def __repr__(self) -> str:
        return (f"ImageFolderStream({str(self.root)!r}, {self.size}, augment={self.augment!r}, flip={self.flip}, "
                f"workers={self.workers}): {len(self)} images, {self.num_classes} classes")
