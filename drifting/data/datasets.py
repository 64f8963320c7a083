"""Readers for the small image datasets: whole splits into memory as (images, labels).

Every reader returns

    images  uint8 [N, C, H, W]  (NCHW, the layout of the generators and encoders; C = 1 grey or 3 RGB)
    labels  int64 [N]           class indices in [0, num_classes)

as CPU torch tensors; `to_float` maps the images to [-1, 1] (the generators' range) and `to_uint8` back. Keeping the
uint8 pixels is 4x smaller than float32 and is what the sample queue stores for pixel models.

Formats (where to get them: the README's "Data" section):

    load_mnist_npz        mnist.npz: x_train/y_train/x_test/y_test, images [N, H, W] (or [N, H, W, C]) uint8
    load_cifar10_jpeg_npz the JPEG npz: data (all JPEG files concatenated), offsets [N + 1], labels, split (0 train,
                          1 test), classes; decoded with Pillow, in worker processes for large splits
    load_idx              idx files (LeCun's MNIST format), plain or .gz, e.g. Debian's dataset-fashion-mnist
    load_image_folder     root/<class>/**/<image>: one class per subfolder, classes and files in sorted order

A missing file raises FileNotFoundError and a malformed one ValueError, both naming the path. `DATASETS` maps a
dataset name to its reader and default locations; `load_dataset(name, split, path)` resolves and loads.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS", "DatasetInfo", "load_dataset", "default_path", "load_mnist_npz", "load_cifar10_jpeg_npz",
    "load_fashion_mnist", "load_idx", "read_idx", "load_image_folder", "image_folder_classes", "to_float", "to_uint8",
    "data_dirs",
]

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Below this many images, starting worker processes costs more than it saves (CIFAR: ~0.2 ms per image).
_PARALLEL_MIN_IMAGES = 4096
_MAX_WORKERS = 8


# ---------------------------------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------------------------------


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels [...] in 0..255 -> floats in [-1, 1]: x / 127.5 - 1."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"to_float expects uint8 pixels, got {got}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return images.to(dtype) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Floats in [-1, 1] -> uint8 pixels, rounded to nearest and clipped (the inverse of `to_float`)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"to_uint8 expects a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _to_nchw(images: np.ndarray, path: Path, what: str) -> Tensor:
    """[N, H, W] or [N, H, W, C] uint8 array -> contiguous uint8 tensor [N, C, H, W]."""
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: {what} must be uint8 pixels, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{path}: {what} must have shape [N, H, W] or [N, H, W, C], got {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images))


def _to_labels(labels: np.ndarray, n: int, path: Path, what: str) -> Tensor:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # [N, 1], as some copies store them
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: {what} must be {n} integer labels, got {labels.dtype} {labels.shape}")
    if n and labels.min() < 0:
        raise ValueError(f"{path}: {what} has negative labels")
    return torch.from_numpy(labels.astype(np.int64))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _existing(path: str | os.PathLike, what: str = "file") -> Path:
    path = Path(path)
    if not (path.is_dir() if what == "folder" else path.is_file()):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# npz layouts
# ---------------------------------------------------------------------------------------------------------------------


def _read_npz(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz file, with errors that name the file."""
    path = _existing(path)
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise ValueError(f"missing keys {missing}; it has {sorted(npz.files)}")
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz in the expected layout: {e}") from None


