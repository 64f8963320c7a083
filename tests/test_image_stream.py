"""ImageFolderStream: listing, determinism, augmentations and argument errors, on a tiny folder made per test."""

import numpy as np
import pytest
import torch
from PIL import Image

from drifting.data.image_stream import ImageFolderStream, rrc_box
from drifting.data.latents import center_crop_arr

SIZE = 16


@pytest.fixture
def folder(tmp_path):
    """3 classes (written out of order), PNG and JPEG, RGB, grey and RGBA, sizes around and below SIZE."""
    rng = np.random.default_rng(0)
    specs = {
        "cat": [("a.png", (30, 40, 3)), ("b.jpg", (57, 23, 3)), ("sub/c.png", (12, 9))],  # (H, W[, C]); grey
        "ant": [("x.png", (20, 20, 4)), ("y.jpeg", (33, 48, 3))],  # RGBA
        "bee": [("z.png", (64, 16))],
    }
    for cls, files in specs.items():
        for name, shape in files:
            path = tmp_path / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    (tmp_path / "cat" / ".hidden.png").write_bytes((tmp_path / "cat" / "a.png").read_bytes())
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def g(seed):
    return torch.Generator().manual_seed(seed)


def test_listing(folder):
    ds = ImageFolderStream(folder, SIZE)
    assert ds.classes == ["ant", "bee", "cat"] and ds.num_classes == 3
    assert len(ds) == 6 and ds.shape == (3, SIZE, SIZE)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert not any(".hidden" in f or f.endswith(".txt") for f in ds.files)
    assert ds.files[-1].endswith("sub/c.png")


@pytest.mark.parametrize("augment", ["rrc", "center"])
def test_shape_and_dtype(folder, augment):
    ds = ImageFolderStream(folder, SIZE, augment=augment, workers=0)
    x = ds.sample(torch.arange(len(ds)), g(0))
    assert x.shape == (6, 3, SIZE, SIZE) and x.dtype == torch.uint8
    assert ds.sample(torch.tensor([], dtype=torch.int64), g(0)).shape == (0, 3, SIZE, SIZE)


def test_deterministic_in_generator_state(folder):
    ds = ImageFolderStream(folder, SIZE, workers=0)
    index = torch.tensor([0, 2, 2, 5, 1])
    a, b, c = ds.sample(index, g(1)), ds.sample(index, g(1)), ds.sample(index, g(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = g(1)  # the generator advances by exactly one randint of k seeds
    ds.sample(index, gen)
    ref = g(1)
    torch.randint(0, 2**62, (len(index),), generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_workers_do_not_change_the_result(folder):
    index = torch.tensor([5, 4, 3, 2, 1, 0, 0, 3])
    inline = ImageFolderStream(folder, SIZE, workers=0).sample(index, g(3))
    threaded = ImageFolderStream(folder, SIZE, workers=3)
    assert torch.equal(inline, threaded.sample(index, g(3)))
    assert torch.equal(inline, threaded.sample(index, g(3)))  # the pool is reused
    threaded.close()


def test_center_without_flip_is_center_crop_arr(folder):
    ds = ImageFolderStream(folder, SIZE, augment="center", flip=False)
    x = ds.sample(torch.arange(len(ds)), g(0))
    for i, path in enumerate(ds.files):
        with Image.open(path) as f:
            ref = center_crop_arr(f.convert("RGB"), SIZE)
        assert torch.equal(x[i], torch.from_numpy(ref.transpose(2, 0, 1).copy()))


def test_center_flip_is_crop_or_mirror(folder):
    ds = ImageFolderStream(folder, SIZE, augment="center", workers=0)
    with Image.open(ds.files[1]) as f:
        ref = torch.from_numpy(center_crop_arr(f.convert("RGB"), SIZE).transpose(2, 0, 1).copy())
    x = ds.sample(torch.full((16,), 1), g(4))
    plain = [torch.equal(xi, ref) for xi in x]
    mirrored = [torch.equal(xi, ref.flip(-1)) for xi in x]
    assert all(p or m for p, m in zip(plain, mirrored))
    assert any(plain) and any(mirrored)


def test_rrc_on_tiny_images_upscales(folder):
    ds = ImageFolderStream(folder, 48, workers=0)  # larger than every image
    x = ds.sample(torch.arange(len(ds)).repeat(2), g(5))
    assert x.shape == (12, 3, 48, 48) and x.dtype == torch.uint8
    assert x.float().std() > 0  # not blank


def test_rrc_box_fits_and_falls_back():
    for seed in range(50):
        left, top, w, h = rrc_box(40, 30, g(seed))
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert 0.2 * 1200 * 0.9 <= w * h <= 1200 and 0.7 <= w / h <= 1.4
    assert rrc_box(100, 1, g(0)) == (49, 0, 1, 1)  # nothing fits: central crop, ratio clamped to 4/3
    assert rrc_box(3, 100, g(0)) == (0, 48, 3, 4)  # too tall: ratio clamped to 3/4


def test_bad_arguments(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderStream(tmp_path / "missing", SIZE)
    for size in (0, -3, 2.5, "16", True):
        with pytest.raises(ValueError, match="size"):
            ImageFolderStream(folder, size)
    with pytest.raises(ValueError, match="rrc.*center"):
        ImageFolderStream(folder, SIZE, augment="random")
    ds = ImageFolderStream(folder, SIZE)
    for index in (torch.tensor([0, 6]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="index"):
            ds.sample(index, g(0))
    for index in (torch.tensor([0.0]), torch.zeros(2, 2, dtype=torch.int64)):
        with pytest.raises(ValueError, match="index"):
            ds.sample(index, g(0))
