"""FeatureDriftLoss: agreement with a literal construction of the problems, exactness of class chunks with gradient
accumulation and of 2 gloo processes against one process (loss, per-key statistics and the generated samples'
gradient), a frozen encoder that still passes gradient through, and the errors on bad input."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from drifting.drift import all_reduce_sum, drift_loss
from drifting.feature_loss import SAMPLE, ClassBatch, FeatureDriftLoss
from drifting.features import FeatureConfig, feature_sets
from drifting.models.resnet_mae import ResNetMAE, ResNetMAEConfig
from multiproc import spawn

# 4 classes, 3 generated, 3 positive and 2 unconditional samples per class, on a 16x16 latent-shaped input.
N_C, C_G, C_P, C_N = 4, 3, 3, 2
# Classes held by each of 2 processes (uneven), and the class chunks each processes in turn.
RANK_CLASSES = [(0, 3), (3, 4)]
RANK_CHUNKS = [[(0, 2), (2, 3)], [(3, 4)]]


def make_encoder() -> ResNetMAE:
    torch.manual_seed(0)  # every process builds the same weights
    return ResNetMAE(ResNetMAEConfig(image_size=16, width=4)).double()


def make_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    gen = torch.randn(N_C * C_G, 4, 16, 16, generator=g, dtype=torch.float64)
    pos = torch.randn(N_C * C_P, 4, 16, 16, generator=g, dtype=torch.float64) + 0.3
    neg = torch.randn(N_C * C_N, 4, 16, 16, generator=g, dtype=torch.float64)
    w = torch.rand(N_C, generator=g, dtype=torch.float64) * 3
    return gen, pos, neg, w


def classes(t: torch.Tensor, per_class: int, lo: int, hi: int) -> torch.Tensor:
    return t[lo * per_class:hi * per_class]


def chunk_of(gen, pos, neg, w, lo, hi):
    return classes(gen, C_G, lo, hi), classes(pos, C_P, lo, hi), classes(neg, C_N, lo, hi), w[lo:hi]


def whole(fdl=None, inputs=None):
    """Loss, info and gradient of the generated samples for the whole batch in one call."""
    fdl = fdl or FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = inputs or make_inputs()
    gen.requires_grad_()
    loss, info = fdl(gen, pos, neg, w)
    loss.backward()
    return loss.detach(), info, gen.grad


def chunked(fdl, gen, pos, neg, w, chunks, all_reduce=None, keep_sources=False, **stats_options):
    """Class chunks with exact statistics and gradient accumulation into gen.grad (keep_sources: the loss calls
    reuse the real samples' taps of the statistics pass; stats_options: more options of `stats`)."""
    gen = gen.detach().clone().requires_grad_()
    stats = fdl.stats([ClassBatch(*chunk_of(gen.detach(), pos, neg, w, lo, hi)) for lo, hi in chunks],
                      all_reduce=all_reduce, keep_sources=keep_sources, **stats_options)
    total, infos = 0.0, []
    for k, (lo, hi) in enumerate(chunks):
        loss, info = fdl(*chunk_of(gen, pos, neg, w, lo, hi), stats=stats, chunk=k)
        loss.backward()  # gradient accumulation: gen.grad sums the chunks' contributions
        total, infos = total + loss.detach(), infos + [info]
    return total, infos, gen.grad, stats


def assert_same_stats(got, expected) -> None:
    """Every key's statistics equal to float rounding (the float64 sums added in another order)."""
    for key, s in expected.keys.items():
        torch.testing.assert_close(got.keys[key].scale, s.scale, rtol=1e-12, atol=0, msg=key)
        torch.testing.assert_close(got.keys[key].drift_ms, s.drift_ms, rtol=1e-10, atol=0, msg=key)


def test_loss_matches_literal_problem_construction():
    """The problems of every key built by explicit (class, location) indexing, all keys through one autograd graph."""
    encoder = make_encoder()
    loss, info, grad = whole(FeatureDriftLoss(encoder))
    gen, pos, neg, w = make_inputs()
    gen.requires_grad_()

    def keys(x):
        return feature_sets(x, encoder.patchify(x), encoder.taps(x))

    fg, fp, fn = keys(gen), keys(pos), keys(neg)
    assert len(fg) == 2 + 10 * 7 + 2 * 5  # on 16x16, layer4 is 2x2: no 4x4 windows there
    total = 0.0
    for key in fg:
        num_loc = fg[key].shape[1]
        # Problem b = c * L + l holds sample i of class c at location l: row c * count + i of the key.
        rows = lambda count: [[c * count + i for i in range(count)] for c in range(N_C) for _ in range(num_loc)]  # noqa
        locs = lambda count: [[l] * count for _ in range(N_C) for l in range(num_loc)]  # noqa
        g = fg[key][rows(C_G), locs(C_G)]  # (N_c L, C_g, S)
        p = fp[key][rows(C_P), locs(C_P)]
        n = fn[key][rows(C_N), locs(C_N)]
        nw = torch.stack([w[c].expand(C_N) for c in range(N_C) for _ in range(num_loc)])  # (N_c L, C_n)
        key_loss, _ = drift_loss(g, p, n, neg_weight=nw)
        torch.testing.assert_close(key_loss.mean().detach(), info[key]["loss"], rtol=1e-10, atol=0)
        total = total + key_loss.mean()
    total.backward()
    torch.testing.assert_close(loss, total.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, gen.grad, rtol=1e-9, atol=1e-15)


def test_two_class_chunks_with_gradient_accumulation_equal_whole():
    fdl = FeatureDriftLoss(make_encoder())
    loss, info, grad = whole(fdl)
    total, infos, chunk_grad, stats = chunked(fdl, *make_inputs(), chunks=[(0, 1), (1, 4)])
    torch.testing.assert_close(total, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunk_grad, grad, rtol=1e-9, atol=1e-15)
    assert stats.num_classes == N_C and list(stats.keys) == list(info)
    for key in info:
        torch.testing.assert_close(stats.keys[key].scale, info[key]["scale"], rtol=1e-12, atol=0)
        torch.testing.assert_close(stats.keys[key].drift_ms, info[key]["drift_ms"], rtol=1e-10, atol=0)
        torch.testing.assert_close(sum(i[key]["loss"] for i in infos), info[key]["loss"], rtol=1e-10, atol=0)
    # Not vacuous: the second chunk with its own statistics gives another loss (rescaled from its 3 classes to 4).
    gen, pos, neg, w = make_inputs()
    alone, _ = fdl(*chunk_of(gen, pos, neg, w, 1, 4))
    share = sum(i["loss"] for i in infos[1].values())
    assert not torch.allclose(alone * 3 / 4, share, rtol=1e-4)


def test_stats_keeping_the_sources_equal_recomputing_them_with_one_encoder_pass_less():
    fdl = FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = make_inputs()
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in [(0, 1), (1, 4)]]
    calls, taps = [], fdl.encoder.taps
    fdl.encoder.taps = lambda x: calls.append(1) or taps(x)  # count the encoder's runs
    recomputed = fdl.stats(batches)
    runs_recomputing, calls[:] = len(calls), []
    kept = fdl.stats(batches, keep_sources=True)
    assert (runs_recomputing, len(calls)) == (8, 4)  # 2 batches x (gen, real) x 2 passes, against 1 pass
    assert kept.num_classes == recomputed.num_classes == N_C and list(kept.keys) == list(recomputed.keys)
    for key, s in recomputed.keys.items():
        assert torch.equal(kept.keys[key].scale, s.scale) and torch.equal(kept.keys[key].drift_ms, s.drift_ms)


