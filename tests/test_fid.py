"""Tests for drifting.eval.fid, drifting.eval.prdc and drifting.eval.inception (random weights, CPU, no network)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drifting.eval.fid import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    load_stats,
    save_stats,
)
from drifting.eval.inception import (
    FEATURE_DIM,
    BasicConv2d,
    NUM_LOGITS,
    WEIGHTS_ENV,
    InceptionFeatures,
    preprocess,
    resize_bilinear,
)
from drifting.eval.prdc import knn_radii, prdc, precision_recall


def _gaussian(n, mean, std, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.as_tensor(mean, dtype=torch.float64) + torch.randn(n, len(std), generator=g, dtype=torch.float64) * (
        torch.as_tensor(std, dtype=torch.float64)
    )


def _random_spd(d, seed, n=None):
    """Sample covariance of n (default 3d) Gaussian points: SPD, or singular of rank n - 1 when n <= d."""
    x = _gaussian(n or 3 * d, torch.zeros(d), torch.linspace(0.5, 2.0, d), seed)
    return feature_stats(x)


# ---------------------------------------------------------------- feature statistics and FID


def test_feature_stats_matches_numpy_and_chunking():
    x = _gaussian(500, [1.0, -2.0, 3.0, 0.5], [1.0, 2.0, 0.5, 3.0], seed=0).float()
    mu, sigma = feature_stats(x, chunk=37)
    ref = x.double().numpy()
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-12)
    # ndarray input gives the same statistics
    mu2, sigma2 = feature_stats(ref)
    np.testing.assert_allclose(mu2, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["eigh", "eigvals"])
def test_fid_of_identical_sets_is_zero(method):
    mu, sigma = _random_spd(32, seed=1)
    scale = np.trace(sigma)
    assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9 * scale
    x = _gaussian(300, torch.zeros(16), torch.ones(16), seed=2)
    assert abs(fid_from_features(x, x.clone(), method=method)) < 1e-9 * 16


@pytest.mark.parametrize("method", ["eigh", "eigvals"])
def test_fid_closed_form_diagonal_gaussians(method):
    # For diagonal covariances FD = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)).
    rng = np.random.default_rng(3)
    d = 24
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)
    # Rotating both Gaussians by the same orthogonal matrix leaves the distance unchanged.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T, method=method)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_eigh_and_eigvals_agree_and_symmetry():
    mu1, s1 = _random_spd(64, seed=4)
    mu2, s2 = _random_spd(64, seed=5)
    mu2 = mu2 + 0.3
    a = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    b = frechet_distance(mu1, s1, mu2, s2, method="eigvals")
    assert a == pytest.approx(b, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(a, rel=1e-9)
    # Singular covariances (fewer samples than dimensions), the regime the symmetric form is there for.
    mu3, s3 = _random_spd(64, seed=6, n=40)
    mu4, s4 = _random_spd(64, seed=7, n=40)
    c = frechet_distance(mu3, s3, mu4, s4, method="eigh")
    e = frechet_distance(mu3, s3, mu4, s4, method="eigvals")
    assert math.isfinite(c) and c == pytest.approx(e, rel=1e-6)
    # Torch inputs are accepted too.
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(a, rel=1e-12)


def test_fid_bad_inputs():
    mu, sigma = _random_spd(8, seed=8)
    mu6, sigma6 = _random_spd(6, seed=9)
    with pytest.raises(ValueError, match="dimensions differ: 8 vs 6"):
        frechet_distance(mu, sigma, mu6, sigma6)
    with pytest.raises(ValueError, match="sigma must be"):
        frechet_distance(mu, sigma6, mu, sigma)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, sigma, mu, sigma, method="sqrtm")
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(torch.zeros(1, 4))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_limits():
    # Uniform predictions: p(y|x) = p(y) for every x, so every KL is 0 and IS = 1.
    mean, std = inception_score(torch.zeros(100, 1008))
    assert mean == pytest.approx(1.0, abs=1e-10) and std == pytest.approx(0.0, abs=1e-10)
    # Identical confident predictions: also 1.
    same = torch.zeros(50, 10)
    same[:, 3] = 50.0
    assert inception_score(same, splits=5)[0] == pytest.approx(1.0, abs=1e-9)
    # Confident predictions spread evenly over K classes: p(y) uniform, each KL = log K, IS = K.
    k, n = 10, 200
    onehot = 50.0 * F.one_hot(torch.arange(n) % k, k).double()
    assert inception_score(onehot, splits=1)[0] == pytest.approx(k, rel=1e-9)
    # With 10 splits the classes must be spread evenly within every split *after* the fixed permutation: put
    # class j % K at the row that the permutation moves to position j.
    perm = torch.from_numpy(np.random.RandomState(2020).permutation(n))
    balanced = torch.empty_like(onehot)
    balanced[perm] = onehot
    mean, std = inception_score(balanced, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_permutation_is_fixed_and_split_sizes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1003, 20, generator=g) * 3
    assert inception_score(logits) == inception_score(logits.numpy())  # same seed, same splits
    assert inception_score(logits, seed=1) != inception_score(logits)
    # 1003 // 10 = 100 rows per split of the permuted order, the last 3 dropped. IS within a split does not
    # depend on the order of its rows, so each split can be scored on its own.
    permuted = logits[np.random.RandomState(2020).permutation(1003)]
    per_split = [inception_score(permuted[i * 100 : (i + 1) * 100], splits=1)[0] for i in range(10)]
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(np.mean(per_split), rel=1e-12) and std == pytest.approx(np.std(per_split), rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:5], splits=10)


def test_inception_score_reference_formula():
    # Direct float64 evaluation of the same definition on one split.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 7, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(logits, dim=1)
    py = p.mean(dim=0, keepdim=True)
    expected = float(torch.exp((p * (p.log() - py.log())).sum(dim=1).mean()))
    assert inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- reference statistics on disk


def test_stats_npz_round_trip_and_ref_keys(tmp_path):
    mu, sigma = _random_spd(12, seed=10)
    path = save_stats(tmp_path / "ref" / "stats", mu, sigma)
    assert path.name == "stats.npz" and set(np.load(path).files) == {"mu", "sigma"}
    mu2, sigma2 = load_stats(path, dim=12)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # The MeanFlow/JiT layout the authors' ImageNet statistics come in.
    np.savez(tmp_path / "meanflow.npz", ref_mu=mu.astype(np.float32), ref_sigma=sigma)
    mu3, sigma3 = load_stats(tmp_path / "meanflow.npz")
    assert mu3.dtype == np.float64
    np.testing.assert_allclose(mu3, mu, rtol=1e-6)
    # ADM reference batches hold images too (arr_0); mu/sigma are read, the rest ignored.
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma)
    assert load_stats(tmp_path / "adm.npz")[0].shape == (12,)


def test_stats_npz_errors(tmp_path):
    mu, sigma = _random_spd(12, seed=11)
    path = save_stats(tmp_path / "s.npz", mu, sigma)
    with pytest.raises(ValueError, match="dimension 12, expected 2048"):
        load_stats(path, dim=2048)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_stats(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(KeyError, match="arr_0"):
        load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "mismatch.npz", mu=mu, sigma=sigma[:5, :5])
    with pytest.raises(ValueError, match="sigma must be"):
        load_stats(tmp_path / "mismatch.npz")
    with pytest.raises(ValueError, match="sigma must be"):
        save_stats(tmp_path / "x.npz", mu, sigma[:3])


# ---------------------------------------------------------------- precision / recall / density / coverage


def _naive_prdc(real, fake, k):
    """Unchunked reference with exact pairwise distances."""
    real, fake = real.double(), fake.double()
    d_rr = torch.cdist(real, real, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    d_ff = torch.cdist(fake, fake, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    d_fr = torch.cdist(fake, real, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    r_real = (d_rr + torch.diag(torch.full((len(real),), float("inf"), dtype=torch.float64))).kthvalue(k, dim=1).values
    r_fake = (d_ff + torch.diag(torch.full((len(fake),), float("inf"), dtype=torch.float64))).kthvalue(k, dim=1).values
    inside = d_fr <= r_real[None]
    return {
        "precision": float(inside.any(dim=1).double().mean()),
        "recall": float((d_fr <= r_fake[:, None]).any(dim=0).double().mean()),
        "density": float(inside.sum().double() / (k * len(fake))),
        "coverage": float(inside.any(dim=0).double().mean()),
    }


def test_precision_recall_identical_and_disjoint():
    x = _gaussian(300, torch.zeros(8), torch.ones(8), seed=12)
    same = prdc(x, x.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(x, x + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    assert precision_recall(x, x + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_prdc_chunked_equals_unchunked_and_naive():
    real = _gaussian(257, torch.zeros(16), torch.ones(16), seed=13)
    fake = _gaussian(190, torch.full((16,), 0.3), torch.full((16,), 1.3), seed=14).float()
    full = prdc(real, fake, k=3, chunk=10_000)
    assert 0.0 < full["precision"] < 1.0 and 0.0 < full["recall"] < 1.0
    for chunk in (7, 64):
        assert prdc(real, fake, k=3, chunk=chunk) == full
    naive = _naive_prdc(real, fake, 3)
    for key in full:
        assert full[key] == pytest.approx(naive[key], abs=1e-12)


def test_knn_radii_hand_computed():
    # 1-D points 0, 1, 3, 7, k = 2: the 2nd nearest other point of 0 is 3 (squared distance 9), of 1 is 3 (4),
    # of 3 is 0 (9), of 7 is 1 (36).
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    for chunk in (1, 3, 100):
        assert knn_radii(x, k=2, chunk=chunk).tolist() == [9.0, 4.0, 9.0, 36.0]
    # A duplicate is a neighbour at distance 0, the point itself is not.
    assert knn_radii(torch.tensor([[0.0], [0.0], [5.0]]), k=1).tolist() == [0.0, 0.0, 25.0]


def test_prdc_bad_inputs():
    x = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="same dimension"):
        prdc(x, torch.zeros(10, 5))
    with pytest.raises(ValueError, match="more than k = 3"):
        prdc(x, torch.zeros(3, 4))


# ---------------------------------------------------------------- Inception (random weights)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


def test_inception_shapes_and_parameter_count(inception):
    # Backbone parameter count of torchvision's Inception3 without AuxLogits and fc (27,161,264 - 3,326,696 -
    # 2,049,000), plus the 2048 x 1008 bias-free IS head: the channels and kernels are the standard ones.
    assert sum(p.numel() for p in inception.parameters()) == 21_785_568 + 2048 * 1008
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # The forward turns TF32 off for itself only: a training script's settings survive it.
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        pool, logits = inception(images)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
    assert pool.shape == (2, FEATURE_DIM) and logits.shape == (2, NUM_LOGITS)
    assert torch.isfinite(pool).all() and torch.isfinite(logits).all()
    assert (pool >= 0).all() and not torch.allclose(pool[0], pool[1])  # pooled ReLU outputs, images told apart
    assert not any(p.requires_grad for p in inception.parameters())


def test_batch_norm_is_frozen_in_train_mode():
    # `.train()` cannot switch batch norm to batch statistics (features would depend on the batch).
    layer = BasicConv2d(192, 64, 1)
    with torch.no_grad():
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 192, 5, 5)
    expected = layer(x)
    layer.train()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer(x[:1]), expected[:1])


def test_preprocess_resize_and_scale():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # At the target size the identity grid samples pixel centres: only the scaling remains.
    torch.testing.assert_close(preprocess(img, size=8), (img.float() - 128) / 128)
    # Upsampling equals bilinear interpolation with align_corners=False.
    expected = F.interpolate(img.float(), size=(13, 13), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_bilinear(img.float(), 13), expected, rtol=0, atol=1e-3)
    assert preprocess(img).shape == (2, 3, 299, 299)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(img.float())
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        preprocess(img.permute(0, 2, 3, 1))


def test_missing_weights_file_names_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)) as err:
        InceptionFeatures.from_file(missing)
    assert "pytorch-fid" in str(err.value) and WEIGHTS_ENV in str(err.value)
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        InceptionFeatures.from_file()
    monkeypatch.delenv(WEIGHTS_ENV)
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_ENV} is not set"):
        InceptionFeatures.from_file()


def test_load_pytorch_fid_named_state_dict(inception, tmp_path):
    # Write the model's weights the way the pytorch-fid file holds them: nn.BatchNorm2d counters and an fc bias
    # (the torchvision Inception3 it was saved from), under DataParallel's "module." prefix.
    sd = {}
    for key, value in inception.state_dict().items():
        sd["module." + key] = value
        if key.endswith(".bn.running_var"):
            sd["module." + key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    sd["module.fc.bias"] = torch.zeros(NUM_LOGITS)
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(sd, path)
    loaded = InceptionFeatures.from_file(path)
    own = inception.state_dict()
    other = loaded.state_dict()
    assert other.keys() == own.keys()
    assert all(torch.equal(own[k], other[k]) for k in own)
    # A different network's weights (torchvision ImageNet head, aux classifier) are refused with a clear error.
    bad = {k[len("module.") :]: v for k, v in sd.items()}
    bad["fc.weight"] = torch.zeros(1000, FEATURE_DIM)
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    with pytest.raises(ValueError, match="AuxLogits.fc.weight.*fc.weight: \\(1000, 2048\\)"):
        InceptionFeatures(seed=None).load_pytorch_fid_state_dict(bad)
