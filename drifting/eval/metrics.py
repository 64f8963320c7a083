"""`drifting eval`: samples `.npz` + reference statistics + an evaluator -> one JSON of every metric.

In the feature space of a project-trained evaluator (`eval/evaluator.py`), against the reference set, which is the
evaluator's training split:

    fd         FD-<evaluator>: Frechet distance of the Gaussian fits, float64, symmetric matrix square root (fid.py)
    accuracy   fraction of samples the evaluator classifies as their requested label
    is, is_std the Inception-Score analogue exp(E KL(p(y|x) || p(y))) of the evaluator's logits, 10 splits (fewer
               below 1,000 samples: at least 100 per split); between 1 and the number of classes
    precision, recall   Kynkaanniemi et al. with k = 3 (prdc.py), against a fixed random subset of the reference
               features (`pr_size`, 10,000 by default: the k-NN radii depend on set sizes, so compare runs with the
               same number of samples; the paper's protocol and `real_floor` use 10,000)

`real_floor(dataset)` gives the same metrics for the real test split: the floor (FD) and ceiling (accuracy, IS,
precision, recall) any generator is compared with. `guidance_sweep` samples and evaluates a list of guidance scales
and writes the table and the paper's Figure 5 style plot (FD vs alpha, IS vs alpha, IS vs FD); `nearest_neighbours`
draws Figure 6's panel: generated samples next to their nearest training images in evaluator features.

Metrics are pure functions of features (`feature_metrics`), reference statistics are cached `.npz` files (keys `mu`,
`sigma` as in the ADM layout, plus the precision/recall subset and the evaluator's digest), and bad input fails
early with a message: samples of the wrong shape, dtype or range, missing labels, statistics of another dimension or
of another evaluator. Evaluation runs in one process (sampling can use DDP: `drifting sample` under torchrun).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from drifting.eval.evaluator import EvaluatorFeatures, load_split, resolve_evaluator
from drifting.eval.fid import feature_stats, frechet_distance, inception_score, load_stats
from drifting.eval.prdc import precision_recall
from drifting.eval.sample import load_generator, sample_to_npz, save_png

__all__ = [
    "Reference", "build_reference", "save_reference", "load_reference", "load_samples", "feature_metrics",
    "evaluate", "real_floor", "guidance_sweep", "write_table", "plot_sweep", "nearest_neighbours", "eval_main",
]

METRICS = ("fd", "is", "is_std", "accuracy", "precision", "recall", "n")


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """A real image set in an evaluator's feature space."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    features: np.ndarray | None  # [M, D] float32, a fixed random subset for precision/recall (None: no PR)
    count: int  # images behind mu and sigma
    evaluator: str = ""  # the evaluator's name
    digest: str = ""  # the evaluator's weights digest ("" when unknown, e.g. statistics written elsewhere)
    dataset: str = ""


def build_reference(evaluator: EvaluatorFeatures, images: Tensor, *, pr_size: int = 10_000, seed: int = 0,
                    batch: int = 500, dataset: str = "") -> Reference:
    """Statistics of uint8 images [N, C, H, W]; precision/recall keep min(pr_size, N) features picked by `seed`."""
    feats, _ = evaluator.extract(images, batch)
    mu, sigma = feature_stats(feats)
    keep = np.sort(np.random.RandomState(seed).permutation(len(feats))[:pr_size])
    return Reference(mu, sigma, feats[torch.from_numpy(keep)].numpy(), len(feats), evaluator.name, evaluator.digest,
                     dataset or evaluator.recipe.dataset)