def load_mnist_npz(path: str | os.PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST from an .npz with x_train/y_train/x_test/y_test -> (uint8 [N, 1, 28, 28], int64 [N])."""
    _check_split(split)
    x_key, y_key = ("x_train", "y_train") if split == "train" else ("x_test", "y_test")
    arrays = _read_npz(path, [x_key, y_key])
    images = _to_nchw(arrays[x_key], Path(path), x_key)
    return images, _to_labels(arrays[y_key], len(images), Path(path), y_key)


def _decode(sources: list, mode: str, first: int = 0) -> np.ndarray:
    """Decode images (bytes of encoded files, or paths) to one uint8 array [n, H, W, C]; all must share a size.

    Runs in worker processes, so it takes and returns plain picklable values. A bad item raises ValueError naming
    its path, or its index (first + position in `sources`) for bytes.
    """
    from PIL import Image  # Pillow comes with matplotlib; imported here so the module loads without it

    out = None
    for i, source in enumerate(sources):
        name = str(source) if isinstance(source, (str, Path)) else f"image {first + i}"
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                pixels = np.asarray(img.convert(mode))
        except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, SyntaxError...)
            raise ValueError(f"{name}: cannot decode: {e}") from None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if out is None:
            out = np.empty((len(sources), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise ValueError(f"{name}: size {pixels.shape[:2]} differs from the first image's {out.shape[1:3]}")
        out[i] = pixels
    return out if out is not None else np.empty((0, 0, 0, 1 if mode == "L" else 3), dtype=np.uint8)


def _decode_all(sources: list, mode: str, num_workers: int | None) -> np.ndarray:
    """`_decode` over all sources, split into chunks over a process pool when there are many."""
    if num_workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = min(cores, _MAX_WORKERS) if len(sources) >= _PARALLEL_MIN_IMAGES else 0
    if num_workers <= 1:
        return _decode(sources, mode)
    step = -(-len(sources) // (4 * num_workers))  # ~4 chunks per worker evens out slow ones
    chunks = [sources[i : i + step] for i in range(0, len(sources), step)]
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        parts = list(pool.map(_decode, chunks, [mode] * len(chunks), range(0, len(sources), step)))
    for start, part in zip(range(0, len(sources), step), parts):
        if part.shape[1:] != parts[0].shape[1:]:
            raise ValueError(f"image {start}: size {part.shape[1:3]} differs from the first image's "
                             f"{parts[0].shape[1:3]}")
    return np.concatenate(parts)


def load_cifar10_jpeg_npz(
    path: str | os.PathLike, split: str = "train", num_workers: int | None = None
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 from the JPEG npz (data, offsets, labels, split, classes) -> (uint8 [N, 3, 32, 32], int64 [N]).

    Images keep their file order within the split. num_workers: decoding processes; None picks up to 8 for large
    splits (decoding 50,000 images takes ~10 s on one core), 0 or 1 decodes in this process.
    """
    _check_split(split)
    arrays = _read_npz(path, ["data", "offsets", "labels", "split", "classes"])
    path = Path(path)
    data, offsets, which = arrays["data"], arrays["offsets"].astype(np.int64), arrays["split"]
    n = len(arrays["labels"])
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"{path}: data must be a flat uint8 array of concatenated JPEG files, got {data.dtype} "
                         f"{data.shape}")
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(data) or (np.diff(offsets) <= 0).any():
        raise ValueError(f"{path}: offsets must be {n + 1} increasing values from 0 to len(data) = {len(data)}")
    if which.shape != (n,):
        raise ValueError(f"{path}: split must have one entry per image ({n}), got {which.shape}")
    index = np.flatnonzero(which == SPLITS.index(split))
    blobs = [data[offsets[i] : offsets[i + 1]].tobytes() for i in index]
    try:
        images = _decode_all(blobs, "RGB", num_workers)
    except ValueError as e:
        raise ValueError(f"{path} ({split} split): {e}") from None
    labels = _to_labels(arrays["labels"], n, path, "labels")[torch.from_numpy(index)]
    return _to_nchw(images, path, "decoded images"), labels


# ---------------------------------------------------------------------------------------------------------------------
# idx files
# ---------------------------------------------------------------------------------------------------------------------