def test_stats_take_the_reference_math_unless_the_fused_kernel_is_asked_for(monkeypatch):
    # On a GPU "auto" would pick the kernel; the statistics pass takes it only when asked (impl="fused", or
    # fused_min_problems): the reference math is the default (with the first fp32 tiles the kernel was the slower
    # path; docs/benchmarks.md).
    from drifting import kernels
    called = []
    monkeypatch.setattr(kernels, "use_fused", lambda impl, *a: called.append(impl) or True)
    monkeypatch.setattr(kernels, "fused_scale_sums", lambda *a, **k: pytest.fail("the kernel's pass 1 ran"))
    gen, pos, neg, w = make_inputs()
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in [(0, 1), (1, 4)]]
    stats = FeatureDriftLoss(make_encoder(), impl="auto").stats(batches)
    assert stats.num_classes == N_C and called == []
    monkeypatch.setattr(kernels, "fused_scale_sums", lambda *a, **k: called.append("pass 1") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        FeatureDriftLoss(make_encoder(), impl="fused").stats(batches)
    assert called[-1] == "pass 1"


def test_stats_put_only_the_calls_of_enough_problems_on_the_kernel_and_compile_the_others(monkeypatch):
    # fused_min_problems: the kernel (impl "auto", i.e. where it runs) for calls that fill a GPU, the reference
    # math for the keys of few problems, in both passes.
    from drifting import drift
    seen = []
    for name in ("scale_sums", "field_square_sums"):
        real = getattr(drift, name)
        monkeypatch.setattr(drift, name, lambda g, *a, _real=real, _name=name, **k:  # compiled: checked in test_drift
                            seen.append((_name, g.shape[0], k["impl"]))
                            or _real(g, *a, **{**k, "impl": k["impl"].replace("compiled", "reference")}))
    gen, pos, neg, w = make_inputs()
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in [(0, 1), (1, 4)]]
    fdl = FeatureDriftLoss(make_encoder())
    reference = fdl.stats(batches)
    assert {impl for _, _, impl in seen} == {"reference"}
    seen.clear()
    mixed = fdl.stats(batches, fused_min_problems=8)
    assert {name for name, _, _ in seen} == {"scale_sums", "field_square_sums"}
    assert all(impl == ("auto" if problems >= 8 else "reference") for _, problems, impl in seen)
    assert {impl for _, _, impl in seen} == {"auto", "reference"}  # both kinds of calls occur
    for key, st in reference.keys.items():  # on the CPU "auto" is the reference math: the same statistics
        assert torch.equal(mixed.keys[key].scale, st.scale) and torch.equal(mixed.keys[key].drift_ms, st.drift_ms)
    seen.clear()
    fdl.stats(batches, fused_min_problems=8, compiled=True)  # the calls left to the reference math are compiled
    assert all(impl == ("auto" if problems >= 8 else "compiled") for _, problems, impl in seen)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="fused_min_problems"):
            fdl.stats(batches, fused_min_problems=bad)


