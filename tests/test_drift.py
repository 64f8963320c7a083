"""The drifting field and loss: agreement with literal loop implementations, the properties the method relies on,
exactness of chunked computation, and the errors on bad input."""

from __future__ import annotations

import pytest
import torch

from drifting.drift import DriftStats, drift_field, drift_loss, drift_stats
from loops import algorithm2, authors_loss


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rand_weight(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


# ---------------------------------------------------------------------------------------------------------------------
# drift_field == Algorithm 2 (float64 loops)
# ---------------------------------------------------------------------------------------------------------------------

FIELD_CASES = [
    dict(),
    dict(normalize="y"),
    dict(normalize="none", temperature=2.0),
    dict(affinity_floor=1e-6),
    dict(self_negatives=False),
    dict(attraction=1.5, repulsion=1.0),
    dict(attraction=1.0, repulsion=2.0),
    dict(weights=True),
    dict(no_neg=True),
]


@pytest.mark.parametrize("case", FIELD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_drift_field_matches_algorithm2_loop(case):
    case = dict(case)
    temperature = case.pop("temperature", 0.7)
    use_weights = case.pop("weights", False)
    no_neg = case.pop("no_neg", False)
    x, pos, neg = rand(2, 5, 3, seed=1), rand(2, 4, 3, seed=2), rand(2, 3, 3, seed=3)
    pos_w = rand_weight(2, 4, seed=4) if use_weights else None
    neg_w = rand_weight(2, 3, seed=5) if use_weights else None
    v = drift_field(x, pos, None if no_neg else neg, temperature=temperature, pos_weight=pos_w,
                    neg_weight=None if no_neg else neg_w, **case)
    assert v.shape == x.shape and v.dtype == torch.float64
    for b in range(2):
        expected = algorithm2(
            x[b].tolist(), pos[b].tolist(), None if no_neg else neg[b].tolist(), temperature,
            pos_weight=pos_w[b].tolist() if use_weights else None,
            neg_weight=neg_w[b].tolist() if use_weights else None,
            normalize=case.get("normalize", "xy"), floor=case.get("affinity_floor", 0.0),
            self_negatives=case.get("self_negatives", True), attraction=case.get("attraction", 1.0),
            repulsion=case.get("repulsion", 1.0),
        )
        torch.testing.assert_close(v[b], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_drift_field_is_antisymmetric():
    """Swapping the positive and negative sets flips V (Prop. 3.1 needs V_{p,q} = -V_{q,p})."""
    x, a, b = rand(3, 6, 4, seed=1), rand(3, 5, 4, seed=2), rand(3, 7, 4, seed=3)
    wa, wb = rand_weight(3, 5, seed=4), rand_weight(3, 7, seed=5)
    for normalize in ("xy", "y", "none"):
        v_ab = drift_field(x, a, b, temperature=0.5, pos_weight=wa, neg_weight=wb, self_negatives=False,
                           normalize=normalize)
        v_ba = drift_field(x, b, a, temperature=0.5, pos_weight=wb, neg_weight=wa, self_negatives=False,
                           normalize=normalize)
        assert v_ab.abs().max() > 1e-3  # the field is not trivially zero
        torch.testing.assert_close(v_ab, -v_ba, rtol=1e-10, atol=1e-12)


def test_drift_field_vanishes_when_positives_and_negatives_coincide():
    x, y = rand(2, 8, 3, seed=1), rand(2, 10, 3, seed=2)
    v = drift_field(x, y, y.clone(), temperature=0.3, self_negatives=False)
    assert v.abs().max() < 1e-12
    # ... and not when they differ.
    assert drift_field(x, y, y + 0.5, temperature=0.3, self_negatives=False).abs().max() > 1e-2


def test_drift_field_attracts_toward_positives_in_2d():
    """A sample far to the left of all data drifts right; the generated batch spreads out by repulsion."""
    x = torch.tensor([[[-3.0, 0.0], [-3.1, 0.0]]])
    pos = torch.tensor([[[2.0, 0.0], [2.0, 0.5], [2.0, -0.5]]])
    v = drift_field(x, pos, temperature=1.0)
    assert (v[0, :, 0] > 0).all()


def test_drift_field_keeps_bf16_math_in_fp32():
    x, pos = rand(2, 5, 3, dtype=torch.float32), rand(2, 4, 3, seed=1, dtype=torch.float32)
    v16 = drift_field(x.bfloat16(), pos.bfloat16(), temperature=0.5)
    v32 = drift_field(x.bfloat16().float(), pos.bfloat16().float(), temperature=0.5)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, v32)


# ---------------------------------------------------------------------------------------------------------------------
# drift_loss == the authors' semantics
# ---------------------------------------------------------------------------------------------------------------------


def test_drift_loss_hand_case_one_generated_one_positive():
    """B = 1, C_g = 1, C_p = 1, S = 1: gen x = 0, positive y = 2.

    Distances: self 1e-4 (the clamp), positive 2; scale = (1e-4 + 2) / 2; s_in = scale (S = 1).
    The masked self column sits on the affinity floor 1e-3, so per temperature F = 1e-3 * A_pos * 2 / s_in > 0,
    and F / lambda = +1 exactly (lambda = |F|). goal = x/s_in + 3, so loss = 9 and d loss / d x = -6 / s_in.
    """
    gen = torch.zeros(1, 1, 1, dtype=torch.float64, requires_grad=True)
    pos = torch.full((1, 1, 1), 2.0, dtype=torch.float64)
    loss, info = drift_loss(gen, pos)
    scale = (1e-4 + 2.0) / 2
    assert info["scale"].item() == pytest.approx(scale, rel=1e-12)
    assert loss.item() == pytest.approx(9.0, rel=1e-9)
    # The floor makes the field's mean square (1e-3 * 2 / s_in)^2 per temperature (A_pos = 1 up to e^-49/tau).
    torch.testing.assert_close(info["drift_ms"], torch.full((3,), (2e-3 / scale) ** 2, dtype=torch.float64))
    loss.sum().backward()
    assert gen.grad.item() == pytest.approx(-6.0 / scale, rel=1e-9)


def test_drift_loss_hand_case_guidance_weight_zero():
    """An unconditional column with weight 0 adds nothing to the scale or to the force."""
    gen = torch.zeros(1, 1, 1, dtype=torch.float64)
    pos = torch.full((1, 1, 1), 2.0, dtype=torch.float64)
    neg = torch.full((1, 1, 1), -5.0, dtype=torch.float64)
    _, info = drift_loss(gen, pos, neg, neg_weight=torch.zeros(1, 1, dtype=torch.float64))
    assert info["scale"].item() == pytest.approx((1e-4 + 2.0) / 2, rel=1e-12)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("with_neg", [False, True])
def test_drift_loss_matches_authors_loop(weights, with_neg):
    b, c_g, c_p, c_n, s = 3, 4, 3, 2, 3
    gen = rand(b, c_g, s, seed=1).requires_grad_()
    pos, neg = rand(b, c_p, s, seed=2) + 0.5, rand(b, c_n, s, seed=3) if with_neg else None
    gw = rand_weight(b, c_g, seed=4) if weights else None
    pw = rand_weight(b, c_p, seed=5) if weights else None
    nw = rand_weight(b, c_n, seed=6) if weights and with_neg else None
    temps = (0.02, 0.05, 0.2, 1.0)
    loss, info = drift_loss(gen, pos, neg, temperatures=temps, gen_weight=gw, pos_weight=pw, neg_weight=nw)
    loss.sum().backward()
    exp_loss, exp_scale, exp_ms, exp_grad = authors_loss(
        gen.tolist(), pos.tolist(), None if neg is None else neg.tolist(), temps,
        gw.tolist() if gw is not None else None, pw.tolist() if pw is not None else None,
        nw.tolist() if nw is not None else None,
    )
    assert info["scale"].item() == pytest.approx(exp_scale, rel=1e-10)
    torch.testing.assert_close(info["drift_ms"], torch.tensor(exp_ms, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, torch.tensor(exp_loss, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(gen.grad, torch.tensor(exp_grad, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_drift_loss_gradient_flows_only_through_gen():
    gen = rand(4, 5, 6, seed=1).requires_grad_()
    pos, neg = rand(4, 3, 6, seed=2).requires_grad_(), rand(4, 2, 6, seed=3).requires_grad_()
    w = rand_weight(4, 2).requires_grad_()
    loss, _ = drift_loss(gen, pos, neg, neg_weight=w)
    loss.mean().backward()
    assert gen.grad is not None and gen.grad.abs().max() > 0
    assert pos.grad is None and neg.grad is None and w.grad is None


def test_drift_loss_gradient_is_the_normalized_drift():
    """d loss_b / d gen = -2 sum_tau F_tau / lambda_tau / (s_in C_g S): the gradient points along the drift."""
    gen = rand(2, 6, 4, seed=1).requires_grad_()
    pos = rand(2, 5, 4, seed=2) + 1.0
    loss, info = drift_loss(gen, pos)
    loss.sum().backward()
    # loss_b = mean (residual)^2 with residual = -sum F/lambda, so sum_b loss_b * (C_g S) = |grad|^2 (s_in C_g S)^2 / 4
    s_in = max(info["scale"].item() / 2.0, 1e-3)
    c_g, s = 6, 4
    expected_sq = loss.detach().sum().item() * c_g * s
    assert (gen.grad.square().sum().item() * (s_in * c_g * s) ** 2 / 4) == pytest.approx(expected_sq, rel=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_drift_loss_reduction_is_the_mean_or_sum_of_the_problems(reduction):
    """reduction="mean"/"sum": the scalar and its gradient equal those of the [B] losses reduced afterwards."""
    pos, neg, w = rand(5, 4, 6, seed=2), rand(5, 2, 6, seed=3), rand_weight(5, 2)
    gens = [rand(5, 3, 6, seed=1).requires_grad_() for _ in range(2)]
    losses, _ = drift_loss(gens[0], pos, neg, neg_weight=w)
    expected = losses.mean() if reduction == "mean" else losses.sum()
    (2.5 * expected).backward()
    reduced, info = drift_loss(gens[1], pos, neg, neg_weight=w, reduction=reduction)
    (2.5 * reduced).backward()
    assert reduced.dim() == 0 and info["drift_ms"].shape == (3,)
    torch.testing.assert_close(reduced, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(gens[1].grad, gens[0].grad, rtol=1e-12, atol=0)


def test_drift_loss_is_zero_when_positives_and_negatives_coincide():
    """With neg == pos and the generated columns weighted 0, attraction and repulsion cancel exactly."""
    gen = rand(3, 5, 4, seed=1).requires_grad_()
    y = rand(3, 6, 4, seed=2)
    loss, info = drift_loss(gen, y, y.clone(), gen_weight=torch.zeros(3, 5, dtype=torch.float64))
    loss.sum().backward()
    assert loss.abs().max() < 1e-20 and gen.grad.abs().max() < 1e-10
    assert info["drift_ms"].max() < 1e-20


@pytest.mark.parametrize("factor", [0.25, 7.0, 300.0])
def test_drift_loss_is_invariant_to_feature_scale(factor):
    """Exact up to the code's absolute clamps (self distance 1e-4, scales >= 1e-3), which these sizes keep far off."""
    gen = rand(4, 6, 5, seed=1).requires_grad_()
    pos, neg = rand(4, 7, 5, seed=2) + 0.3, rand(4, 2, 5, seed=3)
    loss, info = drift_loss(gen, pos, neg)
    loss.sum().backward()
    gen2 = (gen.detach() * factor).requires_grad_()
    loss2, info2 = drift_loss(gen2, pos * factor, neg * factor)
    loss2.sum().backward()
    assert info2["scale"].item() == pytest.approx(info["scale"].item() * factor, rel=1e-4)
    torch.testing.assert_close(loss2, loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gen2.grad * factor, gen.grad, rtol=1e-4, atol=1e-8)


def test_drift_loss_bf16_inputs_use_fp32_math():
    gen = rand(3, 4, 8, dtype=torch.float32).bfloat16().requires_grad_()
    pos = rand(3, 5, 8, seed=2, dtype=torch.float32).bfloat16()
    loss, _ = drift_loss(gen, pos)
    loss.sum().backward()
    ref_gen = gen.detach().float().requires_grad_()
    ref, _ = drift_loss(ref_gen, pos.float())
    ref.sum().backward()
    assert loss.dtype == torch.float32 and gen.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gen.grad.float(), ref_gen.grad, rtol=1e-2, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Exactness of chunked computation and of precomputed statistics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_drift_loss_chunked_equals_whole(chunk_size):
    b = 10
    gen = rand(b, 6, 5, seed=1).requires_grad_()
    pos, neg, nw = rand(b, 4, 5, seed=2), rand(b, 3, 5, seed=3), rand_weight(b, 3, seed=4)
    whole, info = drift_loss(gen, pos, neg, neg_weight=nw)
    (g_whole,) = torch.autograd.grad(whole.sum(), gen)
    chunked, info_c = drift_loss(gen, pos, neg, neg_weight=nw, chunk_size=chunk_size)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), gen)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(info_c["scale"], info["scale"], rtol=1e-12, atol=0)
    torch.testing.assert_close(info_c["drift_ms"], info["drift_ms"], rtol=1e-12, atol=0)


def test_drift_loss_fp32_chunked_equals_whole():
    gen = rand(9, 8, 16, seed=1, dtype=torch.float32).requires_grad_()
    pos = rand(9, 8, 16, seed=2, dtype=torch.float32)
    whole, _ = drift_loss(gen, pos)
    chunked, _ = drift_loss(gen, pos, chunk_size=2)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_precomputed_stats_over_class_chunks_equal_the_whole_call():
    """How a caller splits classes over gradient-accumulation chunks: statistics first, then each chunk's loss."""
    gen = rand(8, 5, 4, seed=1).requires_grad_()
    pos = rand(8, 6, 4, seed=2)
    whole, _ = drift_loss(gen, pos)
    stats = drift_stats(gen, pos, chunk_size=3)
    assert isinstance(stats, DriftStats)
    parts = [drift_loss(gen[i:i + 4], pos[i:i + 4], stats=stats)[0] for i in (0, 4)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=0)


def test_local_statistics_differ_from_global_ones():
    """Guard for the semantics: statistics of a sub-batch are not those of the call."""
    gen, pos = rand(8, 5, 4, seed=1), rand(8, 6, 4, seed=2) * 3
    whole, _ = drift_loss(gen, pos)
    half, _ = drift_loss(gen[:4], pos[:4])
    assert not torch.allclose(half, whole[:4], rtol=1e-3)


def test_options_reach_the_paper_variants():
    gen, pos, neg = rand(4, 5, 3, seed=1), rand(4, 6, 3, seed=2), rand(4, 2, 3, seed=3)
    base, _ = drift_loss(gen, pos, neg)
    for kwargs in (dict(normalize="y"), dict(normalize="none"), dict(affinity_floor=0.0), dict(attraction=1.5),
                   dict(repulsion=2.0), dict(temperatures=(0.05,))):
        other, _ = drift_loss(gen, pos, neg, **kwargs)
        assert other.shape == base.shape and torch.isfinite(other).all()
        assert not torch.allclose(other, base), kwargs


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before any computation
# ---------------------------------------------------------------------------------------------------------------------

GOOD = dict(gen=torch.randn(2, 3, 4), pos=torch.randn(2, 5, 4), neg=torch.randn(2, 2, 4))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(gen=torch.randn(2, 3)), "gen"),
        (dict(pos=torch.randn(2, 5, 3)), "pos"),
        (dict(pos=torch.randn(3, 5, 4)), "pos"),
        (dict(pos=torch.randn(2, 0, 4)), "pos"),
        (dict(neg=torch.randn(2, 2, 5)), "neg"),
        (dict(gen=torch.randint(0, 3, (2, 3, 4))), "gen"),
        (dict(temperatures=()), "temperatures"),
        (dict(temperatures=(0.02, 0.0)), "temperature"),
        (dict(temperatures=(-1.0,)), "temperature"),
        (dict(temperatures=(float("nan"),)), "temperature"),
        (dict(gen=torch.full((2, 3, 4), float("nan"))), "gen"),
        (dict(pos=torch.full((2, 5, 4), float("inf"))), "pos"),
        (dict(neg_weight=torch.ones(2, 3)), "neg_weight"),
        (dict(pos_weight=torch.ones(5)), "pos_weight"),
        (dict(gen_weight=-torch.ones(2, 3)), "gen_weight"),
        (dict(normalize="x"), "normalize"),
        (dict(affinity_floor=-1.0), "affinity_floor"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(neg=None, neg_weight=torch.ones(2, 2)), "neg_weight"),
        (dict(reduction="average"), "reduction"),
    ],
)
def test_drift_loss_rejects_bad_input(change, match):
    kwargs = {**GOOD, **change}
    with pytest.raises(ValueError, match=match):
        drift_loss(**kwargs)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(4)), "x"),
        (dict(pos=torch.randn(2, 5, 3)), "pos"),
        (dict(pos=torch.randn(2, 0, 4)), "pos"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(pos_weight=torch.ones(2, 4)), "pos_weight"),
        (dict(x=torch.full((2, 3, 4), float("nan"))), "x"),
        (dict(neg=None, self_negatives=False), "neg"),
    ],
)
def test_drift_field_rejects_bad_input(change, match):
    kwargs = dict(x=torch.randn(2, 3, 4), pos=torch.randn(2, 5, 4), neg=torch.randn(2, 2, 4), temperature=0.5)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        drift_field(**kwargs)


