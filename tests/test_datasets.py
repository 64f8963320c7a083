"""Dataset readers on tiny files written here: MNIST npz, CIFAR JPEG npz, idx (.gz), image folders; the registry."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from drifting.data import datasets
from drifting.data.datasets import (
    DATASETS,
    default_path,
    image_folder_classes,
    load_cifar10_jpeg_npz,
    load_dataset,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    load_mnist_npz,
    read_idx,
    to_float,
    to_uint8,
)


def pixels(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth_rgb(n, size=8, seed=0) -> np.ndarray:
    """[n, size, size, 3] images that JPEG keeps close to the original (gradients plus a per-image colour)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    base = 60 + 120 * (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2
    return np.clip(base + rng.integers(-50, 50, (n, 1, 1, 3)), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=95)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# MNIST npz
# ---------------------------------------------------------------------------------------------------------------------


def write_mnist(path, n_train=6, n_test=4):
    x_train, x_test = pixels(n_train, 5, 4, seed=1), pixels(n_test, 5, 4, seed=2)
    y_train, y_test = np.arange(n_train, dtype=np.uint8) % 10, np.arange(n_test, dtype=np.uint8)[::-1].copy()
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_train, y_train, x_test, y_test


def test_mnist_npz(tmp_path):
    x_train, y_train, x_test, y_test = write_mnist(tmp_path / "mnist.npz")
    images, labels = load_mnist_npz(tmp_path / "mnist.npz")
    assert images.shape == (6, 1, 5, 4) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.dtype == torch.int64
    assert np.array_equal(images[:, 0].numpy(), x_train) and labels.tolist() == y_train.tolist()
    images, labels = load_mnist_npz(tmp_path / "mnist.npz", "test")
    assert np.array_equal(images[:, 0].numpy(), x_test) and labels.tolist() == y_test.tolist()


def test_mnist_npz_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_mnist_npz(missing)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=str(bad)):
        load_mnist_npz(bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=pixels(2, 3, 3))
    with pytest.raises(ValueError, match=r"partial.npz.*missing keys \['y_train'\]"):
        load_mnist_npz(partial)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x_train=pixels(2, 3, 3), y_train=np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="wrong.npz.*y_train"):
        load_mnist_npz(wrong)
    with pytest.raises(ValueError, match="split"):
        load_mnist_npz(wrong, "val")


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR JPEG npz
# ---------------------------------------------------------------------------------------------------------------------


def write_cifar(path, n=12, size=8):
    images = smooth_rgb(n, size)
    blobs = [jpeg(im) for im in images]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    labels = (np.arange(n) % 10).astype(np.uint8)
    split = (np.arange(n) % 3 == 0).astype(np.uint8)  # every third image is a test image
    classes = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    np.savez(path, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, labels=labels, split=split,
             classes=classes)
    return images, blobs, labels, split


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cifar_jpeg_npz(tmp_path, num_workers):
    originals, blobs, labels, split = write_cifar(tmp_path / "c.npz")
    for name, code in (("train", 0), ("test", 1)):
        images, y = load_cifar10_jpeg_npz(tmp_path / "c.npz", name, num_workers=num_workers)
        index = np.flatnonzero(split == code)
        assert images.shape == (len(index), 3, 8, 8) and images.dtype == torch.uint8
        assert y.tolist() == labels[index].tolist()
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(blobs[i])).convert("RGB")) for i in index])
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), decoded)  # exactly Pillow's decoding, in order
        err = np.abs(images.permute(0, 2, 3, 1).numpy().astype(int) - originals[index].astype(int))
        assert err.mean() < 4  # and close to the encoded pixels (JPEG is lossy)


def test_cifar_jpeg_npz_errors(tmp_path):
    write_cifar(tmp_path / "c.npz")
    arrays = dict(np.load(tmp_path / "c.npz"))
    arrays["offsets"] = arrays["offsets"][:-1]
    np.savez(tmp_path / "bad_offsets.npz", **arrays)
    with pytest.raises(ValueError, match="bad_offsets.npz.*offsets"):
        load_cifar10_jpeg_npz(tmp_path / "bad_offsets.npz")
    arrays = dict(np.load(tmp_path / "c.npz"))
    arrays["data"] = arrays["data"].copy()
    arrays["data"][arrays["offsets"][1] : arrays["offsets"][2]] = 0  # image 1 (a train image) is garbage
    np.savez(tmp_path / "corrupt.npz", **arrays)
    for workers in (0, 2):  # the error comes back through the process pool too
        with pytest.raises(ValueError, match="corrupt.npz.*train.*image 0: cannot decode"):
            load_cifar10_jpeg_npz(tmp_path / "corrupt.npz", num_workers=workers)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_cifar10_jpeg_npz(tmp_path / "absent.npz")


