"""Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020) from k-NN balls.

Each point x of a set gets a ball of radius r_k(x), the distance to its k-th nearest neighbour in its own set
(itself excluded). The union of the balls estimates the set's manifold. With real features R (the reference) and
generated features F:

    precision = fraction of f in F inside some real ball              (are samples realistic?)
    recall    = fraction of r in R inside some generated ball         (is the real data covered by the samples?)
    density   = (1 / (k |F|)) sum_f #{real balls containing f}        (precision that counts overlaps; ~1 at F = R)
    coverage  = fraction of r in R whose own ball contains some f     (recall that uses only real balls)

Membership is ||f - r||^2 <= r_k(r)^2 with squared Euclidean distances, as in the ADM evaluator the authors use
(k = 3). Naeem et al. write strict inequalities for density and coverage; the two differ only on exact ties.

All distances are computed in float64 on the features' device, `chunk` x `chunk` pairs at a time: 10,000 x 10,000
features of dimension 2048 need a few blocks of 32 MB, never the 800 MB full matrix. Chunking changes nothing but
memory: every pair's distance is compared on its own, so the result does not depend on `chunk`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["knn_radii", "prdc", "precision_recall"]


def _check(real: Tensor, fake: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Validate real [N, D], fake [M, D], 1 <= k < min(N, M); return both as float64 on real's device."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    for name, t in (("real", real), ("fake", fake)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [points, dim], got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D [points, dim], got shape {tuple(t.shape)}")
        if t.shape[0] <= k:
            raise ValueError(f"{name} needs more than k = {k} points for k-NN radii, got {t.shape[0]}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake features must have the same dimension, got {real.shape[1]} and {fake.shape[1]}"
        )
    if real.device != fake.device:
        raise ValueError(f"real and fake must be on the same device, got {real.device} and {fake.device}")
    return real.detach().double(), fake.detach().double()


def _sq_dists(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """Squared distances [p, q] between rows of a [p, D] and b [q, D], given their squared norms."""
    # ||a||^2 + ||b||^2 - 2 a.b needs no [p, q, D] intermediate; rounding can make it slightly negative.
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii(x: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """Squared distance from each row of x [N, D] to its k-th nearest other row: [N] float64.

    Duplicates count as neighbours at distance 0; the point itself does not.
    """
    x = x.detach().double()
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    x_sq = (x * x).sum(dim=1)
    radii = torch.empty(n, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        rows = slice(i, min(i + chunk, n))
        # Running k smallest distances of each row, merged block by block.
        best = torch.full((rows.stop - i, k), float("inf"), dtype=torch.float64, device=x.device)
        for j in range(0, n, chunk):
            cols = slice(j, min(j + chunk, n))
            d = _sq_dists(x[rows], x[cols], x_sq[rows], x_sq[cols])  # (p, q)
            # Exclude the point itself: global index r sits at (r - i, r - j) in this block.
            lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
            if lo < hi:
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - i, idx - j] = float("inf")
            kk = min(k, d.shape[1])
            merged = torch.cat([best, d.topk(kk, dim=1, largest=False).values], dim=1)  # (p, k + kk)
            best = merged.topk(k, dim=1, largest=False).values
        radii[rows] = best[:, k - 1]
    return radii


def prdc(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 2048) -> dict[str, float]:
    """Precision, recall, density and coverage of generated features against real ones.

    Args:
        real: [N, D] reference features (e.g. 10,000 Inception pool features of real images).
        fake: [M, D] generated features, same space.
        k: neighbourhood size of the manifold balls (3 in Kynkaanniemi et al. and the authors; 5 in Naeem et al.).
        chunk: distances are evaluated in blocks of at most chunk x chunk pairs.

    Returns {"precision", "recall", "density", "coverage"}, each a float (precision, recall, coverage in [0, 1]).
    """
    real, fake = _check(real, fake, k, chunk)
    r_real = knn_radii(real, k, chunk)  # (N,)  squared radii of the real balls
    r_fake = knn_radii(fake, k, chunk)  # (M,)  squared radii of the generated balls
    real_sq, fake_sq = (real * real).sum(dim=1), (fake * fake).sum(dim=1)
    n, m, dev = real.shape[0], fake.shape[0], real.device
    balls_containing_fake = torch.zeros(m, dtype=torch.int64, device=dev)  # per fake: #real balls around it
    real_covered = torch.zeros(n, dtype=torch.bool, device=dev)  # per real: some fake in its own ball
    real_recalled = torch.zeros(n, dtype=torch.bool, device=dev)  # per real: inside some fake ball
    # One pass over all (fake, real) pairs serves all four metrics.
    for i in range(0, m, chunk):
        rows = slice(i, min(i + chunk, m))
        for j in range(0, n, chunk):
            cols = slice(j, min(j + chunk, n))
            d = _sq_dists(fake[rows], real[cols], fake_sq[rows], real_sq[cols])  # (p, q)
            in_real_ball = d <= r_real[None, cols]  # fake i inside real j's ball
            balls_containing_fake[rows] += in_real_ball.sum(dim=1)
            real_covered[cols] |= in_real_ball.any(dim=0)
            real_recalled[cols] |= (d <= r_fake[rows, None]).any(dim=0)  # real j inside fake i's ball
    return {
        "precision": float((balls_containing_fake > 0).double().mean()),
        "recall": float(real_recalled.double().mean()),
        "density": float(balls_containing_fake.double().sum() / (k * m)),
        "coverage": float(real_covered.double().mean()),
    }


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 2048) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): {"precision", "recall"}. See `prdc`."""
    out = prdc(real, fake, k=k, chunk=chunk)
    return {"precision": out["precision"], "recall": out["recall"]}