def test_bad_input_is_rejected_before_any_computation(monkeypatch):
    import drifting.drift as drift

    def fail(*args, **kwargs):
        raise AssertionError("computation started")

    monkeypatch.setattr(drift, "pairwise_distance", fail)
    with pytest.raises(ValueError, match="pos"):
        drift.drift_loss(torch.randn(2, 3, 4), torch.randn(2, 5, 5))


def test_partial_sums_over_chunks_give_the_statistics_of_the_whole_call():
    """The public partial-sums API: chunks that are never in memory together, summed, give drift_stats."""
    from drifting.drift import field_square_sums, scale_sums

    gen, pos, neg, nw = rand(9, 5, 4, seed=1), rand(9, 6, 4, seed=2), rand(9, 2, 4, seed=3), rand_weight(9, 2)
    parts = [slice(0, 4), slice(4, 9)]
    total = sum(scale_sums(gen[s], pos[s], neg[s], neg_weight=nw[s]) for s in parts)
    squares = sum(field_square_sums(gen[s], pos[s], neg[s], neg_weight=nw[s], total_scale_sums=total) for s in parts)
    stats = DriftStats.from_sums(total, squares)
    whole = drift_stats(gen, pos, neg, neg_weight=nw)
    torch.testing.assert_close(stats.scale, whole.scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.drift_ms, whole.drift_ms, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="total_scale_sums"):
        field_square_sums(gen, pos, total_scale_sums=torch.ones(3))


