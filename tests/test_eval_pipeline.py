"""The evaluation pipeline on the synthetic squares: evaluator training and reload, samples to .npz (shapes, balance,
determinism, 2 gloo processes), metrics against a reference (FD(x, x) = 0, real-vs-real accuracy), the guidance
sweep and nearest-neighbour outputs, and clear errors for bad input. CPU, no network, seconds."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from drifting.data.datasets import to_float
from drifting.eval.evaluator import EvaluatorFeatures, load_split, resolve_evaluator, train_evaluator
from drifting.eval.fid import save_stats
from drifting.eval.metrics import (
    build_reference,
    eval_main,
    evaluate,
    load_reference,
    load_samples,
    nearest_neighbours,
    real_floor,
    save_reference,
)
from drifting.eval.sample import load_generator, sample_to_npz
from drifting.train.checkpoint import export_weights
from drifting.train.gen import DataConfig, GenConfig, TrainConfig, main as train_main
from multiproc import free_port, spawn

# The generator of tests/test_train_gen.py: DiT-tiny on 4 classes of 8x8x3 squares, trained 2 steps.
TINY = GenConfig(
    data=DataConfig(synthetic_per_class=32),
    train=TrainConfig(steps=2, classes=4, gen_per_class=4, pos_per_class=4, uncond_per_class=2, log_every=1,
                      queue_per_class=16, queue_uncond=32, push_per_step=16),
)


@pytest.fixture(autouse=True)
def one_thread():
    # These workloads are tiny: with several threads, OpenMP start-up and contention cost more than the work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def evaluator_file(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("evaluator") / "synthetic.pt"
    train_evaluator("synthetic", None, path, seed=0, progress=False)
    return path


@pytest.fixture(scope="module")
def evaluator(evaluator_file):
    return EvaluatorFeatures.load(evaluator_file)


@pytest.fixture(scope="module")
def ema_file(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("gen")
    train_main(TINY, run, progress=False)
    # Two steps leave the EMA output at ~0 (the zero-initialised head), so every sample would be the same grey
    # image. A random head makes the samples depend on the noise, which the determinism tests need.
    state = torch.load(run / "ema.pt", weights_only=True)
    head = state["model"]["final_linear.weight"]
    state["model"]["final_linear.weight"] = 0.5 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
    export_weights(run / "ema.pt", state["model"], state["config"], meta=state["meta"])
    return run / "ema.pt"


@pytest.fixture(scope="module")
def reference(evaluator):
    return build_reference(evaluator, load_split("synthetic", "train")[0])


def write_npz(path, images, labels=None, **extra):
    arrays = {"images": np.asarray(images), **extra}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------------- evaluator


def test_evaluator_trains_saves_and_reloads(evaluator_file, evaluator, tmp_path):
    meta = json.loads(evaluator_file.with_suffix(".json").read_text())
    assert meta["meta"]["test_accuracy"] >= 0.95  # the squares are separable by position and colour
    assert meta["config"]["seed"] == 0 and meta["config"]["dataset"] == "synthetic"
    assert evaluator_file.stat().st_size < 10 * 2**20
    assert evaluator.name == "cnn-synthetic" and evaluator.shape == (3, 8, 8) and evaluator.num_classes == 4
    assert evaluator.digest == meta["meta"]["digest"]
    # uint8 and [-1, 1] floats are the same images; features and logits come in pairs of the right widths
    images = load_split("synthetic", "test")[0][:16]
    f8, l8 = evaluator(images)
    ff, lf = evaluator(to_float(images))
    assert f8.shape == (16, evaluator.feature_dim) and l8.shape == (16, 4)
    torch.testing.assert_close(f8, ff, rtol=0, atol=0)
    # the fixed recipe and seed reproduce the weights bit for bit on a CPU
    again = train_evaluator("synthetic", None, tmp_path / "again.pt", seed=0, progress=False)
    assert again["digest"] == evaluator.digest
    assert train_evaluator("synthetic", None, tmp_path / "other.pt", seed=1, progress=False)["digest"] != again[
        "digest"]


def test_evaluator_rejects_bad_images(evaluator):
    with pytest.raises(ValueError, match=r"takes \[N, 3, 8, 8\]"):
        evaluator(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        evaluator(torch.full((2, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="uint8"):
        evaluator(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(FileNotFoundError, match="train-evaluator"):
        EvaluatorFeatures.load("/nonexistent/evaluator.pt")
    with pytest.raises(FileNotFoundError):
        resolve_evaluator("imagenet-21k")


# ---------------------------------------------------------------------------------------------------- sampling


def test_load_generator_rebuilds_the_exported_model(ema_file):
    model = load_generator(ema_file)
    saved = torch.load(ema_file, weights_only=True)["model"]
    assert model.num_classes == 4 and tuple(model.noise_shape) == (3, 8, 8)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    with pytest.raises(FileNotFoundError):
        load_generator(ema_file.parent / "missing.pt")


def test_sample_to_npz_shapes_balance_determinism(ema_file, tmp_path):
    model = load_generator(ema_file)
    a = sample_to_npz(model, tmp_path / "a.npz", num_per_class=5, alpha=1.5, seed=3, batch=7)
    with np.load(a) as f:
        images, labels = f["images"], f["labels"]
        assert float(f["alpha"]) == 1.5 and int(f["seed"]) == 3
    assert images.shape == (20, 3, 8, 8) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [5, 5, 5, 5]
    assert labels[:4].tolist() == [0, 1, 2, 3]  # interleaved: every prefix is balanced
    assert a.with_suffix(".png").is_file()
    # same seed: same samples, whatever the batch size (noise comes in fixed per-index blocks)
    b = sample_to_npz(model, tmp_path / "b.npz", num_per_class=5, alpha=1.5, seed=3, batch=20, grid=False)
    with np.load(b) as f:
        assert np.abs(f["images"].astype(int) - images.astype(int)).max() <= 1  # equal up to rounding of batch sizes
        assert (f["images"] == images).mean() > 0.99
    c = sample_to_npz(model, tmp_path / "c.npz", num_per_class=5, alpha=1.5, seed=4, batch=7, grid=False)
    with np.load(c) as f:
        assert not np.array_equal(f["images"], images)
    # a list of classes, each num_per_class times
    d = sample_to_npz(model, tmp_path / "d.npz", num_per_class=3, classes=[2, 0], grid=False)
    with np.load(d) as f:
        assert f["labels"].tolist() == [2, 0, 2, 0, 2, 0]
    with pytest.raises(ValueError, match="alpha"):
        sample_to_npz(model, tmp_path / "e.npz", num_per_class=1, alpha=0.5)
    with pytest.raises(ValueError, match="classes"):
        sample_to_npz(model, tmp_path / "e.npz", num_per_class=1, classes=[4])


def _sample_worker(rank: int, world: int, port: int, ema: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from drifting.eval.sample import sample_main

    sample_main(ema, out, num_per_class=3, alpha=1.0, seed=5, batch=4)


def test_two_gloo_processes_write_the_single_process_samples(ema_file, tmp_path):
    single = sample_to_npz(load_generator(ema_file), tmp_path / "one.npz", num_per_class=3, seed=5, batch=4)
    spawn(_sample_worker, 2, free_port(), str(ema_file), str(tmp_path / "two.npz"))
    with np.load(single) as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["labels"], b["labels"])
        assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------------- metrics


def test_fd_of_a_set_with_itself_is_zero_and_precision_recall_one(evaluator, tmp_path):
    images, labels = load_split("synthetic", "test")
    ref = build_reference(evaluator, images)
    m = evaluate(write_npz(tmp_path / "s.npz", images, labels), ref, evaluator)
    assert abs(m["fd"]) < 1e-9 * max(1.0, float(np.trace(ref.sigma)))
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["n"] == len(images) and m["fd_name"] == "FD-cnn-synthetic"


def test_real_test_split_against_training_split(evaluator_file, evaluator, reference, tmp_path):
    images, labels = load_split("synthetic", "test")
    m = evaluate(write_npz(tmp_path / "test.npz", images, labels), reference, evaluator_file)
    assert m["accuracy"] >= 0.95
    assert 0 <= m["fd"] < 1.0 * float(np.trace(reference.sigma))  # same distribution: small against the spread
    assert 0.5 < m["precision"] <= 1 and 0.5 < m["recall"] <= 1
    assert 1 <= m["is"] <= 4  # K = 4 classes
    # the same numbers from real_floor, and through a reference file
    path = save_reference(reference, tmp_path / "ref.npz")
    floor = real_floor("synthetic", evaluator, reference=path)
    for key in ("fd", "accuracy", "is", "precision", "recall"):
        assert floor[key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key


def test_generated_samples_give_finite_metrics(ema_file, evaluator, reference, tmp_path):
    npz = sample_to_npz(load_generator(ema_file), tmp_path / "g.npz", num_per_class=8, grid=False)
    m = evaluate(npz, reference, evaluator)
    assert m["n"] == 32
    for key in ("fd", "accuracy", "is", "is_std", "precision", "recall"):
        assert np.isfinite(m[key]), key
    assert 0 <= m["accuracy"] <= 1 and 1 <= m["is"] <= 4


def test_nearest_neighbour_of_a_training_image_is_itself(evaluator, tmp_path):
    train, labels = load_split("synthetic", "train")
    picks = torch.tensor([0, 300, 600, 900])  # one image of each class
    out = nearest_neighbours(train[picks], labels[picks], train, evaluator, tmp_path / "nn.png", num=4, k=3)
    assert [row[0] for row in out["train_index"]] == picks.tolist()
    assert all(row[0] < 1e-4 < row[1] for row in out["distance"])  # 0 up to the rounding of batch sizes
    assert (tmp_path / "nn.png").is_file()


def test_eval_main_sweep_writes_json_table_plot_and_panel(ema_file, evaluator_file, tmp_path):
    summary = eval_main(evaluator=str(evaluator_file), ema=str(ema_file), alphas="1.0,2.0", num_per_class=4,
                        out=str(tmp_path), floor=True, neighbours=4)
    for name in ("metrics.json", "metrics.md", "sweep.json", "sweep.md", "sweep.png", "nearest_neighbours.png",
                 "reference-cnn-synthetic.npz", "samples_a1.npz", "samples_a2.npz", "samples_a1.png"):
        assert (tmp_path / name).is_file(), name
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert [r.get("alpha") for r in rows] == [None, 1.0, 2.0]  # the real floor first, then the sweep
    assert "FD-cnn-synthetic" in (tmp_path / "metrics.md").read_text()
    assert summary["reference"]["count"] == 1024
    # a second run reads the cached reference, and evaluates sample files
    again = eval_main([str(tmp_path / "samples_a1.npz")], evaluator=str(evaluator_file), out=str(tmp_path))
    assert again["rows"][0]["fd"] == pytest.approx(rows[1]["fd"], rel=1e-12)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((8, 3, 8, 8), np.uint8), None, "labels missing"),
        (np.zeros((8, 1, 8, 8), np.uint8), np.zeros(8, int), r"takes \(3, 8, 8\)"),
        (np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, int), "NHWC"),
        (np.zeros((8, 3, 8), np.uint8), np.zeros(8, int), r"\[N, C, H, W\]"),
        (np.full((8, 3, 8, 8), 1.5, np.float32), np.zeros(8, int), r"in \[-1, 1\]"),
        (np.full((8, 3, 8, 8), 0.5, np.float32), np.zeros(8, int), r"\[0, 1\] images"),
        (np.zeros((8, 3, 8, 8), np.int32), np.zeros(8, int), "uint8"),
        (np.zeros((8, 3, 8, 8), np.uint8), np.zeros(7, int), "one per image"),
        (np.zeros((8, 3, 8, 8), np.uint8), np.full(8, 4), r"labels must be in \[0, 4\)"),
    ],
)
def test_bad_samples_fail_with_a_clear_message(evaluator, reference, tmp_path, images, labels, message):
    path = write_npz(tmp_path / "bad.npz", images, labels)
    with pytest.raises(ValueError, match=message):
        evaluate(path, reference, evaluator)


def test_float_samples_in_range_are_accepted(evaluator, tmp_path):
    images, labels = load_split("synthetic", "test")
    a, _ = load_samples(write_npz(tmp_path / "f.npz", to_float(images).numpy(), labels), evaluator)
    assert torch.equal(a, images)


def test_reference_of_another_dimension_or_evaluator_is_rejected(evaluator, reference, tmp_path):
    images, labels = load_split("synthetic", "test")
    samples = write_npz(tmp_path / "s.npz", images, labels)
    other = save_stats(tmp_path / "other.npz", np.zeros(7), np.eye(7))
    with pytest.raises(ValueError, match="dimension 7"):
        evaluate(samples, other, evaluator)
    moved = save_reference(replace(reference, digest="0123456789abcdef"), tmp_path / "moved.npz")
    with pytest.raises(ValueError, match="recompute"):
        load_reference(moved, evaluator)
    # statistics from elsewhere (mu/sigma only) still give FD, without precision/recall
    plain = save_stats(tmp_path / "plain.npz", reference.mu, reference.sigma)
    m = evaluate(samples, plain, evaluator)
    assert np.isfinite(m["fd"]) and m["precision"] is None
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "missing.npz", reference, evaluator)