def test_stats_stacking_the_small_calls_over_batches_equal_one_call_per_batch(monkeypatch):
    # stack_below: a call of fewer problems waits for the last batch and runs once over every batch's problems
    from drifting import drift
    calls = []
    real = drift.scale_sums
    monkeypatch.setattr(drift, "scale_sums", lambda g, *a, **k: calls.append((g.shape[0], k["groups"]))
                        or real(g, *a, **k))
    fdl = FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = make_inputs()
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in [(0, 1), (1, 2), (2, 4)]]
    per_batch = fdl.stats(batches)
    calls_per_batch, calls[:] = list(calls), []
    num_keys = len(per_batch.keys)
    assert len(calls_per_batch) == 3 * num_keys
    for stack_below, group_keys, keep in [(10**9, False, False), (8, False, True), (8, True, False)]:
        calls.clear()
        stacked = fdl.stats(batches, stack_below=stack_below, group_keys=group_keys, keep_sources=keep)
        assert list(stacked.keys) == list(per_batch.keys) and stacked.num_classes == N_C  # same keys, same order
        assert_same_stats(stacked, per_batch)
        if stack_below == 10**9:  # everything held: one call per key, over the three batches' problems
            totals = [sum(calls_per_batch[b * num_keys + k][0] for b in range(3)) for k in range(num_keys)]
            assert [n for n, _ in calls] == totals and all(groups == [n] for n, groups in calls)
        else:  # calls of >= 8 problems stay per batch, the smaller ones run once over the batches: fewer calls,
            # every problem in exactly one of them
            assert sum(n for n, _ in calls) == sum(n for n, _ in calls_per_batch)
            assert len(calls) < (len(calls_per_batch) if not group_keys else len(calls_per_batch) / 3)
            assert any(n >= 8 for n, _ in calls) and any(n < 8 for n, _ in calls_per_batch)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="stack_below"):
            fdl.stats(batches, stack_below=bad)


def test_stats_stack_batches_of_other_sample_counts_apart():
    # a batch whose classes have another number of generated samples cannot be concatenated with the others: its
    # problems are stacked apart, and the statistics stay those of one call per batch
    fdl = FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = make_inputs()
    few = ClassBatch(gen[:C_G - 1], pos[:C_P], neg[:C_N], w[:1])  # class 0 with one generated sample fewer
    batches = [few, ClassBatch(*chunk_of(gen, pos, neg, w, 1, 4))]
    per_batch, stacked = fdl.stats(batches), fdl.stats(batches, stack_below=10**9)
    assert_same_stats(stacked, per_batch)