def test_stacked_keys_in_groups_give_each_keys_own_sums():
    """Several keys' problems stacked along B with `groups`: one row of sums per key, each at its own scale, equal to
    one call per key (what FeatureDriftLoss.stats does with the keys of one tap)."""
    from drifting.drift import field_square_sums, scale_sums

    gen, pos, neg, nw = rand(9, 5, 4, seed=1), rand(9, 6, 4, seed=2), rand(9, 2, 4, seed=3), rand_weight(9, 2)
    pos[6:] = pos[6:] * 3  # the third key lives at a larger scale
    parts, groups = [slice(0, 1), slice(1, 6), slice(6, 9)], [1, 5, 3]
    sums = scale_sums(gen, pos, neg, neg_weight=nw, groups=groups)
    assert sums.shape == (3, 2)
    for row, k in zip(sums, parts):
        torch.testing.assert_close(row, scale_sums(gen[k], pos[k], neg[k], neg_weight=nw[k]), rtol=1e-12, atol=0)
    assert not torch.allclose(sums[0, 0] / sums[0, 1], sums[2, 0] / sums[2, 1], rtol=0.1)
    squares = field_square_sums(gen, pos, neg, neg_weight=nw, total_scale_sums=sums, groups=groups, chunk_size=2)
    assert squares.shape == (3, 4)
    for row, k, total in zip(squares, parts, sums):
        alone = field_square_sums(gen[k], pos[k], neg[k], neg_weight=nw[k], total_scale_sums=total)
        torch.testing.assert_close(row, alone, rtol=1e-12, atol=0)
    for bad in ([1, 5], [0, 6, 3], [1.0, 5, 3]):
        with pytest.raises(ValueError, match="groups"):
            scale_sums(gen, pos, neg, neg_weight=nw, groups=bad)
    with pytest.raises(ValueError, match="total_scale_sums"):
        field_square_sums(gen, pos, neg, neg_weight=nw, total_scale_sums=sums[0], groups=groups)


