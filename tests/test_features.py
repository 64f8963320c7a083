"""Feature keys: the authors' 86-key set of a latent ResNet-MAE with the right L and S, the statistics against literal
computations, location and flattening orders, the paper's subsets and mean-of-squares option."""

from __future__ import annotations

import pytest
import torch

from drifting.features import (
    FeatureConfig,
    channel_norm,
    feature_sets,
    flatten_sample,
    location_vectors,
    spatial_mean,
    spatial_std,
    tap_sets,
)
from drifting.models.resnet_mae import ResNetMAE, ResNetMAEConfig, resnet_maes


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def latent_keys(cfg=FeatureConfig(), n=2):
    model = ResNetMAE()  # tiny width: the key set does not depend on the width
    x = rand(n, 4, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        return model, feature_sets(x, model.patchify(x), model.taps(x), cfg)


def expected_latent_keys(c: int, windows=(2, 4)) -> dict[str, tuple[int, int]]:
    """key -> (L, S) from the table of official-code-notes.md 2.1, for width c on a 32x32 latent grid."""
    out = {"global": (1, 32 * 32 * 4), "norm_x": (1, 4)}
    taps = [("conv1", 1, 32), ("layer1_blk2", 1, 32), ("layer1", 1, 32), ("layer2_blk2", 2, 16),
            ("layer2_blk4", 2, 16), ("layer2", 2, 16), ("layer3_blk2", 4, 8), ("layer3_blk4", 4, 8),
            ("layer3_blk6", 4, 8), ("layer3", 4, 8), ("layer4_blk2", 8, 4), ("layer4", 8, 4)]
    for name, m, side in taps:
        out[name] = (side * side, m * c)
        out[f"{name}_mean"] = out[f"{name}_std"] = (1, m * c)
        for s in windows:
            out[f"{name}_mean_{s}"] = out[f"{name}_std_{s}"] = ((side // s) ** 2, m * c)
    return out


def test_latent_mae_has_86_keys_with_the_right_shapes():
    model, keys = latent_keys(n=2)
    expected = expected_latent_keys(model.cfg.width)
    assert len(keys) == len(expected) == 86
    assert {k: tuple(v.shape) for k, v in keys.items()} == {k: (2, *ls) for k, ls in expected.items()}
    # Spot checks against the notes' table (L per key for layer1 and layer4).
    assert [keys[f"layer1{s}"].shape[1] for s in ("", "_mean", "_std", "_mean_2", "_mean_4")] == [1024, 1, 1, 256, 64]
    assert [keys[f"layer4{s}"].shape[1] for s in ("", "_mean", "_std", "_mean_2", "_mean_4")] == [16, 1, 1, 4, 1]


@pytest.mark.parametrize("subset,windows,count", [("a,b", (), 38), ("a-c", (2,), 62), ("a-d", (2, 4), 86)])
def test_paper_subsets(subset, windows, count):
    model, keys = latent_keys(FeatureConfig(subset=subset), n=1)
    assert len(keys) == count
    assert set(keys) == set(expected_latent_keys(model.cfg.width, windows))


def test_global_and_norm_x_can_be_left_out():
    _, keys = latent_keys(FeatureConfig(use_global=False, use_norm_x=False), n=1)
    assert len(keys) == 84 and "global" not in keys and "norm_x" not in keys
    with pytest.raises(ValueError, match="x_in"):
        feature_sets(rand(1, 4, 8, 8), None, {}, FeatureConfig())
    with pytest.raises(ValueError, match="subset"):
        FeatureConfig(subset="a-e")


def test_flatten_and_location_orders():
    x = rand(2, 3, 4, 5)
    flat = flatten_sample(x)
    assert flat.shape == (2, 1, 60)
    vec = location_vectors(x)
    assert vec.shape == (2, 20, 3)
    for h in range(4):
        for w in range(5):
            torch.testing.assert_close(flat[:, 0, (h * 5 + w) * 3:(h * 5 + w + 1) * 3], x[:, :, h, w])  # H, W, C
            torch.testing.assert_close(vec[:, h * 5 + w], x[:, :, h, w])  # row-major locations


def test_mean_and_std_against_literal_computation():
    f = rand(2, 3, 8, 12, seed=1) * 2 + 0.5
    mean, std = spatial_mean(f), spatial_std(f)
    assert mean.shape == std.shape == (2, 1, 3)
    for n in range(2):
        for c in range(3):
            vals = f[n, c].flatten().tolist()
            m = sum(vals) / len(vals)
            var = sum((v - m) ** 2 for v in vals) / len(vals)  # population variance
            assert mean[n, 0, c].item() == pytest.approx(m, rel=1e-12)
            assert std[n, 0, c].item() == pytest.approx((var + 1e-6) ** 0.5, rel=1e-12)
    for s in (2, 4):
        mean, std = spatial_mean(f, s), spatial_std(f, s)
        assert mean.shape == std.shape == (2, (8 // s) * (12 // s), 3)
        for i in range(8 // s):
            for j in range(12 // s):
                cell = f[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s].flatten(2)  # (N, C, s*s)
                loc = i * (12 // s) + j
                torch.testing.assert_close(mean[:, loc], cell.mean(-1))
                torch.testing.assert_close(std[:, loc], (cell.var(-1, unbiased=False) + 1e-6).sqrt())


def test_windows_only_when_divisible_and_stats_in_float32():
    keys = dict(tap_sets("t", rand(2, 4, 6, 6).bfloat16(), "a-d"))
    assert list(keys) == ["t", "t_mean", "t_std", "t_mean_2", "t_std_2"]  # 4 does not divide 6
    assert keys["t"].dtype == torch.bfloat16  # vectors keep the map's dtype
    assert all(keys[k].dtype == torch.float32 for k in ("t_mean", "t_std", "t_mean_2", "t_std_2"))
    assert keys["t_mean_2"].shape == (2, 9, 4)


def test_bf16_statistics_share_one_cast_and_each_key_differentiates_alone():
    # FeatureDriftLoss differentiates each key right after computing it, before the next key exists.
    fmap = rand(2, 4, 8, 8, dtype=torch.float32).bfloat16().requires_grad_()
    reference = {"t": location_vectors, "t_mean": spatial_mean, "t_std": spatial_std,
                 "t_mean_2": lambda m: spatial_mean(m, 2), "t_std_2": lambda m: spatial_std(m, 2),
                 "t_mean_4": lambda m: spatial_mean(m, 4), "t_std_4": lambda m: spatial_std(m, 4)}
    casts = []
    for key, v in tap_sets("t", fmap, "a-d"):
        (g,) = torch.autograd.grad(v.float().square().sum(), fmap)
        alone = fmap.detach().requires_grad_()  # the same key from a map of its own
        ref = reference.pop(key)(alone)
        (g_ref,) = torch.autograd.grad(ref.float().square().sum(), alone)
        assert torch.equal(v, ref) and torch.equal(g, g_ref), key
        node = v.grad_fn
        while node is not None and node.name() != "ToCopyBackward0":  # down the first inputs to the cast
            node = node.next_functions[0][0] if node.next_functions else None
        if key != "t":
            casts.append(node)
    assert not reference and len(casts) == 6 and len({id(n) for n in casts}) == 1  # six statistics, one cast


def test_norm_x_rms_and_mean_square():
    x_in = rand(2, 5, 3, 4)
    ms = x_in.square().mean(dim=(2, 3))[:, None, :]
    torch.testing.assert_close(channel_norm(x_in), (ms + 1e-6).sqrt())
    torch.testing.assert_close(channel_norm(x_in, "mean_square"), ms)
    model, keys = latent_keys(FeatureConfig(input_stat="mean_square"), n=1)
    assert keys["norm_x"].shape == (1, 1, 4)
    assert (keys["norm_x"] >= 0).all()


def test_pixel_norm_x_is_over_patchified_channels():
    model = ResNetMAE(ResNetMAEConfig(in_channels=3, image_size=128, patch_size=8, width=4))
    x = rand(1, 3, 128, 128, dtype=torch.float32)
    with torch.no_grad():
        keys = feature_sets(x, model.patchify(x), model.taps(x))
    assert keys["norm_x"].shape == (1, 1, 192) and keys["global"].shape == (1, 1, 128 * 128 * 3)
    # Channel (r, s, C) of the patchified input is pixel (r, s) of each 8x8 patch in colour C.
    torch.testing.assert_close(keys["norm_x"][0, 0, (1 * 8 + 2) * 3 + 1],
                               (x[0, 1, 1::8, 2::8].square().mean() + 1e-6).sqrt())


@pytest.mark.parametrize("preset", ["mae_tiny", "mae_mnist", "mae_cifar"])
def test_every_key_of_the_small_encoders_varies_across_samples(preset):
    # A key that is the same for every sample carries no signal, and its distances are rounding noise that the
    # loss's 1e-4 scale clamp turns into huge gradients. With one channel per GroupNorm group, the spatial mean and
    # std of a stage output were exactly beta and |gamma| (a regression: small generators collapsed).
    torch.manual_seed(0)
    model = resnet_maes[preset]()
    with torch.no_grad():  # trained-like affine parameters, not the (1, 0) initialisation
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
    c = model.cfg
    x = rand(6, c.in_channels, c.image_size, c.image_size, dtype=torch.float32) * 2 - 1
    with torch.no_grad():
        keys = feature_sets(x, model.patchify(x), model.taps(x))
    for name, v in keys.items():
        spread = v.std(dim=0).mean() / v.abs().mean().clamp_min(1e-12)  # across samples, relative to the size
        assert spread > 1e-3, f"{preset}: key {name} is (nearly) the same for every sample ({float(spread):.2e})"