def test_losses_from_the_statistics_pass_equal_the_loss_calls(monkeypatch):
    # stacked_losses: the stacked calls' losses and gradients come from the statistics pass; each chunk's loss call
    # takes them (chunk=k) and calls drift_loss only for the other keys: the same loss and gradient
    from drifting import feature_loss
    calls = []
    real = feature_loss.drift_loss
    monkeypatch.setattr(feature_loss, "drift_loss", lambda g, *a, **k: calls.append(g.shape[0]) or real(g, *a, **k))
    fdl = FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = make_inputs()
    spans = [(0, 1), (1, 2), (2, 4)]
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in spans]

    def step(group_keys=False, **options):
        stats = fdl.stats(batches, group_keys=group_keys, **options)
        calls.clear()
        leaf, total, infos = gen.clone().requires_grad_(), 0.0, []
        for k, (lo, hi) in enumerate(spans):
            loss, info = fdl(leaf[lo * C_G:hi * C_G], *chunk_of(gen, pos, neg, w, lo, hi)[1:], stats=stats, chunk=k,
                             group_keys=group_keys)
            loss.backward()
            total, infos = total + loss.detach(), infos + [info]
        return total, leaf.grad, infos, len(calls)

    reference = step()
    for options in [dict(stack_below=8), dict(stack_below=10**9), dict(stack_below=8, group_keys=True),
                    dict(stack_below=8, keep_sources=True)]:
        total, grad, infos, num_calls = step(stacked_losses=True, **options)
        torch.testing.assert_close(total, reference[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, reference[1], rtol=1e-10, atol=1e-15)
        assert num_calls < reference[3]  # the stacked keys left the loss calls
        for info, ref_info in zip(infos, reference[2]):
            assert list(info) == list(ref_info)  # every key reported, in the same order
            for key, entry in ref_info.items():
                torch.testing.assert_close(info[key]["loss"], entry["loss"], rtol=1e-12, atol=0, msg=key)
                torch.testing.assert_close(info[key]["drift_ms"], entry["drift_ms"], rtol=1e-10, atol=0, msg=key)
    assert step(stacked_losses=True, stack_below=10**9)[3] == 0  # every key from the statistics pass
    with pytest.raises(ValueError, match="stacked_losses"):
        fdl.stats(batches, stacked_losses=True)  # without stack_below
    stats = fdl.stats(batches, stack_below=8, stacked_losses=True)
    with pytest.raises(ValueError, match="chunk"):
        fdl(*chunk_of(gen, pos, neg, w, 0, 1), stats=stats, chunk=3)


def test_stats_pass_the_loss_options_to_both_passes(monkeypatch):
    # check_finite=False must reach pass 1 too: its check reads a flag back from the GPU, a host sync per key.
    from drifting import drift
    seen = []
    real = drift.scale_sums
    monkeypatch.setattr(drift, "scale_sums", lambda *a, **k: seen.append(k) or real(*a, **k))
    gen, pos, neg, w = make_inputs()
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in [(0, 1), (1, 4)]]
    FeatureDriftLoss(make_encoder(), check_finite=False, chunk_size=3).stats(batches)
    assert seen and all(k["check_finite"] is False and k["chunk_size"] == 3 for k in seen)
    bad = [ClassBatch(gen[:C_G].clone().fill_(float("nan")), pos[:C_P], neg[:C_N], w[:1])]
    with pytest.raises(ValueError, match="finite"):
        FeatureDriftLoss(None).stats(bad)  # checked by default


def test_stats_with_the_keys_of_each_tap_stacked_equal_one_call_per_key(monkeypatch):
    from drifting import drift
    calls = []
    real = drift.scale_sums
    monkeypatch.setattr(drift, "scale_sums", lambda *a, **k: calls.append(k["groups"]) or real(*a, **k))
    fdl = FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = make_inputs()
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in [(0, 1), (1, 4)]]
    per_key = fdl.stats(batches)
    calls_per_key, calls[:] = list(calls), []
    grouped = fdl.stats(batches, group_keys=True)
    assert all(groups == [groups[0]] for groups in calls_per_key)  # one key per call
    assert len(calls) < len(calls_per_key) / 3 and max(len(groups) for groups in calls) == 7  # a tap's 7 keys
    assert list(grouped.keys) == list(per_key.keys) and grouped.num_classes == per_key.num_classes == N_C
    assert_same_stats(grouped, per_key)