def save_reference(ref: Reference, path: str | os.PathLike) -> Path:
    """Write to an .npz: mu, sigma (the ADM keys, so `fid.load_stats` reads it), pr_features and provenance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"pr_features": ref.features} if ref.features is not None else {}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=ref.mu, sigma=ref.sigma, count=np.int64(ref.count), evaluator=np.str_(ref.evaluator),
             digest=np.str_(ref.digest), dataset=np.str_(ref.dataset), **extra)
    os.replace(tmp, path)
    return path


def load_reference(path: str | os.PathLike, evaluator: EvaluatorFeatures | None = None) -> Reference:
    """Read a reference .npz (ours, or any with mu/sigma or ref_mu/ref_sigma); checked against `evaluator`."""
    mu, sigma = load_stats(path, dim=evaluator.feature_dim if evaluator is not None else None)
    with np.load(path, allow_pickle=False) as data:
        features = data["pr_features"].astype(np.float32) if "pr_features" in data.files else None
        text = {k: str(data[k]) if k in data.files else "" for k in ("evaluator", "digest", "dataset")}
        count = int(data["count"]) if "count" in data.files else 0
    ref = Reference(mu, sigma, features, count, text["evaluator"], text["digest"], text["dataset"])
    if evaluator is not None:
        _check_reference(ref, evaluator, source=str(path))
    return ref


def _check_reference(ref: Reference, evaluator: EvaluatorFeatures, source: str = "reference") -> None:
    d = evaluator.feature_dim
    if ref.mu.shape != (d,) or ref.sigma.shape != (d, d):
        raise ValueError(f"{source}: statistics of dimension {ref.mu.shape[0]}, but the {evaluator.name} evaluator's "
                         f"features are {d}-d: they were computed with another feature extractor")
    if ref.features is not None and (ref.features.ndim != 2 or ref.features.shape[1] != d):
        raise ValueError(f"{source}: precision/recall features of shape {ref.features.shape}, expected [M, {d}]")
    if ref.digest and ref.digest != evaluator.digest:
        raise ValueError(f"{source}: computed with evaluator {ref.evaluator} (weights {ref.digest}), not with "
                         f"{evaluator.name} (weights {evaluator.digest}); recompute it (delete the file)")


def _as_reference(reference: Reference | str | os.PathLike, evaluator: EvaluatorFeatures) -> Reference:
    if isinstance(reference, Reference):
        _check_reference(reference, evaluator)
        return reference
    return load_reference(reference, evaluator)


def _as_evaluator(evaluator: EvaluatorFeatures | str | os.PathLike, device=None) -> EvaluatorFeatures:
    if not isinstance(evaluator, EvaluatorFeatures):
        evaluator = EvaluatorFeatures.load(resolve_evaluator(evaluator))
    return evaluator.to(device) if device is not None else evaluator


# ---------------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------------


def load_samples(path: str | os.PathLike, evaluator: EvaluatorFeatures | None = None) -> tuple[Tensor, Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) from a samples .npz, checked (against `evaluator` if given).

    `images` may be uint8 (0..255) or floats in [-1, 1] (converted to uint8 by rounding, as `sample_to_npz` does).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data.files:
            raise ValueError(f"{path}: no 'images' array (found {sorted(data.files)}); write samples with "
                             "drifting.eval.sample.sample_to_npz (images uint8 [N, C, H, W], labels [N])")
        if "labels" not in data.files:
            raise ValueError(f"{path}: labels missing: accuracy needs the requested class of each sample "
                             "(an int array 'labels' [N] beside 'images')")
        images, labels = data["images"], data["labels"]
    if images.ndim != 4:
        raise ValueError(f"{path}: images must be [N, C, H, W], got shape {images.shape}")
    if evaluator is not None and tuple(images.shape[1:]) != evaluator.shape:
        nhwc = tuple(images.shape[1:]) == (evaluator.shape[1], evaluator.shape[2], evaluator.shape[0])
        raise ValueError(f"{path}: images of shape {images.shape[1:]}, but the {evaluator.name} evaluator takes "
                         f"{evaluator.shape} (C, H, W)" + (": these look NHWC, transpose to NCHW" if nhwc else ""))
    if images.dtype == np.uint8:
        pixels = torch.from_numpy(images)
    elif images.dtype.kind == "f":
        x = torch.from_numpy(images.astype(np.float32))
        if not bool(torch.isfinite(x).all()) or x.min() < -1 or x.max() > 1:
            raise ValueError(f"{path}: float images must be finite and in [-1, 1], got range "
                             f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
        if x.numel() and x.min() >= 0:
            raise ValueError(f"{path}: float images are all >= 0: [0, 1] images? expected [-1, 1] (x * 2 - 1) "
                             "or uint8 pixels")
        pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    else:
        raise ValueError(f"{path}: images must be uint8 pixels or floats in [-1, 1], got dtype {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be {len(images)} integers (one per image), got {labels.dtype} "
                         f"{labels.shape}")
    k = evaluator.num_classes if evaluator is not None else None
    if len(labels) and (labels.min() < 0 or (k is not None and labels.max() >= k)):
        raise ValueError(f"{path}: labels must be in [0, {k}), got [{labels.min()}, {labels.max()}]")
    return pixels, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------


def feature_metrics(features: Tensor, logits: Tensor, labels: Tensor, ref: Reference, *, k: int = 3,
                    splits: int = 10) -> dict:
    """All metrics of generated features [N, D], logits [N, K] and requested labels [N] against `ref`."""
    n = len(features)
    if n < max(2, k + 1):
        raise ValueError(f"need at least {max(2, k + 1)} samples for the statistics and k-NN radii, got {n}")
    mu, sigma = feature_stats(features)
    out = {
        "fd": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "accuracy": float((logits.argmax(1) == labels).double().mean()),
    }
    # A split needs many samples for its p(y) to mean anything (a split of one sample scores exactly 1), so small
    # sets use fewer splits: at least 100 samples each.
    out["is"], out["is_std"] = inception_score(logits, splits=max(1, min(splits, n // 100)))
    if ref.features is not None:
        out.update(precision_recall(torch.from_numpy(ref.features), features.float(), k=k))
    else:  # statistics without features (e.g. written by another tool): no manifold to compare against
        out.update(precision=None, recall=None)
    out["n"] = n
    return out


def evaluate(samples_npz: str | os.PathLike, reference: Reference | str | os.PathLike,
             evaluator: EvaluatorFeatures | str | os.PathLike, *, k: int = 3, splits: int = 10, batch: int = 500,
             device: str | torch.device | None = None) -> dict:
    """Metrics of a samples .npz against a reference (object or .npz) in an evaluator's (object, file or dataset name)
    features: {"fd", "accuracy", "is", "is_std", "precision", "recall", "n", "evaluator", "fd_name"}."""
    evaluator = _as_evaluator(evaluator, device)
    ref = _as_reference(reference, evaluator)
    images, labels = load_samples(samples_npz, evaluator)
    feats, logits = evaluator.extract(images, batch)
    return {**feature_metrics(feats, logits, labels, ref, k=k, splits=splits), "evaluator": evaluator.name,
            "fd_name": f"FD-{evaluator.name}"}


def real_floor(dataset: str, evaluator: EvaluatorFeatures | str | os.PathLike | None = None, *,
               data: str | os.PathLike | None = None, reference: Reference | str | os.PathLike | None = None,
               k: int = 3, splits: int = 10, batch: int = 500, device: str | torch.device | None = None) -> dict:
    """The metrics of the real test split against the training split (reference), in the dataset's evaluator.

    evaluator: default `resolve_evaluator(dataset)`; data: the dataset path (default: the registry's search path);
    reference: precomputed training-split statistics (default: computed here).
    """
    evaluator = _as_evaluator(evaluator if evaluator is not None else dataset, device)
    if reference is None:
        reference = build_reference(evaluator, load_split(dataset, "train", data)[0], batch=batch, dataset=dataset)
    ref = _as_reference(reference, evaluator)
    images, labels = load_split(dataset, "test", data)
    feats, logits = evaluator.extract(images, batch)
    return {**feature_metrics(feats, logits, labels, ref, k=k, splits=splits), "evaluator": evaluator.name,
            "fd_name": f"FD-{evaluator.name}"}


# ---------------------------------------------------------------------------------------------------------------------
# Guidance sweep: table and Figure 5
# ---------------------------------------------------------------------------------------------------------------------


def guidance_sweep(model: torch.nn.Module, alphas: Sequence[float], out_dir: str | os.PathLike, *,
                   evaluator: EvaluatorFeatures, reference: Reference, num_per_class: int = 1000, seed: int = 0,
                   batch: int = 500, device: str | torch.device | None = None, floor: dict | None = None) -> list[dict]:
    """Sample and evaluate each guidance scale: one row per alpha, also written to out_dir as sweep.json, sweep.md
    and (two or more alphas) the Figure 5 plot sweep.png. Samples go to out_dir/samples_a<alpha>.npz (and .png).

    `floor` (a `real_floor` row) is drawn as dashed lines in the plot.
    """
    out_dir = Path(out_dir)
    rows = []
    for alpha in alphas:
        npz = sample_to_npz(model, out_dir / f"samples_a{alpha:g}.npz", num_per_class=num_per_class,
                            alpha=float(alpha), seed=seed, batch=batch, device=device)
        rows.append({"name": npz.name, "alpha": float(alpha), **evaluate(npz, reference, evaluator, batch=batch)})
    fd_name = f"FD-{evaluator.name}"
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_table(rows, out_dir / "sweep.md", fd_name=fd_name)
    if len(rows) >= 2:
        plot_sweep(rows, out_dir / "sweep.png", fd_name=fd_name, floor=floor)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def write_table(rows: list[dict], path: str | os.PathLike, *, fd_name: str = "FD") -> Path:
    """A markdown table of the rows (name, alpha if any, FD, IS, accuracy, precision, recall, n)."""
    has_alpha = any("alpha" in r for r in rows)
    cols = ["name"] + (["alpha"] if has_alpha else []) + list(METRICS)
    head = ["samples"] + (["alpha"] if has_alpha else []) + [fd_name, "IS", "IS std", "accuracy", "precision",
                                                              "recall", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_sweep(rows: list[dict], path: str | os.PathLike, *, fd_name: str = "FD", floor: dict | None = None) -> Path:
    """The paper's Figure 5 layout: FD vs alpha, IS vs alpha, IS vs FD (points labelled by alpha); PNG.

    `floor` (a `real_floor` row) draws the real test split's FD and IS as dashed lines.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg on savefig

    rows = sorted((r for r in rows if "alpha" in r), key=lambda r: r["alpha"])
    if not rows:
        raise ValueError("plot_sweep: no rows with an 'alpha'")
    a = [r["alpha"] for r in rows]
    fd = [r["fd"] for r in rows]
    inc = [r["is"] for r in rows]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_fd, ax_is, ax_tr = fig.subplots(1, 3)
    ax_fd.plot(a, fd, "o-")
    ax_fd.set(xlabel="guidance scale alpha", ylabel=fd_name, title=f"{fd_name} vs alpha")
    ax_is.plot(a, inc, "o-", color="C1")
    ax_is.set(xlabel="guidance scale alpha", ylabel="IS (evaluator)", title="IS vs alpha")
    ax_tr.plot(fd, inc, "o-", color="C2")
    for x, y, s in zip(fd, inc, a):
        ax_tr.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_tr.set(xlabel=fd_name, ylabel="IS (evaluator)", title="IS vs " + fd_name)
    if floor is not None:
        for ax, key in ((ax_fd, "fd"), (ax_is, "is")):
            ax.axhline(floor[key], ls="--", color="gray", label="real test split")
            ax.legend(fontsize=8)
        ax_tr.axvline(floor["fd"], ls="--", color="gray")
        ax_tr.axhline(floor["is"], ls="--", color="gray")
    for ax in (ax_fd, ax_is, ax_tr):
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Nearest neighbours: Figure 6
# ---------------------------------------------------------------------------------------------------------------------


def nearest_neighbours(images: Tensor, labels: Tensor, train_images: Tensor, evaluator: EvaluatorFeatures,
                       out_png: str | os.PathLike, *, num: int = 8, k: int = 5, batch: int = 500,
                       train_features: Tensor | None = None) -> dict:
    """Figure 6: `num` generated samples (one per class in turn), each next to its k nearest training images.

    Nearness is Euclidean distance in the evaluator's penultimate features (the space of FD and precision/recall).
    Rows of the PNG: the sample, a white gap, its neighbours nearest first. Returns {"sample_index" [num],
    "train_index" [num][k], "distance" [num][k]}. Pass `train_features` [M, D] to skip recomputing them.
    """
    classes = torch.unique(labels).tolist()
    picked, seen = [], {c: 0 for c in classes}
    for j in range(min(num, len(images))):  # one per class in turn: classes[j % K], its (j // K)-th sample
        c = classes[j % len(classes)]
        idx = torch.nonzero(labels == c).flatten()
        if seen[c] < len(idx):
            picked.append(int(idx[seen[c]]))
            seen[c] += 1
    queries, _ = evaluator.extract(images[picked], batch)  # (num, D)
    if train_features is None:
        train_features, _ = evaluator.extract(train_images, batch)  # (M, D)
    if len(train_features) != len(train_images):
        raise ValueError(f"train_features has {len(train_features)} rows for {len(train_images)} train images")
    # Coordinate differences, not the |a|^2 + |b|^2 - 2ab shortcut: a copy of a training image is at distance ~0.
    d = torch.cdist(queries.double(), train_features.double(), compute_mode="donot_use_mm_for_euclid_dist")  # (num, M)
    dist, nn_idx = d.topk(min(k, d.shape[1]), dim=1, largest=False)  # (num, k)

    _, c, h, w = images.shape
    gap = torch.full((c, h, max(2, w // 4)), 255, dtype=torch.uint8)
    rows = [torch.cat([images[i], gap, *train_images[nn_idx[r]]], dim=2) for r, i in enumerate(picked)]  # (C, H, .)
    panel = torch.cat([torch.cat([row, torch.full((c, max(1, h // 8), row.shape[2]), 255, dtype=torch.uint8)], 1)
                       for row in rows], dim=1)  # (C, rows * (H + sep), W_row)
    save_png(panel.permute(1, 2, 0), out_png, scale=max(1, 64 // h))
    return {"sample_index": picked, "train_index": nn_idx.tolist(), "distance": dist.tolist()}


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def _parse_alphas(alphas: str | Sequence[float] | None) -> list[float]:
    if alphas is None:
        return [1.0]
    if isinstance(alphas, str):
        try:
            alphas = [float(a) for a in alphas.split(",") if a.strip()]
        except ValueError:
            raise ValueError(f"alphas: expected comma-separated numbers such as 1.0,1.5,2.0, got {alphas!r}") from None
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (math.isfinite(a) and a >= 1) for a in alphas):
        raise ValueError(f"alphas: expected guidance scales >= 1, got {alphas}")
    return alphas


def eval_main(
    samples: Sequence[str] = (),
    *,
    evaluator: str,
    ref: str | None = None,
    data: str | None = None,
    ema: str | None = None,
    alphas: str | Sequence[float] | None = None,
    num_per_class: int = 1000,
    seed: int = 0,
    batch: int = 500,
    out: str | None = None,
    floor: bool = False,
    neighbours: int = 0,
    device: str | None = None,
) -> dict:
    """`drifting eval`: metrics of sample files and/or a guidance sweep of a generator; writes out/metrics.json.

    Args:
        samples: .npz files to evaluate (from `drifting sample`).
        evaluator: an evaluator file, or a dataset name (its default file, see `resolve_evaluator`).
        ref: reference statistics .npz: read if it exists (checked against the evaluator), else computed from the
            evaluator's training split and written there. Default: out/reference-<evaluator>.npz.
        data: the dataset file or folder (default: the registry's search path); for the reference, the floor and
            the nearest-neighbour panel.
        ema: a generator export (`ema.pt`) to sample at each of `alphas` (default 1.0) with num_per_class and seed.
        alphas: "1.0,1.5,2.0" or a list; with two or more, the Figure 5 plot out/sweep.png is drawn.
        out: output folder (default: beside the first samples file, else <ema dir>/eval).
        floor: also evaluate the real test split (`real_floor`) as the first row.
        neighbours: draw out/nearest_neighbours.png for this many samples (0: off) of the first samples file, or of
            the best-FD alpha of the sweep.
        device: None picks cuda when available.
    Returns {"evaluator": {...}, "reference": {...}, "rows": [one dict of metrics per row]}.
    """
    if not samples and ema is None and not floor:
        raise ValueError("nothing to evaluate: give samples .npz files, ema (a generator to sweep), or floor")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ev = _as_evaluator(evaluator, dev)
    dataset = ev.recipe.dataset
    if out is None:
        out = Path(samples[0]).parent if samples else Path(ema).parent / "eval" if ema else Path("runs/eval") / dataset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # Reference: read, or computed once from the training split and cached.
    ref_path = Path(ref) if ref is not None else out / f"reference-{ev.name}.npz"
    train_images = None
    if ref_path.is_file():
        reference = load_reference(ref_path, ev)
    else:
        train_images = load_split(dataset, "train", data)[0]
        reference = build_reference(ev, train_images, batch=batch, dataset=dataset)
        save_reference(reference, ref_path)

    rows: list[dict] = []
    floor_row = None
    if floor:
        floor_row = {"name": f"real {dataset} test split", **real_floor(dataset, ev, data=data, reference=reference,
                                                                         batch=batch)}
        rows.append(floor_row)
    for s in samples:
        rows.append({"name": Path(s).name, **evaluate(s, reference, ev, batch=batch)})
    sweep: list[dict] = []
    if ema is not None:
        model = load_generator(ema, device=dev)
        sweep = guidance_sweep(model, _parse_alphas(alphas), out, evaluator=ev, reference=reference,
                               num_per_class=num_per_class, seed=seed, batch=batch, floor=floor_row)
        rows.extend(sweep)

    fd_name = f"FD-{ev.name}"
    summary = {
        "evaluator": {"name": ev.name, "digest": ev.digest, "test_accuracy": ev.meta.get("test_accuracy"),
                      "feature_dim": ev.feature_dim},
        "reference": {"file": str(ref_path), "dataset": reference.dataset or dataset, "count": reference.count,
                      "pr_size": None if reference.features is None else len(reference.features)},
        "rows": rows,
    }
    if neighbours:
        source = Path(samples[0]) if samples else (out / min(sweep, key=lambda r: r["fd"])["name"] if sweep else None)
        if source is not None:
            if train_images is None:
                train_images = load_split(dataset, "train", data)[0]
            images, labels = load_samples(source, ev)
            summary["nearest_neighbours"] = {"samples": str(source), **nearest_neighbours(
                images, labels, train_images, ev, out / "nearest_neighbours.png", num=neighbours, batch=batch)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_table(rows, out / "metrics.md", fd_name=fd_name)
    print(Path(out / "metrics.md").read_text(), end="")
    print(f"wrote {out}/metrics.json, metrics.md" + (", sweep.json, sweep.md, sweep.png" if len(sweep) >= 2 else "")
          + (", nearest_neighbours.png" if "nearest_neighbours" in summary else ""))
    return summary