# idx type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One idx file (gzip-compressed or not, told by its first bytes) -> a native-endian numpy array.

    Layout: two zero bytes, a type byte, the number of dimensions, one big-endian uint32 per dimension, the data.
    """
    path = _existing(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: idx header says shape {shape} of {dtype}, but the data has "
                         f"{len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """An idx image file [N, H, W] uint8 and its idx label file [N] -> (uint8 [N, 1, H, W], int64 [N])."""
    raw_images = read_idx(images_path)
    if raw_images.ndim != 3:
        raise ValueError(f"{images_path}: expected idx images [N, H, W], got shape {raw_images.shape}")
    images = _to_nchw(raw_images, Path(images_path), "idx images")
    return images, _to_labels(read_idx(labels_path), len(images), Path(labels_path), "idx labels")


def load_fashion_mnist(root: str | os.PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST (or MNIST) idx files in folder root, with the original names, .gz or not."""
    _check_split(split)
    root = _existing(root, "folder")
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"file not found: {root / stem}(.gz)")

    return load_idx(find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte"))


# ---------------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------------


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """The class names of an image folder: its subfolder names, sorted; class i is the i-th name."""
    root = _existing(root, "folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected root/<class>/<image files>)")
    return classes


def image_folder_files(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """root/<class>/**/<image> -> (files, labels, class names): sorted class folders, files recursively in sorted
    order, hidden files and folders skipped; a class folder without images is an error."""
    root = Path(root)
    classes = image_folder_classes(root)
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            raise ValueError(f"{root / name}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [str(p) for p in found]
        labels += [label] * len(found)
    return files, labels, classes


def load_image_folder(
    root: str | os.PathLike, mode: str = "RGB", num_workers: int | None = None
) -> tuple[Tensor, Tensor]:
    """root/<class>/**/<image> -> (uint8 [N, C, H, W], int64 [N]); all images must share one size.

    Classes are the sorted subfolder names (see `image_folder_classes`); files are taken recursively, in sorted
    order, class by class. mode: "RGB" (C = 3) or "L" (grey, C = 1). Hidden files and folders are skipped.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    root = Path(root)
    files, labels, _ = image_folder_files(root)
    try:
        images = _decode_all(files, mode, num_workers)
    except ValueError as e:
        raise ValueError(f"{root}: {e}") from None
    return _to_nchw(images, root, "images"), torch.tensor(labels, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dirs() -> list[Path]:
    """Where datasets are looked for, in order: $DRIFTING_DATA, <repo>/.data, <repo>/../shared/data."""
    env = os.environ.get("DRIFTING_DATA")
    return ([Path(env)] if env else []) + [_REPO_ROOT / ".data", _REPO_ROOT.parent / "shared" / "data"]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's reader and where it is found by default."""

    load: Callable[[Path, str], tuple[Tensor, Tensor]]  # load(path, split)
    filename: str  # file or folder name looked up in each of data_dirs()
    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W)
    system_path: str | None = None  # where an OS package installs it, tried last


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(load_mnist_npz, "mnist.npz", tuple("0123456789"), (1, 28, 28)),
    "fashion-mnist": DatasetInfo(
        load_fashion_mnist, "fashion-mnist",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (1, 28, 28), system_path="/usr/share/datasets/fashion-mnist",  # Debian: apt-get install dataset-fashion-mnist
    ),
    "cifar10": DatasetInfo(
        load_cifar10_jpeg_npz, "cifar10_jpeg.npz",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"), (3, 32, 32),
    ),
}


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or use load_image_folder)")
    return DATASETS[name]


def default_path(name: str) -> Path:
    """The first existing default location of dataset `name`; FileNotFoundError listing all that were tried."""
    info = _info(name)
    tried = [d / info.filename for d in data_dirs()] + ([Path(info.system_path)] if info.system_path else [])
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(f"dataset {name!r} not found; tried {', '.join(map(str, tried))}. "
                            f"Pass its path, or set DRIFTING_DATA to the folder that holds {info.filename}")


def load_dataset(name: str, split: str = "train", path: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load a split of a registered dataset from `path`, or from its default location when path is None."""
    info = _info(name)
    return info.load(Path(path) if path is not None else default_path(name), split)