def test_loss_calls_with_the_mean_and_std_keys_of_each_tap_stacked_equal_one_call_per_key(monkeypatch):
    from drifting import feature_loss

    calls = []
    real = feature_loss.drift_loss
    monkeypatch.setattr(feature_loss, "drift_loss", lambda *a, **k: calls.append(k["groups"]) or real(*a, **k))
    fdl = FeatureDriftLoss(make_encoder().float())
    gen, pos, neg, w = (t.float() for t in make_inputs())
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in [(0, 1), (1, 4)]]
    stats = fdl.stats(batches)
    results = {}
    for group_keys in (False, True):
        calls.clear()
        leaf = chunk_of(gen, pos, neg, w, 1, 4)[0].clone().requires_grad_()
        loss, info = fdl(leaf, *chunk_of(gen, pos, neg, w, 1, 4)[1:], stats=stats, group_keys=group_keys)
        loss.backward()
        results[group_keys] = (loss.detach(), info, leaf.grad, list(calls))
    (loss, info, grad, per_key), (g_loss, g_info, g_grad, grouped) = results[False], results[True]
    assert all(groups is None for groups in per_key) and len(per_key) == len(info)
    # a tap's 7 keys in one call: here the location key is fp32 too (with a bf16 encoder it is bf16 and goes alone)
    assert len(grouped) < len(per_key) / 2 and max(len(groups or [0]) for groups in grouped) == 7
    torch.testing.assert_close(g_loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_grad, grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())
    assert list(g_info) == list(info)
    for key in info:
        torch.testing.assert_close(g_info[key]["loss"], info[key]["loss"], rtol=1e-5, atol=0, msg=key)
        assert torch.equal(g_info[key]["drift_ms"], info[key]["drift_ms"]), key
    with pytest.raises(ValueError, match="group_keys"):
        fdl(*chunk_of(gen, pos, neg, w, 1, 4), group_keys=True)  # no statistics


def test_loss_calls_reusing_the_real_taps_of_the_stats_equal_recomputing_them():
    fdl = FeatureDriftLoss(make_encoder())
    inputs, chunks = make_inputs(), [(0, 1), (1, 4)]
    total, _, grad, _ = chunked(fdl, *inputs, chunks=chunks)
    calls, taps = [], fdl.encoder.taps
    fdl.encoder.taps = lambda x: calls.append(x.shape[0]) or taps(x)  # count the encoder's runs and their samples
    kept_total, _, kept_grad, stats = chunked(fdl, *inputs, chunks=chunks, keep_sources=True)
    assert torch.equal(kept_total, total) and torch.equal(kept_grad, grad)
    assert len(stats.real_sources) == 2
    assert calls == [C_G, C_P + C_N, 3 * C_G, 3 * (C_P + C_N), C_G, 3 * C_G]  # the loss calls: generated only
    gen, pos, neg, w = inputs
    with pytest.raises(ValueError, match="chunk"):
        fdl(*chunk_of(gen, pos, neg, w, 0, 1), stats=stats, chunk=2)
    with pytest.raises(ValueError, match="real samples"):
        fdl(*chunk_of(gen, pos, neg, w, 0, 1), stats=stats, chunk=1)  # chunk 1 holds 3 classes


def test_encoder_is_frozen_but_passes_gradient():
    encoder = make_encoder()
    fdl = FeatureDriftLoss(encoder)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    _, _, grad = whole(fdl)
    assert all(p.grad is None for p in encoder.parameters())
    assert grad is not None and grad.abs().sum() > 0
    # With the tap keys only, all of the gradient has come back through the encoder.
    _, _, tap_grad = whole(FeatureDriftLoss(make_encoder(), FeatureConfig(use_global=False, use_norm_x=False)))
    assert tap_grad.abs().sum() > 0


