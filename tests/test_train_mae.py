"""MAE pre-training: the default run trains, evaluates and exports an encoder that the generator's loss loads; the
masks are 2x2 cells at the asked ratio; the loss sees only masked positions; the fine-tune weight ramps as the
authors'; resume continues the same run bit for bit; bad configurations fail before any work."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from drifting.models.resnet_mae import resnet_maes
from drifting.train.checkpoint import load_checkpoint
from drifting.train.gen import LossConfig, build_loss
from drifting.train.log import read_metrics
from drifting.train.mae import (
    MAEConfig,
    MAEDataConfig,
    MAEEvalConfig,
    MAEModelConfig,
    MAETrainConfig,
    apply_mask,
    build_encoder,
    crop_params,
    finetune_lambda,
    main,
    masked_recon_loss,
    random_mask,
    random_resized_crop,
)
from multiproc import free_port, spawn

# The default set (4 classes of 3x8x8 synthetic images) made smaller, short runs, a small evaluation.
TINY = MAEConfig(
    data=MAEDataConfig(synthetic_per_class=16),
    train=MAETrainConfig(steps=2, batch=8, log_every=1),
    eval=MAEEvalConfig(images=32, probe_images=32, probe_steps=10),
)


def with_train(cfg: MAEConfig, **changes) -> MAEConfig:
    return replace(cfg, train=replace(cfg.train, **changes))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_default_config_runs_evaluates_and_exports(tmp_path):
    cfg = with_train(MAEConfig(), steps=3)  # the default, shortened
    final = main(cfg, tmp_path, progress=False)
    assert {"loss", "recon", "ce", "lambda", "test_masked_loss", "test_visible_loss", "probe_acc"} <= set(final)
    assert final["lambda"] == 0.0 and final["loss"] == final["recon"]
    assert 0.0 <= final["probe_acc"] <= 1.0 and final["test_masked_loss"] > 0
    for name in ("config.yaml", "metrics.jsonl", "encoder.pt", "encoder.json"):
        assert (tmp_path / name).exists(), name
    assert "probe_acc" in read_metrics(tmp_path)[-1]  # the evaluation is logged too
    # The export is the EMA, rebuilt exactly from its meta: preset name plus the data's sizes.
    export = torch.load(tmp_path / "encoder.pt", weights_only=True)
    meta = export["meta"]
    assert meta["encoder"] == "mae_tiny"
    assert meta["encoder_kwargs"] == {"in_channels": 3, "image_size": 8, "num_classes": 4}
    encoder = resnet_maes[meta["encoder"]](**meta["encoder_kwargs"])
    encoder.load_state_dict(export["model"], strict=True)
    assert_same(export["model"], load_checkpoint(tmp_path / "checkpoints")["ema"])


def test_export_loads_into_the_generator_loss(tmp_path):
    # Data shaped like the mae_tiny preset itself (4x32x32, 10 classes): gen.build_loss needs no build arguments.
    cfg = replace(TINY, data=MAEDataConfig(synthetic_classes=10, synthetic_per_class=2, synthetic_size=32,
                                           synthetic_channels=4))
    main(cfg, tmp_path, progress=False)
    loss = build_loss(LossConfig(encoder="mae_tiny", encoder_weights=str(tmp_path / "encoder.pt")), (4, 32, 32),
                      torch.device("cpu"))
    assert_same(loss.encoder.state_dict(), load_checkpoint(tmp_path / "checkpoints")["ema"])


def test_default_export_loads_into_the_generator_loss_on_the_default_data(tmp_path):
    main(TINY, tmp_path, progress=False)
    build_loss(LossConfig(encoder="mae_tiny", encoder_weights=str(tmp_path / "encoder.pt")), (3, 8, 8),
               torch.device("cpu"))


def test_encoder_is_the_preset_resized_to_the_data():
    model, kwargs = build_encoder(MAEModelConfig("mae_mnist", width=8), (1, 28, 28), 10)
    assert kwargs == {"in_channels": 1, "image_size": 28, "num_classes": 10, "width": 8}
    assert (model.cfg.width, model.cfg.in_channels, model.cfg.image_size) == (8, 1, 28)
    with pytest.raises(ValueError, match="model.encoder"):
        build_encoder(MAEModelConfig(), (3, 8, 6), 4)


def test_masks_are_2x2_cells_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    mask = random_mask(2000, 8, 0.5, g)  # (N, G, G)
    assert mask.shape == (2000, 8, 8) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.5) < 0.01
    cells = mask.reshape(2000, 4, 2, 4, 2)
    assert torch.equal(cells.all(dim=(2, 4)), cells.any(dim=(2, 4)))  # every 2x2 cell all or nothing
    assert abs(random_mask(2000, 8, 0.25, g).float().mean().item() - 0.25) < 0.01
    # An odd grid: half cells on the last row and column (a duplicated last row and column completes them).
    odd = random_mask(50, 7, 0.5, g)
    full = torch.cat([odd, odd[:, 6:]], 1)
    cells = torch.cat([full, full[:, :, 6:]], 2).reshape(50, 4, 2, 4, 2)
    assert odd.shape == (50, 7, 7) and torch.equal(cells.all(dim=(2, 4)), cells.any(dim=(2, 4)))


def test_apply_mask_zeros_exactly_the_masked_cells_in_pixels():
    p = 2
    x = torch.rand(3, 2, 8, 8) + 1  # no zero anywhere
    mask = random_mask(3, 4, 0.5, torch.Generator().manual_seed(1))  # grid 4 = 8 pixels / patch 2
    y = apply_mask(x, mask, p)
    zeroed = (y == 0).all(dim=1)  # (N, H, W)
    expected = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)  # a 2x2 cell of the grid is 4x4 pixels
    assert torch.equal(zeroed, expected)
    assert torch.equal(y[~zeroed[:, None].expand_as(y)], x[~zeroed[:, None].expand_as(x)])


@pytest.mark.parametrize("p", [1, 2])
def test_loss_counts_only_masked_positions(p):
    g = torch.Generator().manual_seed(2)
    target = torch.randn(4, 3, 8, 8, generator=g)
    mask = random_mask(4, 8 // p, 0.5, g)
    pixels = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]  # (N, 1, H, W)
    garbage = torch.randn(4, 3, 8, 8, generator=g) * 100
    perfect_where_masked = torch.where(pixels, target, garbage)
    assert masked_recon_loss(perfect_where_masked, target, mask, p).item() == 0.0
    # An error of 1 everywhere: the squared error summed over the C p^2 channels of a position, per position.
    assert masked_recon_loss(target + 1, target, mask, p).item() == pytest.approx(3 * p * p)
    # The global denominator: two halves with the whole batch's count add up to the whole.
    whole = masked_recon_loss(garbage, target, mask, p)
    halves = sum(masked_recon_loss(garbage[s], target[s], mask[s], p, num_masked=mask.sum())
                 for s in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(halves, whole)


def test_crop_covers_the_image_at_full_scale_and_flips():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(2, 2, 3)
    torch.testing.assert_close(random_resized_crop(x, identity), x, rtol=0, atol=1e-5)
    mirror = identity * torch.tensor([[-1.0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(random_resized_crop(x, mirror), x.flip(-1), rtol=0, atol=1e-5)
    theta = crop_params(1000, (0.2, 1.0), True, g)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert (w <= 1).all() and (h <= 1).all() and (theta[:, 0, 2].abs() <= 1 - w + 1e-6).all()
    assert 0.4 < (theta[:, 0, 0] < 0).float().mean() < 0.6  # half flipped
    assert (w * h).min() > 0.2 - 1e-6 and (w * h).max() <= 1
    assert not (crop_params(100, (0.2, 1.0), False, g)[:, 0, 0] < 0).any()


def test_finetune_lambda_ramps_over_the_last_steps():
    lam = [finetune_lambda(s, steps=10, finetune_steps=4, ramp=2, peak=0.1) for s in range(10)]
    assert lam == pytest.approx([0, 0, 0, 0, 0, 0, 0.0, 0.05, 0.1, 0.1])
    assert [finetune_lambda(s, steps=5, finetune_steps=0, ramp=2) for s in range(5)] == [0.0] * 5
    assert finetune_lambda(3, steps=5, finetune_steps=2, ramp=0) == 0.1


def test_finetune_trains_the_head_and_reports_its_accuracy(tmp_path):
    final = main(with_train(TINY, steps=3, finetune_steps=2, finetune_ramp=1), tmp_path, progress=False)
    lambdas = [r["lambda"] for r in read_metrics(tmp_path) if "lambda" in r]
    assert lambdas == pytest.approx([0.0, 0.0, 0.1])
    assert final["loss"] == pytest.approx(0.1 * final["ce"] + 0.9 * final["recon"], rel=1e-5)
    assert "head_acc" in final


def test_resume_continues_the_same_run_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(with_train(TINY, steps=4), straight, progress=False)
    main(with_train(TINY, steps=2), resumed, progress=False)
    main(with_train(TINY, steps=4), resumed, progress=False)  # picks up the step-2 checkpoint
    a, b = load_checkpoint(straight / "checkpoints"), load_checkpoint(resumed / "checkpoints")
    assert a["step"] == b["step"] == 4
    assert_same(a["model"], b["model"])
    assert_same(a["ema"], b["ema"])
    assert_same(torch.load(straight / "encoder.pt")["model"], torch.load(resumed / "encoder.pt")["model"])


def _worker(rank: int, world: int, port: int, run_dir: str, cfg: MAEConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(cfg, run_dir, progress=False)


def test_two_gloo_processes_give_the_same_update_as_one(tmp_path):
    # Each process normalises its share by the global batch's masked count and batch size: the shares add up to the
    # whole-batch loss, and DDP's averaged gradient is the whole-batch gradient (compared through its logged norm,
    # which AdamW's scale invariance would otherwise hide).
    cfg = with_train(TINY, steps=3, finetune_steps=2, finetune_ramp=1)
    main(cfg, tmp_path / "one", progress=False)
    spawn(_worker, 2, free_port(), str(tmp_path / "two"), cfg)
    one, two = ([r for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("one", "two"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "recon", "ce", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    a, b = load_checkpoint(tmp_path / "one" / "checkpoints"), load_checkpoint(tmp_path / "two" / "checkpoints")
    for k in a["model"]:  # float noise only: AdamW's first steps divide by tiny second moments, hence atol
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=5e-4, msg=k)


@pytest.mark.parametrize(
    "section, change, message",
    [
        ("data", dict(dataset="imagenet-21k"), "data.dataset"),
        ("model", dict(encoder="mae_huge"), "model.encoder"),
        ("train", dict(mask_ratio=1.0), "train.mask_ratio"),
        ("train", dict(finetune_steps=5, steps=4), "train.finetune_steps"),
        ("train", dict(crop_scale=(0.5, 0.2)), "train.crop_scale"),
        ("train", dict(batch=0), "train.batch"),
        ("train", dict(ema_decay=1.0), "train.ema_decay"),
    ],
)
def test_bad_configuration_names_the_field(section, change, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **{section: replace(getattr(TINY, section), **change)})


def test_missing_dataset_fails_before_any_work(tmp_path):
    cfg = replace(TINY, data=MAEDataConfig(dataset="mnist", path=str(tmp_path / "nonexistent.npz")))
    with pytest.raises(FileNotFoundError):
        main(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_flip_defaults_follow_the_dataset():
    assert not MAEConfig().use_flip  # synthetic: the square's place is the class
    assert not replace(TINY, data=MAEDataConfig(dataset="mnist")).use_flip
    assert replace(TINY, data=MAEDataConfig(dataset="cifar10")).use_flip
    assert replace(TINY, data=MAEDataConfig(dataset="mnist"), train=replace(TINY.train, flip=True)).use_flip


def test_time_limit_ends_with_the_evaluation_and_the_export(tmp_path):
    last = main(with_train(TINY, steps=6, log_every=2, time_limit_min=1e-9), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 2
    assert load_checkpoint(tmp_path / "encoder.pt")["meta"]["step"] == 2
    assert "recon" in last
    with pytest.raises(ValueError, match="train.time_limit_min"):
        with_train(TINY, time_limit_min=-0.5)
