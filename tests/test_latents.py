"""Latent cache: ADM center crop on hand cases; building with a tiny random AutoencoderKL (shapes, the posterior-sample
formula, flip pairing, scaling, seed determinism, resume by shard, clear errors); the loader's random flip draws."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from drifting.data.datasets import to_float
from drifting.data.latents import (
    LatentDataset, LatentDecoder, build_latent_cache, center_crop_arr, load_latents, load_vae,
)
from drifting.data.synthetic import synthetic_images

SIZE = 32  # images; the tiny VAE has 2 blocks, so latents are [4, 16, 16]


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=SIZE,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images():
    return synthetic_images(num_classes=3, per_class=2, size=SIZE, seed=1)  # uint8 [6, 3, 32, 32], labels [6]


def build(images, vae_path, out, **kw):
    kw = {"size": SIZE, "batch": 4, "device": "cpu", "seed": 0, "shard_size": 4, "progress": False} | kw
    return build_latent_cache(images, vae_path, out, **kw)


def expected_pairs(vae_path, images, seed, scaling=0.18215):
    """The documented formula, computed directly: (mean + std * rng([seed, i]) noise) * scaling, image and flip."""
    vae = load_vae(vae_path)
    x = to_float(images)
    out = []
    for version in (x, x.flip(-1)):
        with torch.no_grad():
            post = vae.encode(version).latent_dist
        out.append((post.mean, torch.exp(0.5 * post.logvar)))
    noise = torch.stack([torch.from_numpy(np.random.default_rng([seed, i]).standard_normal((2, 4, 16, 16),
                                                                                            dtype=np.float32))
                         for i in range(len(images))])
    return torch.stack([(m + s * noise[:, j]) * scaling for j, (m, s) in enumerate(out)], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Center crop
# ---------------------------------------------------------------------------------------------------------------------


def test_center_crop_keeps_pixels_when_the_short_side_fits():
    arr = np.random.default_rng(0).integers(0, 256, (80, 64, 3), dtype=np.uint8)  # H 80, W 64
    out = center_crop_arr(Image.fromarray(arr), 64)
    np.testing.assert_array_equal(out, arr[8:72])  # no resize; (80 - 64) // 2 = 8 rows cut at the top


def test_center_crop_box_halves_large_images():
    blocks = np.array([[10, 200], [90, 30]], dtype=np.uint8)
    arr = np.kron(blocks, np.ones((4, 4), dtype=np.uint8))  # 8x8 of four constant 4x4 blocks
    out = center_crop_arr(Image.fromarray(arr), 2)  # 8 -> 4 -> 2 by box filters, then no resize
    np.testing.assert_array_equal(out, blocks)


def test_center_crop_bicubic_then_crop():
    arr = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)  # W 300, H 200
    out = center_crop_arr(Image.fromarray(arr), 64)
    # by hand: 200 >= 128 -> box to 150x100; 100 < 128 stops; bicubic to 96x64; crop columns 16..80
    small = Image.fromarray(arr).resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(small)[:, 16:80])


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_diffusers_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_vae(tmp_path)


def test_missing_vae_folder_names_the_path(vae_path, tmp_path, images):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build(images, tmp_path / "nowhere", tmp_path / "cache")


def test_cache_layout_formula_flip_pairing_and_scaling(vae_path, tmp_path, images):
    x, y = images
    ds, labels = load_latents(build((x, y), vae_path, tmp_path / "a"))
    assert len(ds) == 6 and ds.shape == (4, 16, 16) and ds.num_classes == 3
    assert torch.equal(labels, y) and len(ds.shards) == 2  # shards of 4 and 2 images
    assert ds.shards[0].dtype == np.float16 and ds.shards[0].shape == (4, 2, 4, 16, 16)
    assert ds.meta["scaling"] == 0.18215 and ds.meta["size"] == SIZE and ds.meta["vae_path"] == str(vae_path)
    pairs = ds.pairs(torch.arange(6))  # [6, 2, 4, 16, 16]
    assert pairs.dtype == torch.float32 and pairs.shape == (6, 2, 4, 16, 16)
    # [:, 0] encodes the image, [:, 1] its horizontal flip, each with its own documented noise, times 0.18215
    torch.testing.assert_close(pairs, expected_pairs(vae_path, x, seed=0), atol=2e-3, rtol=2e-3)
    # scaling multiplies the stored sample (a power of two keeps float16 values exact)
    unscaled = LatentDataset(build((x, y), vae_path, tmp_path / "b", scaling=1.0))
    torch.testing.assert_close(unscaled.pairs(range(6)) * 0.5,
                               LatentDataset(build((x, y), vae_path, tmp_path / "c", scaling=0.5)).pairs(range(6)))


def test_same_seed_same_cache_whatever_the_batching(vae_path, tmp_path, images):
    a = LatentDataset(build(images, vae_path, tmp_path / "a", batch=4, shard_size=4)).pairs(range(6))
    b = LatentDataset(build(images, vae_path, tmp_path / "b", batch=1, shard_size=5)).pairs(range(6))
    c = LatentDataset(build(images, vae_path, tmp_path / "c", seed=1)).pairs(range(6))
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)  # only float16 rounding of conv results may differ
    assert (a - c).abs().mean() > 1e-2


def test_image_folder_of_mixed_sizes_and_worker_processes(vae_path, tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(40, 48), (64, 50), (33, 90), (32, 32), (70, 41)]  # (W, H)
    for i, (w, h) in enumerate(sizes):
        folder = tmp_path / "images" / ("cat" if i < 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ds = LatentDataset(build(tmp_path / "images", vae_path, tmp_path / "c0", num_workers=0))
    assert ds.meta["classes"] == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1, 1, 1]
    crops = torch.stack([torch.from_numpy(center_crop_arr(Image.open(tmp_path / "images" / d / f"{i}.png").convert(
        "RGB"), SIZE)).permute(2, 0, 1) for i, d in enumerate(["cat"] * 2 + ["dog"] * 3)])
    torch.testing.assert_close(ds.pairs(range(5)), expected_pairs(vae_path, crops, seed=0), atol=2e-3, rtol=2e-3)
    workers = LatentDataset(build(tmp_path / "images", vae_path, tmp_path / "c2", num_workers=2))
    assert torch.equal(workers.pairs(range(5)), ds.pairs(range(5)))


def test_resume_encodes_only_missing_shards_and_refuses_other_settings(vae_path, tmp_path, images):
    out = build(images, vae_path, tmp_path / "cache", shard_size=2)  # 3 shards
    first, second = out / "latents_00000.npy", out / "latents_00001.npy"
    before, kept = second.read_bytes(), first.stat()
    second.unlink()
    with pytest.raises(ValueError, match="incomplete.*1 of 3"):
        LatentDataset(out)
    build(images, vae_path, out, shard_size=2)
    assert second.read_bytes() == before
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not rewritten
    with pytest.raises(ValueError, match="seed"):
        build(images, vae_path, out, shard_size=2, seed=5)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a latent cache"):
        build(images, vae_path, tmp_path / "other")


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def test_sample_picks_image_or_flip_at_random(vae_path, tmp_path, images):
    ds = LatentDataset(build(images, vae_path, tmp_path / "cache"), mmap=False)
    index = torch.tensor([5, 0, 3, 3, 1] * 40)
    draw = ds.sample(index, torch.Generator().manual_seed(0))
    assert draw.dtype == torch.float32 and draw.shape == (200, 4, 16, 16)
    assert torch.equal(draw, ds.sample(index, torch.Generator().manual_seed(0)))
    pairs = ds.pairs(index)
    is_flip = (draw == pairs[:, 1]).flatten(1).all(1)
    assert ((draw == pairs[:, 0]).flatten(1).all(1) | is_flip).all()  # each draw is one of its two versions
    assert 60 < is_flip.sum() < 140  # about half are flips
    seen = torch.cat([lab for _, lab in ds.batches(4, torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == sorted(ds.labels.tolist())  # one pass over every image
    with pytest.raises(IndexError):
        ds.sample(torch.tensor([6]))


def test_trainer_runs_on_a_latent_cache(vae_path, tmp_path):
    """`drifting train data.dataset=latents`: float queues, no uint8 conversion, generator sized to [4, 16, 16]."""
    from dataclasses import replace

    from drifting.train.checkpoint import load_checkpoint
    from drifting.train.gen import DataConfig, GenConfig, TrainConfig, main

    cache = build(synthetic_images(num_classes=3, per_class=8, size=SIZE, seed=2), vae_path, tmp_path / "cache")
    cfg = GenConfig(data=DataConfig(dataset="latents", path=str(cache)),
                    train=TrainConfig(steps=2, classes=3, gen_per_class=4, pos_per_class=4, uncond_per_class=2,
                                      queue_per_class=8, queue_uncond=16, push_per_step=8))
    main(cfg, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["step"] == 2 and state["queue"]["classes"].dtype == torch.float32
    assert not list((tmp_path / "run").glob("samples_*.png"))  # no VAE given: no grids
    with pytest.raises(ValueError, match="data.path"):
        replace(cfg, data=DataConfig(dataset="latents"))
    with pytest.raises(ValueError, match="data.vae"):
        replace(cfg, data=DataConfig(dataset="mnist", vae=str(vae_path)))
    # With the VAE, the grid is decoded to pixels: 3 rows of 8 samples of 32x32 RGB, upscaled 4x.
    main(replace(cfg, data=replace(cfg.data, vae=str(vae_path))), tmp_path / "with_vae", progress=False)
    grid = Image.open(tmp_path / "with_vae" / "samples_000002.png")
    assert grid.mode == "RGB" and grid.size == (8 * SIZE * 4, 3 * SIZE * 4)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding generated latents
# ---------------------------------------------------------------------------------------------------------------------


def test_decoder_is_the_vae_decode_of_unscaled_latents(vae_path, tmp_path, images):
    z = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    decode = LatentDecoder(vae_path, scaling=0.5, device="cpu", batch=2)
    pixels = decode(z)
    with torch.no_grad():
        expected = load_vae(vae_path).decode(z / 0.5).sample
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, SIZE, SIZE)
    assert torch.equal(pixels, ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    # the cache's scaling is picked up from its meta.json
    cache = build(images, vae_path, tmp_path / "cache", scaling=0.25)
    assert LatentDecoder.for_cache(cache, device="cpu").scaling == 0.25
    with pytest.raises(ValueError, match="z:"):
        decode(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="scaling"):
        LatentDecoder(vae_path, scaling=0.0)
    with pytest.raises(FileNotFoundError, match="nope"):
        LatentDecoder(tmp_path / "nope")


def test_sample_to_npz_decodes_latent_generators(vae_path, tmp_path):
    from drifting.eval.sample import sample_to_npz
    from drifting.models.dit import build_generator

    torch.manual_seed(0)
    model = build_generator("DiT-tiny", in_channels=4, image_size=16, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():  # move off the zero-output initialisation so decoded samples differ
            p.add_(0.05 * torch.randn_like(p))
    out = sample_to_npz(model, tmp_path / "s.npz", num_per_class=2, batch=4,
                        decode=LatentDecoder(vae_path, device="cpu"))
    with np.load(out) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (6, 3, SIZE, SIZE)
        assert f["labels"].tolist() == [0, 1, 2, 0, 1, 2]