def test_options_no_guidance_and_no_grad():
    encoder = make_encoder()
    gen, pos, neg, w = make_inputs()
    fdl = FeatureDriftLoss(encoder, FeatureConfig(subset="a,b", input_stat="mean_square"), temperatures=(0.05,),
                           chunk_size=7, check_finite=False)
    with torch.no_grad():
        loss, info = fdl(gen, pos, num_classes=N_C)  # no unconditional samples
    assert loss.shape == () and not loss.requires_grad and len(info) == 2 + 12 * 3
    assert info["layer1"]["drift_ms"].shape == (1,)
    # w = 0 on the unconditional columns is not the same as no unconditional columns (they stay in the softmaxes).
    # With one temperature every key's loss is 1 by construction, so the gradients are compared.
    x = gen.clone().requires_grad_()
    fdl(x, pos, num_classes=N_C)[0].backward()
    without = x.grad.clone()
    x.grad = None
    fdl(x, pos, neg, torch.zeros(N_C))[0].backward()
    assert not torch.allclose(x.grad, without)


def test_bad_inputs():
    fdl = FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = make_inputs()
    with pytest.raises(ValueError, match="number of classes"):
        fdl(gen, pos)
    with pytest.raises(ValueError, match="pos: expected N_c"):
        fdl(gen, pos[:-1], neg, w)
    with pytest.raises(ValueError, match="num_classes 3 does not match"):
        fdl(gen, pos, neg, w, num_classes=3)
    with pytest.raises(ValueError, match="not needed with stats"):
        fdl(gen, pos, neg, w, stats=fdl.stats([ClassBatch(gen, pos, neg, w)]), all_reduce=lambda t: t)
    with pytest.raises(ValueError, match="unknown drift option"):
        FeatureDriftLoss(make_encoder(), temperature=0.1)


def test_stats_given_the_global_class_count_never_read_the_gpu(monkeypatch):
    """total_classes (the trainer knows the global count): with all_reduce the count is not summed and read back
    (the one host sync of the statistics pass, and of a loss call that reduces its own statistics); the same
    statistics, loss and gradient; a count that cannot be right is refused."""
    fdl = FeatureDriftLoss(make_encoder())
    gen, pos, neg, w = make_inputs()
    spans = [(0, 2), (2, 4)]
    expected_loss, _, expected_grad, expected = chunked(fdl, gen, pos, neg, w, spans)
    reduced = []

    def all_reduce(t):  # one process: the sum over processes is the tensor itself
        reduced.append(t.numel())
        return t

    def no_item(t):
        raise AssertionError("a tensor was read back to the host")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_item)
        stats = fdl.stats([ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in spans],
                          all_reduce=all_reduce, total_classes=N_C)
    assert stats.num_classes == N_C and len(reduced) == 2 and reduced[0] == 2 * len(stats.keys)
    assert_same_stats(stats, expected)
    loss, _, grad, _ = chunked(fdl, gen, pos, neg, w, spans, total_classes=N_C)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    # One call on the whole local batch (the trainer's step of one chunk), statistics reduced inside: the same.
    whole_loss, _, whole_grad = whole(fdl, (gen, pos, neg, w))
    leaf = gen.detach().clone().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_item)
        loss, _ = fdl(leaf, pos, neg, w, all_reduce=lambda t: t, total_classes=N_C)
    loss.backward()
    torch.testing.assert_close(loss.detach(), whole_loss, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, whole_grad, rtol=0, atol=0)
    for bad, match in ((N_C - 1, "total_classes: expected an integer >= this batch's"), (True, "total_classes")):
        with pytest.raises(ValueError, match=match):
            fdl(gen, pos, neg, w, all_reduce=lambda t: t, total_classes=bad)
    with pytest.raises(ValueError, match="total_classes: expected an integer >= this batch's 4 classes .equal"):
        fdl(gen, pos, neg, w, total_classes=N_C + 1)
    with pytest.raises(ValueError, match="total_classes: not needed with stats"):
        fdl(gen, pos, neg, w, stats=stats, total_classes=N_C)
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in spans]
    with pytest.raises(ValueError, match="total_classes: expected None or an integer >= this process's"):
        fdl.stats(batches, all_reduce=all_reduce, total_classes=N_C - 1)
    with pytest.raises(ValueError, match="total_classes: without all_reduce expected this process's"):
        fdl.stats(batches, total_classes=N_C + 1)