def test_stacked_keys_in_one_loss_call_equal_one_call_per_key():
    """drift_loss(groups=...): each key's problems at its own statistics, losses and gradient as in K calls (what
    FeatureDriftLoss(..., group_keys=True) does with a tap's mean and std keys); chunking does not matter."""
    gen, pos, neg, nw = rand(9, 5, 4, seed=1), rand(9, 6, 4, seed=2), rand(9, 2, 4, seed=3), rand_weight(9, 2)
    pos[6:] = pos[6:] * 3
    parts, groups = [slice(0, 1), slice(1, 6), slice(6, 9)], [1, 5, 3]
    key_stats = [drift_stats(gen[k], pos[k], neg[k], neg_weight=nw[k]) for k in parts]
    stacked = DriftStats(torch.stack([s.scale for s in key_stats]), torch.stack([s.drift_ms for s in key_stats]))
    assert not torch.allclose(stacked.drift_ms[0], stacked.drift_ms[2], rtol=0.1)  # the keys differ
    alone = []
    for k, st in zip(parts, key_stats):
        leaf = gen[k].clone().requires_grad_()
        loss, info = drift_loss(leaf, pos[k], neg[k], neg_weight=nw[k], stats=st)
        loss.sum().backward()
        alone.append((loss.detach(), leaf.grad))
    for chunk_size in (None, 2):
        leaf = gen.clone().requires_grad_()
        loss, info = drift_loss(leaf, pos, neg, neg_weight=nw, stats=stacked, groups=groups, chunk_size=chunk_size)
        loss.sum().backward()
        torch.testing.assert_close(loss.detach(), torch.cat([a[0] for a in alone]), rtol=1e-12, atol=0)
        torch.testing.assert_close(leaf.grad, torch.cat([a[1] for a in alone]), rtol=1e-12, atol=1e-300)
        assert torch.equal(info["scale"], stacked.scale) and torch.equal(info["drift_ms"], stacked.drift_ms)
    with pytest.raises(ValueError, match="groups"):
        drift_loss(gen, pos, neg, neg_weight=nw, groups=groups)  # no statistics
    with pytest.raises(ValueError, match="stats"):
        drift_loss(gen, pos, neg, neg_weight=nw, stats=key_stats[0], groups=groups)  # one key's statistics
    with pytest.raises(ValueError, match="groups"):
        drift_loss(gen, pos, neg, neg_weight=nw, stats=stacked, groups=[1, 5, 2])


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside torch.compile
def test_compiled_partial_sums_equal_the_reference():
    """impl="compiled": the reference math under torch.compile (the statistics pass's many small element-wise
    kernels fused), over chunks and stacked keys at their own scales; drift_loss itself does not take it."""
    from drifting.drift import field_square_sums, scale_sums

    gen, pos, neg, nw = rand(9, 5, 4, seed=1), rand(9, 6, 4, seed=2), rand(9, 2, 4, seed=3), rand_weight(9, 2)
    pos[6:] = pos[6:] * 3
    groups = [1, 5, 3]
    sums = {impl: scale_sums(gen, pos, neg, neg_weight=nw, groups=groups, chunk_size=4, impl=impl)
            for impl in ("reference", "compiled")}
    torch.testing.assert_close(sums["compiled"], sums["reference"], rtol=1e-10, atol=0)
    squares = {impl: field_square_sums(gen, pos, neg, neg_weight=nw, total_scale_sums=sums["reference"], groups=groups,
                                       chunk_size=4, impl=impl) for impl in ("reference", "compiled")}
    torch.testing.assert_close(squares["compiled"], squares["reference"], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="impl"):
        drift_loss(gen, pos, neg, impl="compiled")


def test_impl_argument_is_checked():
    gen, pos = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2)
    with pytest.raises(ValueError, match="impl"):
        drift_loss(gen, pos, impl="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="impl"):
            drift_loss(gen, pos, impl="fused")  # on CPU tensors, the fused kernel cannot run