# ---------------------------------------------------------------------------------------------------------------------
# idx
# ---------------------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_idx_gz_and_fashion_layout(tmp_path):
    x_train, y_train = pixels(7, 6, 5, seed=3), (np.arange(7) % 10).astype(np.uint8)
    x_test, y_test = pixels(3, 6, 5, seed=4), np.array([9, 0, 4], dtype=np.uint8)
    # As Debian ships Fashion-MNIST: gzip-compressed, original names. t10k left uncompressed: both are read.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x_train)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y_train)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x_test))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(y_test))
    images, labels = load_idx(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz")
    assert images.shape == (7, 1, 6, 5) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert np.array_equal(images[:, 0].numpy(), x_train) and labels.tolist() == y_train.tolist()
    images, labels = load_fashion_mnist(tmp_path, "test")
    assert np.array_equal(images[:, 0].numpy(), x_test) and labels.tolist() == [9, 0, 4]
    # Other idx types, big-endian on disk.
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    (tmp_path / "ints.idx").write_bytes(idx_bytes(ints, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "ints.idx"), ints)


def test_idx_errors(tmp_path):
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="magic.*not an idx file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(idx_bytes(pixels(4, 3, 3))[:-5])
    with pytest.raises(ValueError, match="short.*bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "images").write_bytes(idx_bytes(pixels(4, 3, 3)))
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(ValueError, match="labels.*4 integer labels"):
        load_idx(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    images = smooth_rgb(4, 6)
    files = {"zebra/1.png": images[0], "apple/b.png": images[1], "apple/a.png": images[2], "apple/sub/c.png": images[3]}
    for name, im in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp_path / name)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    assert image_folder_classes(tmp_path) == ["apple", "zebra"]
    x, y = load_image_folder(tmp_path)
    assert x.shape == (4, 3, 6, 6) and x.dtype == torch.uint8 and y.tolist() == [0, 0, 0, 1]
    # Sorted by path within a class: a.png, b.png, sub/c.png; PNG is lossless.
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images[[2, 1, 3, 0]])
    grey, _ = load_image_folder(tmp_path, mode="L")
    assert grey.shape == (4, 1, 6, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    Image.fromarray(smooth_rgb(1, 6)[0]).save(tmp_path / "a" / "0.png")
    Image.fromarray(smooth_rgb(1, 5)[0]).save(tmp_path / "a" / "1.png")
    with pytest.raises(ValueError, match=r"1\.png: size"):
        load_image_folder(tmp_path)
    (tmp_path / "a" / "1.png").unlink()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="b: class folder holds no images"):
        load_image_folder(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Conversions and the registry
# ---------------------------------------------------------------------------------------------------------------------


def test_to_float_and_back():
    x = torch.arange(256, dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and f[0] == -1 and f[-1] == 1 and f.min() >= -1 and f.max() <= 1
    assert torch.equal(to_uint8(f), x)
    assert to_float(x, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_float(f)


def test_registry(tmp_path, monkeypatch):
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10"}
    assert all(len(info.classes) == 10 for info in DATASETS.values())
    x_train, *_ = write_mnist(tmp_path / "mnist.npz")
    # An explicit path wins.
    images, _ = load_dataset("mnist", "train", path=tmp_path / "mnist.npz")
    assert np.array_equal(images[:, 0].numpy(), x_train)
    # DRIFTING_DATA is searched first; no real dataset is read.
    monkeypatch.setenv("DRIFTING_DATA", str(tmp_path))
    assert default_path("mnist") == tmp_path / "mnist.npz"
    assert load_dataset("mnist", "test")[0].shape == (4, 1, 5, 4)
    monkeypatch.delenv("DRIFTING_DATA")
    monkeypatch.setattr(datasets, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match="mnist.npz"):
        default_path("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