# ---------------------------------------------------------------------------------------------------------------------
# 2 gloo processes == 1 process
# ---------------------------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a small CI machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fdl = FeatureDriftLoss(make_encoder())
        gen, pos, neg, w = make_inputs()
        lo, hi = RANK_CLASSES[rank]
        # The whole local batch in one call, statistics reduced inside each key's drift_loss.
        mine = classes(gen, C_G, lo, hi).clone().requires_grad_()
        loss, info = fdl(mine, classes(pos, C_P, lo, hi), classes(neg, C_N, lo, hi), w[lo:hi],
                         all_reduce=all_reduce_sum())
        loss.backward()
        # The same share in class chunks, with statistics from `stats` (one collective per pass).
        total, _, chunk_grad, stats = chunked(fdl, gen, pos, neg, w, RANK_CHUNKS[rank], all_reduce=all_reduce_sum())
        # And with the small statistics calls stacked over the chunks, their losses from the statistics pass.
        stacked, _, stacked_grad, _ = chunked(fdl, gen, pos, neg, w, RANK_CHUNKS[rank], all_reduce=all_reduce_sum(),
                                              stack_below=8, stacked_losses=True)
        # And with the global class count given (as the trainer does): one collective less, no host sync.
        counted, _, counted_grad, _ = chunked(fdl, gen, pos, neg, w, RANK_CHUNKS[rank], all_reduce=all_reduce_sum(),
                                              total_classes=N_C)
        torch.save({"loss": loss.detach(), "grad": mine.grad, "info": info, "chunk_loss": total,
                    "chunk_grad": classes(chunk_grad, C_G, lo, hi), "stats": stats.keys, "stacked_loss": stacked,
                    "stacked_grad": classes(stacked_grad, C_G, lo, hi), "counted_loss": counted,
                    "counted_grad": classes(counted_grad, C_G, lo, hi)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    spawn(_worker, 2, str(tmp_path / "init"), str(tmp_path))
    loss, info, grad = whole()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in ("", "chunk_", "stacked_", "counted_"):
        # Each process returns its share: the shares sum to the whole loss, the gradients are the whole's rows.
        torch.testing.assert_close(sum(p[f"{name}loss"] for p in parts), loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.cat([p[f"{name}grad"] for p in parts]), grad, rtol=1e-9, atol=1e-15)
    for p in parts:
        for key in info:
            for got in (p["info"][key], p["stats"][key]._asdict()):
                torch.testing.assert_close(got["scale"], info[key]["scale"], rtol=1e-12, atol=0)
                torch.testing.assert_close(got["drift_ms"], info[key]["drift_ms"], rtol=1e-10, atol=0)


def test_autocast_leaves_the_drift_math_in_float32():
    encoder = ResNetMAE(ResNetMAEConfig(image_size=16, width=4)).bfloat16()
    fdl = FeatureDriftLoss(encoder)
    gen, pos, neg, w = (t.bfloat16() for t in make_inputs())
    plain, _ = fdl(gen, pos, neg, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, info = fdl(gen, pos, neg, w)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def test_a_tap_encoder_and_an_own_key_encoder_give_the_pixel_key_set_exactly_over_chunks():
    """The pixel configs: ResNet-MAE keys (86 with global and norm_x) + the 13 ConvNeXt-V2 keys = 99, and the
    chunked statistics stay exact with both encoders."""
    from drifting.models.adapters import ConvNeXtV2Features, adapter_configs
    from drifting.models.resnet_mae import resnet_maes

    torch.manual_seed(0)
    mae = resnet_maes["mae_tiny"](in_channels=3, image_size=32).double()
    convnext = ConvNeXtV2Features(adapter_configs["convnextv2_tiny_test"]).double()
    fdl = FeatureDriftLoss([mae, convnext])
    g = torch.Generator().manual_seed(1)
    n_c, c_g, c_p, c_n = 2, 3, 3, 2
    gen = torch.randn(n_c * c_g, 3, 32, 32, generator=g, dtype=torch.float64).tanh().requires_grad_()
    pos = torch.randn(n_c * c_p, 3, 32, 32, generator=g, dtype=torch.float64).tanh()
    neg = torch.randn(n_c * c_n, 3, 32, 32, generator=g, dtype=torch.float64).tanh()
    w = torch.tensor([0.0, 2.5], dtype=torch.float64)
    loss, info = fdl(gen, pos, neg, w)
    assert len(info) == 99 and "global_mean" in info and "convnext_stage_1" in info and "layer4_std" in info
    (grad_whole,) = torch.autograd.grad(loss, gen)
    batches = [ClassBatch(gen[k * c_g:(k + 1) * c_g].detach(), pos[k * c_p:(k + 1) * c_p],
                          neg[k * c_n:(k + 1) * c_n], w[k:k + 1]) for k in range(n_c)]
    stats = fdl.stats(batches)
    total = 0.0
    for k, b in enumerate(batches):
        part, _ = fdl(gen[k * c_g:(k + 1) * c_g], b.pos, b.neg, b.w, stats=stats)
        total = total + part
    (grad_chunks,) = torch.autograd.grad(total, gen)
    torch.testing.assert_close(total, loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_chunks, grad_whole, rtol=1e-8, atol=1e-12)


def test_compiled_encoders_have_static_shapes_unless_told(monkeypatch):
    """compile_encoders compiles with dynamic=False (inductor lays out convolutions channels-last only in graphs
    without dynamic shapes: 15% faster encoder backward on an H200); an explicit option wins."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: seen.append(options) or fn)
    fdl = FeatureDriftLoss(make_encoder())
    fdl.compile_encoders()
    fdl.compile_encoders(dynamic=None, mode="max-autotune")
    assert seen == [{"dynamic": False}, {"dynamic": None, "mode": "max-autotune"}]


@pytest.mark.slow  # torch.compile of the encoder on the CPU: ~1 minute
def test_compiled_encoder_gives_the_same_loss_and_gradient():
    loss, info, grad = whole(FeatureDriftLoss(make_encoder()))
    fdl = FeatureDriftLoss(make_encoder())
    fdl.compile_encoders()
    assert "taps" in vars(fdl.encoder)  # the instance's own (compiled) taps hides the class's method
    compiled_loss, compiled_info, compiled_grad = whole(fdl)
    assert list(compiled_info) == list(info)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled_grad, grad, rtol=1e-4, atol=1e-8)


def test_taps_come_in_the_autocast_dtype_under_autocast():
    """Under autocast the tap encoders' maps are given in its dtype (the authors' bf16 MAE), even where the encoder
    returns fp32 (torch's autocast keeps GroupNorm outputs fp32 on CUDA; this encoder returns fp32 on purpose);
    without autocast, or with taps_in_autocast_dtype=False, as the encoder gives them. The loss and the gradient
    then stay within bf16 rounding of the fp32 ones."""

    class Fp32Taps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

        def taps(self, x):
            return {"a": torch.relu(self.conv(x)).float(), "b": torch.tanh(self.conv(x)[..., ::2, ::2]).float()}

    torch.manual_seed(0)
    fdl = FeatureDriftLoss(Fp32Taps(), FeatureConfig(use_norm_x=False))
    x = torch.randn(N_C * C_G, 4, 8, 8)
    assert {t.dtype for t in fdl._sources(x).values()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sources = fdl._sources(x)
        assert sources["a"].dtype == sources["b"].dtype == torch.bfloat16 and sources[SAMPLE].dtype == torch.float32
        fdl.taps_in_autocast_dtype = False
        assert {t.dtype for t in fdl._sources(x).values()} == {torch.float32}
        fdl.taps_in_autocast_dtype = True
    # Compiled (aot_eager: the graph as traced, no code generation), the cast runs inside the compiled taps: the
    # encoder's own maps come in bf16, equal to the eager path's, and fp32 again when the option is turned off.
    eager = {k: v for k, v in sources.items() if k in ("a", "b")}
    fdl.compile_encoders(backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = fdl.encoder.taps(x)
        assert all(compiled[k].dtype == torch.bfloat16 and torch.equal(compiled[k], eager[k]) for k in eager)
        assert all(torch.equal(fdl._sources(x)[k], eager[k]) for k in eager)
        fdl.taps_in_autocast_dtype = False
        assert {t.dtype for t in fdl.encoder.taps(x).values()} == {torch.float32}
        fdl.taps_in_autocast_dtype = True
    gen, pos, neg, w = (t.float() for t in make_inputs())
    gen, pos, neg = (t[:, :, :8, :8] for t in (gen, pos, neg))
    results = []
    for autocast in (False, True):
        leaf = gen.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = fdl(leaf, pos, neg, w)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (loss32, grad32), (loss16, grad16) = results
    torch.testing.assert_close(loss16, loss32, rtol=5e-3, atol=0)  # measured 6e-4; the gradient 1.6e-2
    assert grad16.dtype == torch.float32
    assert ((grad16 - grad32).norm() / grad32.norm()).item() < 5e-2
