"""The drifting field and the drifting loss: the reference implementation.

Pure PyTorch, no state. Two entry points:

* `drift_field` is the paper's Algorithm 2 for a batch of independent problems, with every variant the paper
  ablates as an option (kernel normalisation, affinity floor, attraction/repulsion factors).
* `drift_loss` is the loss of the authors' code (see `official-code-notes.md` section 1): one global distance scale
  and one drift scale per temperature for the whole call, the 1e-6 floor under the square root of the affinity, the
  self-mask added in normalised distance units, target weights applied after both softmaxes.

The global statistics of `drift_loss` are sums (of weighted distances, of weights, of squared drifts). They are
accumulated in float64 over chunks of problems and, when `all_reduce` is given, summed over processes, so that a
call evaluated in chunks or split across ranks gives the same loss and gradient as one call on the whole batch.

Paper symbol -> name used here:

    x, y+, y-        gen / x, pos, neg           generated samples, positives, extra (unconditional) negatives
    N, N_pos, N_neg  C_g, C_p, C_n               samples per problem
    tau              temperature(s)              kernel k(x, y) = exp(-||x - y|| / tau)
    A                affinity                    normalised kernel, sqrt(softmax_y * softmax_x) by default
    W+, W-           attraction/repulsion coefs  W+ = A+ * rowsum(A-), W- = A- * rowsum(A+)
    V                field / force               V = sum_j W+_j (y+_j - x) - sum_j W-_j (y-_j - x)
    S_j              scale                       weighted mean pairwise distance of the call (Eq. 18-21)
    lambda_j         drift_rms                   RMS of V per temperature over the call (Eq. 23-25)
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor

Normalize = Literal["xy", "y", "none"]
NORMALIZE_CHOICES = ("xy", "y", "none")
REDUCTIONS = ("none", "mean", "sum")  # drift_loss(reduction=...), as in torch.nn losses

# Algorithm 2 masks a sample as its own negative by adding a large constant to its raw distance.
PAPER_SELF_MASK = 1e6
# Constants of the authors' code (official-code-notes.md section 1.3).
MIN_SQUARED_DISTANCE = 1e-8  # distances are at least 1e-4 in raw feature units
MIN_SCALE = 1e-3  # floor of both the distance scale and the coordinate scale
MIN_DRIFT_MS = 1e-8  # floor of the mean square drift before its square root
CODE_AFFINITY_FLOOR = 1e-6  # floor of softmax_y * softmax_x before the square root
CODE_SELF_MASK = 100.0  # added to the self pair's distance in normalised units

AllReduce = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32 math for bf16/fp16/fp32 inputs (as the authors' code), fp64 when an input is fp64 (tests)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def pairwise_distance(x: Tensor, y: Tensor, min_squared: float = 0.0) -> Tensor:
    """Euclidean distances between rows: [..., N, D], [..., T, D] -> [..., N, T].

    Uses |x|^2 + |y|^2 - 2 x.y (one matmul, as the authors' code), clamped below at `min_squared` before the root.
    """
    squared = x.square().sum(-1)[..., :, None] + y.square().sum(-1)[..., None, :] - 2.0 * (x @ y.transpose(-1, -2))
    return squared.clamp_min(min_squared).sqrt()


def _self_mask(n: int, t: int, value: float, like: Tensor) -> Tensor:
    """[n, t] matrix with `value` at (i, i) for i < n: column i of the targets is generated sample i itself."""
    return torch.eye(n, t, dtype=like.dtype, device=like.device) * value  # no in-place fill: torch.compile-able


def affinity(logits: Tensor, normalize: Normalize = "xy", floor: float = 0.0) -> Tensor:
    """Normalised kernel A from logits -||x - y|| / tau: [..., N, T] -> [..., N, T].

    "xy":   A = sqrt(max(softmax over targets (dim -1) * softmax over generated samples (dim -2), floor))
    "y":    A = softmax over targets only
    "none": A = exp(logits), the unnormalised kernel
    `floor` bounds A^2 from below in every mode, so A >= sqrt(floor) (1e-3 for the authors' 1e-6).
    """
    if normalize == "xy":
        return (torch.softmax(logits, dim=-1) * torch.softmax(logits, dim=-2)).clamp_min(floor).sqrt()
    a = torch.softmax(logits, dim=-1) if normalize == "y" else logits.exp()
    return a.clamp_min(math.sqrt(floor)) if floor > 0 else a


def field_from_affinity(
    a: Tensor,
    x: Tensor,
    targets: Tensor,
    num_negatives: int,
    weight: Tensor | None = None,
    attraction: float = 1.0,
    repulsion: float = 1.0,
) -> Tensor:
    """The field V from affinities over targets whose first `num_negatives` columns are negatives.

    a [..., N, T], x [..., N, D], targets [..., T, D], weight [..., T] (multiplies the columns of A) -> V [..., N, D]:
        W+ = A+ * rowsum(A-),  W- = A- * rowsum(A+)
        V  = attraction * sum_j W+_j (y_j - x) - repulsion * sum_j W-_j (y_j - x)
    Written as coef @ targets - rowsum(coef) * x: rowsum(coef) is zero when attraction == repulsion, so the second
    term only makes V exactly translation invariant (and carries the factors of the asymmetric variants).
    """
    if weight is not None:
        a = a * weight[..., None, :]
    a_neg, a_pos = a[..., :num_negatives], a[..., num_negatives:]
    coef = torch.cat(
        [-repulsion * a_neg * a_pos.sum(-1, keepdim=True), attraction * a_pos * a_neg.sum(-1, keepdim=True)], dim=-1
    )
    return coef @ targets - coef.sum(-1, keepdim=True) * x


# ---------------------------------------------------------------------------------------------------------------------
# Input checks: every problem is reported before any work, naming the argument and what was expected.
# ---------------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: object, ndim: int | None = None, min_ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _check_samples(name: str, t: Tensor, lead: tuple[int, ...], dim: int, ref: str, min_count: int) -> None:
    """t must be [*lead, count, dim] with count >= min_count."""
    if tuple(t.shape[:-2]) != lead or t.shape[-1] != dim:
        raise ValueError(
            f"{name}: expected shape [{', '.join(map(str, lead + ('count',)))}, {dim}] to match {ref}, "
            f"got {tuple(t.shape)}"
        )
    if t.shape[-2] < min_count:
        raise ValueError(f"{name}: expected at least {min_count} sample(s) per problem, got shape {tuple(t.shape)}")


def _check_weight(name: str, w: Tensor | None, shape: tuple[int, ...]) -> None:
    if w is None:
        return
    _check_tensor(name, w)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {tuple(w.shape)}")


def _check_values(
    named: Sequence[tuple[str, Tensor | None]], weights: Sequence[tuple[str, Tensor | None]], check_finite: bool
) -> None:
    """NaN/Inf in any input, negative weights: one device sync for all checks together."""
    if not check_finite:
        return
    flags = [(name, ~torch.isfinite(t).all()) for name, t in named if t is not None]
    flags += [(f"{name} (negative)", (w < 0).any()) for name, w in weights if w is not None]
    if not flags:
        return
    bad = torch.stack([f for _, f in flags]).cpu()
    for (name, _), is_bad in zip(flags, bad.tolist()):
        if is_bad:
            what = "non-negative weights" if name.endswith("(negative)") else "finite values (no NaN or Inf)"
            raise ValueError(f"{name.removesuffix(' (negative)')}: expected {what}")


def _check_options(temperatures: Sequence[float], normalize: str, affinity_floor: float, **factors: float) -> None:
    if len(temperatures) == 0:
        raise ValueError("temperatures: expected at least one temperature")
    for t in temperatures:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature: expected finite numbers > 0, got {t!r}")
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize: expected one of {NORMALIZE_CHOICES}, got {normalize!r}")
    if not (isinstance(affinity_floor, (int, float)) and math.isfinite(affinity_floor) and affinity_floor >= 0):
        raise ValueError(f"affinity_floor: expected a finite number >= 0, got {affinity_floor!r}")
    for name, value in factors.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Algorithm 2
# ---------------------------------------------------------------------------------------------------------------------


def drift_field(
    x: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    temperature: float,
    pos_weight: Tensor | None = None,
    neg_weight: Tensor | None = None,
    normalize: Normalize = "xy",
    affinity_floor: float = 0.0,
    self_negatives: bool = True,
    attraction: float = 1.0,
    repulsion: float = 1.0,
    check_finite: bool = True,
) -> Tensor:
    """The drifting field V(x) of the paper's Algorithm 2, for independent problems stacked in leading dimensions.

    Args:
        x: [..., N, D] generated samples (no gradient is needed: V is a stop-gradient target).
        pos: [..., P, D] positives (samples of the data distribution), P >= 1.
        neg: [..., M, D] extra negatives (e.g. real samples of any class, for guidance), or None.
        temperature: tau > 0 of the kernel exp(-||x - y|| / tau), on raw Euclidean distances.
        pos_weight, neg_weight: [..., P], [..., M] non-negative column weights, applied after normalisation
            (the generated columns weigh 1).
        normalize: "xy" (softmax over targets and over generated samples, geometric mean; the paper), "y"
            (softmax over targets only) or "none" (exp(logits)); Table 11.
        affinity_floor: lower bound of A^2 (the authors' code uses 1e-6; Algorithm 2 has none).
        self_negatives: the generated samples are negatives too (Algorithm 1); a sample is never its own negative
            (its self distance gets +1e6, as in Algorithm 2).
        attraction, repulsion: factors of V+ and V- (Table 1's anti-symmetry ablation).

    Targets are [x (if self_negatives), neg, pos]. With the defaults this is exactly Algorithm 2:
    V = attraction * sum_j W+_j (y+_j - x) - repulsion * sum_j W-_j (y-_j - x).

    Returns:
        V: [..., N, D] in the promoted dtype (fp32, or fp64 for fp64 inputs).
    """
    _check_tensor("x", x, min_ndim=2)
    _check_tensor("pos", pos, min_ndim=2)
    lead, n, d = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    _check_samples("pos", pos, lead, d, "x [..., N, D]", min_count=1)
    if neg is not None:
        _check_tensor("neg", neg, min_ndim=2)
        _check_samples("neg", neg, lead, d, "x [..., N, D]", min_count=0)
    if n < 1:
        raise ValueError(f"x: expected at least one generated sample per problem, got shape {tuple(x.shape)}")
    _check_weight("pos_weight", pos_weight, lead + (pos.shape[-2],))
    _check_weight("neg_weight", neg_weight, lead + ((neg.shape[-2],) if neg is not None else (0,)))
    if neg is None and neg_weight is not None:
        raise ValueError("neg_weight: given without neg")
    if not self_negatives and neg is None:
        raise ValueError("neg: expected extra negatives when self_negatives=False (there would be no negatives)")
    _check_options((temperature,), normalize, affinity_floor, attraction=attraction, repulsion=repulsion)
    _check_values(
        [("x", x), ("pos", pos), ("neg", neg), ("pos_weight", pos_weight), ("neg_weight", neg_weight)],
        [("pos_weight", pos_weight), ("neg_weight", neg_weight)],
        check_finite,
    )

    dtype = _compute_dtype(x, pos, neg)
    x = x.to(dtype)
    parts = ([x] if self_negatives else []) + ([neg.to(dtype)] if neg is not None else []) + [pos.to(dtype)]
    targets = torch.cat(parts, dim=-2)
    num_negatives = targets.shape[-2] - pos.shape[-2]

    weight = None
    if pos_weight is not None or neg_weight is not None:
        ones = lambda k: x.new_ones(lead + (k,))  # noqa: E731
        w_parts = [ones(n)] if self_negatives else []
        if neg is not None:
            w_parts.append(neg_weight.to(dtype) if neg_weight is not None else ones(neg.shape[-2]))
        w_parts.append(pos_weight.to(dtype) if pos_weight is not None else ones(pos.shape[-2]))
        weight = torch.cat(w_parts, dim=-1)

    dist = pairwise_distance(x, targets)
    if self_negatives:
        dist = dist + _self_mask(n, targets.shape[-2], PAPER_SELF_MASK, dist)
    a = affinity(-dist / temperature, normalize, affinity_floor)
    return field_from_affinity(a, x, targets, num_negatives, weight, attraction, repulsion)


# ---------------------------------------------------------------------------------------------------------------------
# The loss of the authors' code
# ---------------------------------------------------------------------------------------------------------------------


class DriftStats(NamedTuple):
    """The global statistics of one `drift_loss` call (one feature key of one step).

    scale: scalar, weighted mean pairwise distance over every problem, row and column (S_j * sqrt(S)).
    drift_ms: [R], mean square of the field per temperature, in scaled coordinates (logged as loss_<tau>).
    Several keys' statistics stacked field by field (scale [K], drift_ms [K, R]) go with `drift_loss(groups=...)`.
    """

    scale: Tensor
    drift_ms: Tensor

    @classmethod
    def from_sums(cls, scale_sums: Tensor, square_sums: Tensor) -> DriftStats:
        """Statistics from the totals of `scale_sums` and `field_square_sums` over the whole batch."""
        return cls(scale_sums[0] / scale_sums[1], square_sums[:-1] / square_sums[-1])

    @property
    def drift_rms(self) -> Tensor:
        """lambda per temperature: sqrt(max(drift_ms, 1e-8))."""
        return self.drift_ms.clamp_min(MIN_DRIFT_MS).sqrt()


class _Problems(NamedTuple):
    """One chunk of problems in compute dtype: x [b, C_g, S] (detached), targets [b, T, S], weight [b, T]."""

    x: Tensor
    targets: Tensor
    weight: Tensor
    num_negatives: int


def _problem_slicer(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype) -> Callable[[slice], _Problems]:
    """A function that builds the problems of one chunk (a slice of the B axis)."""

    def problems(sl: slice) -> _Problems:
        sliced = (None if t is None else t[sl] for t in (gen, pos, neg, gen_weight, pos_weight, neg_weight))
        return _problems(*sliced, dtype)

    return problems


def _problems(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype) -> _Problems:
    """Targets in the authors' order [gen (as negatives), neg, pos] with their weights."""
    x = gen.detach().to(dtype)
    parts, w_parts = [x], [gen_weight.to(dtype) if gen_weight is not None else x.new_ones(x.shape[:2])]
    if neg is not None:
        parts.append(neg.detach().to(dtype))
        w_parts.append(neg_weight.to(dtype) if neg_weight is not None else x.new_ones(neg.shape[:2]))
    parts.append(pos.detach().to(dtype))
    w_parts.append(pos_weight.to(dtype) if pos_weight is not None else x.new_ones(pos.shape[:2]))
    targets = torch.cat(parts, dim=1)
    return _Problems(x, targets, torch.cat(w_parts, dim=1), targets.shape[1] - pos.shape[1])


def _coordinate_scale(scale: Tensor, dim: int) -> Tensor:
    """s_in = max(scale / sqrt(S), 1e-3): dividing by it makes the mean pairwise distance sqrt(S)."""
    return (scale / math.sqrt(dim)).clamp_min(MIN_SCALE)


def _forces(p: _Problems, dist: Tensor, scale: Tensor, temperatures, normalize, floor, self_mask, attraction, repulsion):
    """Per temperature, the field in scaled coordinates: list of R tensors [b, C_g, S]. scale: a scalar, or one
    per problem [b] (problems of several keys stacked, each at its own key's scale)."""
    n, dim = p.x.shape[1], p.x.shape[2]
    scale = scale.reshape(-1, 1, 1)
    s_in = _coordinate_scale(scale, dim).to(p.x.dtype)
    normalized = dist / scale.clamp_min(MIN_SCALE).to(p.x.dtype) + _self_mask(n, dist.shape[-1], self_mask, dist)
    x_hat, targets_hat = p.x / s_in, p.targets / s_in
    return [
        field_from_affinity(
            affinity(-normalized / tau, normalize, floor), x_hat, targets_hat, p.num_negatives, p.weight,
            attraction, repulsion,
        )
        for tau in temperatures
    ]


def _chunks(total: int, chunk_size: int | None) -> list[slice]:
    step = total if not chunk_size else chunk_size
    return [slice(i, min(i + step, total)) for i in range(0, total, max(step, 1))]


def drift_loss(
    gen: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    gen_weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    neg_weight: Tensor | None = None,
    normalize: Normalize = "xy",
    affinity_floor: float = CODE_AFFINITY_FLOOR,
    self_mask: float = CODE_SELF_MASK,
    attraction: float = 1.0,
    repulsion: float = 1.0,
    chunk_size: int | None = None,
    all_reduce: AllReduce | None = None,
    stats: DriftStats | None = None,
    check_finite: bool = True,
    impl: Literal["auto", "reference", "fused"] = "auto",
    groups: Sequence[int] | None = None,
    reduction: Literal["none", "mean", "sum"] = "none",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The drifting loss of the authors' code for one feature key: B independent problems sharing global statistics.

    Args:
        gen: [B, C_g, S] features of the generated samples, the only input through which gradient flows.
            They are also the negatives (each masked as its own negative).
        pos: [B, C_p, S] positives, C_p >= 1.
        neg: [B, C_n, S] extra negatives (unconditional real samples, for guidance), or None.
        temperatures: the taus; each field is normalised by its own RMS over the call, then they are summed.
        gen_weight, pos_weight, neg_weight: [B, C_g], [B, C_p], [B, C_n] non-negative target weights (default 1),
            applied after both softmaxes and in the distance scale (the guidance weight w goes in neg_weight).
        normalize, affinity_floor, attraction, repulsion: as in `drift_field` (floor 1e-6 as in the code).
        self_mask: added to the self distance in normalised units (the code's 100).
        chunk_size: problems per chunk; bounds the [chunk, C_g, T] temporaries. The result does not depend on it.
        all_reduce: sums a float64 tensor of partial sums over processes (see `all_reduce_sum`); each process
            passes its own problems and the statistics become those of the union, as if computed at once.
        stats: precomputed statistics (from `drift_stats` over a larger batch); skips their computation.
        check_finite: check inputs for NaN/Inf and weights for negative values (one device sync); turn off inside
            a hot training loop, where such inputs give NaN or meaningless values unchecked.
        impl: "reference" (this function's PyTorch code), "fused" (the Triton kernel of `drifting.kernels`, which
            never materialises [B, C_g, T] tensors; same results within float tolerance) or "auto" (fused for CUDA
            inputs when Triton is available and the problem fits the kernel).
        groups: the problems of K keys (of one feature size S) stacked along B as K consecutive groups of these
            counts, each at its own key's statistics: `stats` is then required, with scale [K] and drift_ms [K, R]
            (stacked `DriftStats`). The losses equal K separate calls; one call instead of K (few-problem keys
            leave the GPU nearly empty alone).
        reduction: "none" (the [B] losses), "mean" or "sum" over the B problems (a scalar). The fused kernel writes
            the gradient during the forward pass; for "mean" and "sum" it writes it for that reduction, so that
            `loss.backward()` reads and writes nothing more, where "none" followed by `.mean()` must scale the
            [B, C_g, S] gradient once more in the backward.

    Algorithm (official-code-notes.md 1.2): distances d on raw features; scale = sum w d / (C_g sum w) over the
    call; coordinates divided by s_in = max(scale / sqrt(S), 1e-3); normalised distances d / max(scale, 1e-3) with
    the self-mask; per temperature the field F from the double softmax; goal = x/s_in + sum_tau F_tau / lambda_tau
    with lambda_tau = RMS of F_tau over the call; loss_b = mean over (i, s) of (gen/s_in - goal)^2, goal frozen.

    Returns:
        loss: [B], one value per problem (the caller averages over problems, then sums over keys), or their mean or
            sum (`reduction`).
        info: {"scale": scalar, "drift_ms": [R]} (float64) -- drift_ms shows progress; the loss value itself stays
            between ~R and ~R^2 by construction.
    """
    temperatures = tuple(temperatures)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    _check_loss_inputs(gen, pos, neg, gen_weight, pos_weight, neg_weight, temperatures, normalize, affinity_floor,
                       self_mask, attraction, repulsion, chunk_size, check_finite)
    stats_shape = (len(temperatures),) if groups is None else (len(groups), len(temperatures))
    if stats is not None and (not isinstance(stats, DriftStats) or stats.drift_ms.shape != stats_shape
                              or stats.scale.shape != stats_shape[:-1]):
        raise ValueError(f"stats: expected DriftStats with scale of shape {list(stats_shape[:-1])} and drift_ms of "
                         f"shape {list(stats_shape)}")
    key_stats = stats
    if groups is not None:
        _check_groups(groups, gen.shape[0])
        if stats is None or all_reduce is not None:
            raise ValueError("groups: expected the stacked statistics of the keys in stats, and no all_reduce")
        stats = DriftStats(*(_per_problem(part, groups) for part in stats))  # scale [B], drift_ms [B, R]
    if _fused(impl, gen, pos, neg):
        from drifting import kernels

        losses, info = kernels.fused_drift_loss(
            gen, pos, neg, temperatures=temperatures, gen_weight=gen_weight, pos_weight=pos_weight,
            neg_weight=neg_weight, normalize=normalize, affinity_floor=affinity_floor, self_mask=self_mask,
            attraction=attraction, repulsion=repulsion, all_reduce=all_reduce, stats=stats, reduction=reduction,
        )
        return losses, info if groups is None else {"scale": key_stats.scale, "drift_ms": key_stats.drift_ms}
    options = (temperatures, normalize, affinity_floor, self_mask, attraction, repulsion)
    dtype = _compute_dtype(gen, pos, neg)
    chunks = _chunks(gen.shape[0], chunk_size)

    problems = _problem_slicer(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype)
    cached_forces = None
    if stats is None:
        # With a single chunk the forces of the statistics pass are kept for the loss pass instead of recomputed.
        stats, cached_forces = _stats(problems, chunks, options, all_reduce, keep_forces=len(chunks) == 1)

    rms = stats.drift_rms.to(dtype)  # [R], or [B, R] per problem (groups)
    scale = stats.scale.to(dtype)  # scalar, or [B]
    losses = []
    for sl in chunks:
        scale_b = scale if groups is None else scale[sl]
        rms_b = rms if groups is None else rms[sl].T[..., None, None]  # per temperature: [b, 1, 1]
        s_in = _coordinate_scale(scale_b, gen.shape[2]).reshape(-1, 1, 1)
        with torch.no_grad():
            p = problems(sl)
            forces = cached_forces or _forces(p, pairwise_distance(p.x, p.targets, MIN_SQUARED_DISTANCE), scale_b,
                                              *options)
            goal = p.x / s_in + sum(f / r for f, r in zip(forces, rms_b))
        losses.append((gen[sl].to(dtype) / s_in - goal).square().mean(dim=(1, 2)))
    out = stats if groups is None else key_stats  # the keys' statistics, [K] and [K, R], not the per-problem copies
    loss = torch.cat(losses)
    if reduction != "none":
        loss = loss.mean() if reduction == "mean" else loss.sum()
    return loss, {"scale": out.scale, "drift_ms": out.drift_ms}


def _fused(impl: str, gen: Tensor, pos: Tensor, neg: Tensor | None) -> bool:
    """Whether to run the fused kernel (see `drifting.kernels.use_fused`); checks impl."""
    if impl not in ("auto", "reference", "fused"):
        raise ValueError(f"impl: expected 'auto', 'reference' or 'fused', got {impl!r}")
    if impl == "reference":
        return False
    from drifting import kernels  # imported here: drift.py itself depends on torch only

    return kernels.use_fused(impl, gen, pos, neg)


def _scale_sums(problems, chunks) -> Tensor:
    """Per problem [sum_{i,j} w_bj d_bij, C_g sum_j w_bj] (float64, [B, 2]): scale = first / second, summed."""
    with torch.no_grad():
        parts = [_scale_terms(problems(sl)) for sl in chunks]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scale_terms(p: _Problems) -> Tensor:
    dist = pairwise_distance(p.x, p.targets, MIN_SQUARED_DISTANCE)
    return torch.stack([(dist * p.weight[:, None, :]).sum(dim=(1, 2)), p.x.shape[1] * p.weight.sum(dim=1)],
                       dim=1).double()


def _square_sums(problems, chunks, scale: Tensor, options) -> tuple[Tensor, list[Tensor]]:
    """Per problem [sum F_tau^2 for each tau, number of entries] (float64, [B, R + 1]) at this scale, and the last
    chunk's forces."""
    parts, forces = [], []
    with torch.no_grad():
        for sl in chunks:
            p = problems(sl)
            squares, forces = _square_terms(p, scale, options)
            parts.append(_with_count(squares, p.x.shape))
    return parts[0] if len(parts) == 1 else torch.cat(parts), forces


def _square_terms(p: _Problems, scale: Tensor, options) -> tuple[Tensor, list[Tensor]]:
    forces = _forces(p, pairwise_distance(p.x, p.targets, MIN_SQUARED_DISTANCE), scale.to(p.x.dtype), *options)
    return torch.stack([f.square().sum(dim=(1, 2)) for f in forces], dim=1).double(), forces


def _with_count(squares: Tensor, shape) -> Tensor:
    """[B, R] -> [B, R + 1] with the number of field entries C_g S last, as a fill on the device: a copy from a
    host number would wait for the GPU (a sync per key)."""
    return torch.nn.functional.pad(squares, (0, 1), value=shape[1] * shape[2])


def _chunk_scale_terms(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype) -> Tensor:
    """`_scale_terms` of one chunk from its raw slices: the problems are built inside, so that the compiled version
    fuses the casts and the concatenation too."""
    return _scale_terms(_problems(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype))


def _chunk_square_terms(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype, scale, options) -> Tensor:
    """`_square_terms` of one chunk from its raw slices, the sums only (the forces never leave the graph)."""
    return _square_terms(_problems(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype), scale, options)[0]


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """fn under torch.compile with dynamic shapes (one graph for the keys' many problem counts and dimensions):
    the statistics' chain of element-wise operations in a few fused kernels instead of ~20 per temperature."""
    return torch.compile(fn, dynamic=True)


def _chunk_sums(fn, compiled: bool, gen, pos, neg, gen_weight, pos_weight, neg_weight, chunks,
                scale: Tensor | None = None, *args) -> Tensor:
    """Per problem, fn over the chunks of the B axis (under torch.compile if compiled), concatenated; scale (a
    scalar, or one per problem) and args follow the chunk's tensors."""
    run = _compiled(fn) if compiled else fn
    dtype = _compute_dtype(gen, pos, neg)
    parts = []
    with torch.no_grad():
        for sl in chunks:
            sliced = [None if t is None else t[sl] for t in (gen, pos, neg, gen_weight, pos_weight, neg_weight)]
            if scale is not None:
                sliced.append(scale if scale.dim() == 0 else scale[sl])
            parts.append(run(*sliced[:6], dtype, *sliced[6:], *args))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _segment_sums(per_problem: Tensor, groups: Sequence[int] | None) -> Tensor:
    """[B, m] -> [m] summed over all problems (groups None), or [K, m] summed over K consecutive groups of problems."""
    if groups is None:
        return per_problem.sum(0)
    if len(groups) == 1:  # one key per call (the default statistics pass): no split and stack
        return per_problem.sum(0, keepdim=True)
    return torch.stack([part.sum(0) for part in per_problem.split(list(groups))])


def _per_problem(per_key: Tensor, groups: Sequence[int]) -> Tensor:
    """[K, ...] -> [B, ...]: each key's row repeated over its group of consecutive problems."""
    return torch.cat([row.expand(k, *row.shape) for row, k in zip(per_key, groups)])


def _check_groups(groups: Sequence[int] | None, num_problems: int) -> None:
    if groups is None:
        return
    if not all(isinstance(k, int) and k >= 1 for k in groups) or sum(groups) != num_problems:
        raise ValueError(f"groups: expected positive problem counts summing to the {num_problems} problems, "
                         f"got {list(groups)}")


def _stats(problems, chunks, options, all_reduce, keep_forces):
    """Two passes over the chunks: the distance scale, then the mean square field per temperature."""
    sums = _scale_sums(problems, chunks).sum(0)
    if all_reduce is not None:
        sums = all_reduce(sums)
    squares, forces = _square_sums(problems, chunks, sums[0] / sums[1], options)
    squares = squares.sum(0)
    if all_reduce is not None:
        squares = all_reduce(squares)
    return DriftStats.from_sums(sums, squares), (forces if keep_forces else None)


def scale_sums(
    gen: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    gen_weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    neg_weight: Tensor | None = None,
    chunk_size: int | None = None,
    check_finite: bool = True,
    impl: Literal["auto", "reference", "fused", "compiled"] = "auto",
    groups: Sequence[int] | None = None,
) -> Tensor:
    """First partial sums of the statistics: [sum w d, C_g sum w] (float64, [2]) of these problems.

    Add them over class chunks that are never in memory together (and over processes), then pass the total to
    `field_square_sums` and `DriftStats.from_sums`. Arguments as in `drift_loss` (impl: pass 1 of the fused kernel,
    or "compiled": the reference math under torch.compile, the same sums to float rounding).
    groups: the problems of several keys stacked along B (all of one feature dimension S), as K consecutive groups of
    these sizes; the sums are then [K, 2], one row per key, as K separate calls would give in one pass.
    """
    _check_loss_inputs(gen, pos, neg, gen_weight, pos_weight, neg_weight, (1.0,), "xy", 0.0, 0.0, 1.0, 1.0,
                       chunk_size, check_finite)
    _check_groups(groups, gen.shape[0])
    if impl != "compiled" and _fused(impl, gen, pos, neg):
        from drifting import kernels

        per_problem = kernels.fused_scale_sums(gen, pos, neg, gen_weight=gen_weight, pos_weight=pos_weight,
                                               neg_weight=neg_weight)
    else:
        per_problem = _chunk_sums(_chunk_scale_terms, impl == "compiled", gen, pos, neg, gen_weight, pos_weight,
                                  neg_weight, _chunks(gen.shape[0], chunk_size))
    return _segment_sums(per_problem, groups)


def field_square_sums(
    gen: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    total_scale_sums: Tensor,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    gen_weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    neg_weight: Tensor | None = None,
    normalize: Normalize = "xy",
    affinity_floor: float = CODE_AFFINITY_FLOOR,
    self_mask: float = CODE_SELF_MASK,
    attraction: float = 1.0,
    repulsion: float = 1.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
    impl: Literal["auto", "reference", "fused", "compiled"] = "auto",
    groups: Sequence[int] | None = None,
) -> Tensor:
    """Second partial sums: [sum F_tau^2 for each tau, number of entries] (float64, [R + 1]) of these problems,
    at the scale given by `total_scale_sums` (the `scale_sums` of the whole batch). Arguments as in `drift_loss`
    (impl: pass 2 of the fused kernel, or "compiled" as in `scale_sums`). groups: as in `scale_sums`;
    total_scale_sums is then [K, 2] (each key's totals) and the sums [K, R + 1]."""
    temperatures = tuple(temperatures)
    _check_loss_inputs(gen, pos, neg, gen_weight, pos_weight, neg_weight, temperatures, normalize, affinity_floor,
                       self_mask, attraction, repulsion, chunk_size, check_finite)
    _check_groups(groups, gen.shape[0])
    expected = (2,) if groups is None else (len(groups), 2)
    if not isinstance(total_scale_sums, Tensor) or tuple(total_scale_sums.shape) != expected:
        raise ValueError(f"total_scale_sums: expected the {list(expected)} tensor returned by scale_sums (summed "
                         "over chunks)")
    scale = (total_scale_sums[..., 0] / total_scale_sums[..., 1]).to(gen.device)
    if groups is not None:  # each problem at its own key's scale
        scale = _per_problem(scale, groups)
    if impl != "compiled" and _fused(impl, gen, pos, neg):
        from drifting import kernels

        per_problem = kernels.fused_square_sums(
            gen, pos, neg, scale=scale, temperatures=temperatures, gen_weight=gen_weight, pos_weight=pos_weight,
            neg_weight=neg_weight, normalize=normalize, affinity_floor=affinity_floor, self_mask=self_mask,
            attraction=attraction, repulsion=repulsion)
    else:
        options = (temperatures, normalize, affinity_floor, self_mask, attraction, repulsion)
        per_problem = _with_count(_chunk_sums(_chunk_square_terms, impl == "compiled", gen, pos, neg, gen_weight,
                                              pos_weight, neg_weight, _chunks(gen.shape[0], chunk_size), scale,
                                              options), gen.shape)
    return _segment_sums(per_problem, groups)


def drift_stats(
    gen: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    gen_weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    neg_weight: Tensor | None = None,
    normalize: Normalize = "xy",
    affinity_floor: float = CODE_AFFINITY_FLOOR,
    self_mask: float = CODE_SELF_MASK,
    attraction: float = 1.0,
    repulsion: float = 1.0,
    chunk_size: int | None = None,
    all_reduce: AllReduce | None = None,
    check_finite: bool = True,
) -> DriftStats:
    """The global statistics `drift_loss` would compute for these problems (arguments as in `drift_loss`)."""
    temperatures = tuple(temperatures)
    _check_loss_inputs(gen, pos, neg, gen_weight, pos_weight, neg_weight, temperatures, normalize, affinity_floor,
                       self_mask, attraction, repulsion, chunk_size, check_finite)
    dtype = _compute_dtype(gen, pos, neg)

    problems = _problem_slicer(gen, pos, neg, gen_weight, pos_weight, neg_weight, dtype)
    options = (temperatures, normalize, affinity_floor, self_mask, attraction, repulsion)
    return _stats(problems, _chunks(gen.shape[0], chunk_size), options, all_reduce, keep_forces=False)[0]


def _check_loss_inputs(gen, pos, neg, gen_weight, pos_weight, neg_weight, temperatures, normalize, affinity_floor,
                       self_mask, attraction, repulsion, chunk_size, check_finite) -> None:
    _check_tensor("gen", gen, ndim=3)
    _check_tensor("pos", pos, ndim=3)
    b, n, s = gen.shape
    if n < 1 or s < 1:
        raise ValueError(f"gen: expected [B, C_g, S] with C_g >= 1 and S >= 1, got {tuple(gen.shape)}")
    _check_samples("pos", pos, (b,), s, "gen [B, C_g, S]", min_count=1)
    if neg is not None:
        _check_tensor("neg", neg, ndim=3)
        _check_samples("neg", neg, (b,), s, "gen [B, C_g, S]", min_count=0)
    elif neg_weight is not None:
        raise ValueError("neg_weight: given without neg")
    _check_weight("gen_weight", gen_weight, (b, n))
    _check_weight("pos_weight", pos_weight, (b, pos.shape[1]))
    _check_weight("neg_weight", neg_weight, (b, neg.shape[1]) if neg is not None else (b, 0))
    for t in (pos, neg, gen_weight, pos_weight, neg_weight):
        if t is not None and t.device != gen.device:
            raise ValueError(f"all inputs must be on gen's device {gen.device}, got one on {t.device}")
    _check_options(temperatures, normalize, affinity_floor, self_mask=self_mask, attraction=attraction,
                   repulsion=repulsion)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an integer >= 1, got {chunk_size!r}")
    weights = [("gen_weight", gen_weight), ("pos_weight", pos_weight), ("neg_weight", neg_weight)]
    _check_values([("gen", gen), ("pos", pos), ("neg", neg)] + weights, weights, check_finite)


def all_reduce_sum(group=None) -> AllReduce:
    """An `all_reduce` for `drift_loss`: sums the partial statistics over the processes of `group` (default: all)."""
    import torch.distributed as dist

    def reduce(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce
