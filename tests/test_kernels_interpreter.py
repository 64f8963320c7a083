"""The fused kernel's passes under Triton's CPU interpreter (TRITON_INTERPRET=1), against the reference code.

The GPU tests (test_kernels.py) cover the real kernel at real sizes; these run on any machine with Triton installed
and check the wiring: the statistics' partial sums over class chunks (`scale_sums`, `field_square_sums`,
`FeatureDriftLoss.stats`) and the loss take the kernel's passes 1, 2 and 3 with impl="fused" and agree with
impl="reference". The interpreter is chosen when Triton is imported, hence a child process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")

CHILD = r'''
import torch
from drifting import drift
from drifting.feature_loss import ClassBatch, FeatureDriftLoss
from drifting.features import FeatureConfig

def close(a, b, tol, what):
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: relative error {err:.3g}"

g = torch.Generator().manual_seed(0)
b, c_g, c_p, c_n, s = 6, 5, 7, 3, 10
gen = torch.randn(b, c_g, s, generator=g)
pos = torch.randn(b, c_p, s, generator=g) + 0.3
neg = torch.randn(b, c_n, s, generator=g)
w = torch.rand(b, c_n, generator=g) * 3
opts = dict(temperatures=(0.05, 0.2, 1.0), normalize="xy", affinity_floor=1e-6, self_mask=100.0)

# pass 1 and pass 2, summed over two chunks of problems
sums = {impl: sum(drift.scale_sums(gen[k], pos[k], neg[k], neg_weight=w[k], impl=impl)
                  for k in (slice(0, 2), slice(2, 6))) for impl in ("reference", "fused")}
close(sums["fused"], sums["reference"], 1e-5, "scale_sums")
squares = {impl: sum(drift.field_square_sums(gen[k], pos[k], neg[k], neg_weight=w[k], total_scale_sums=sums["reference"],
                                             impl=impl, **opts) for k in (slice(0, 2), slice(2, 6)))
           for impl in ("reference", "fused")}
close(squares["fused"], squares["reference"], 1e-4, "field_square_sums")
for normalize in ("y", "none"):
    o = dict(opts, normalize=normalize)
    a, r = (drift.field_square_sums(gen, pos, neg, neg_weight=w, total_scale_sums=sums["reference"], impl=i, **o)
            for i in ("fused", "reference"))
    close(a, r, 1e-4, f"field_square_sums normalize={normalize}")

# two keys' problems stacked (groups 2 and 4), each at its own scale: as separate calls, on both paths
parts, groups = (slice(0, 2), slice(2, 6)), [2, 4]
separate = torch.stack([drift.scale_sums(gen[k], pos[k], neg[k], neg_weight=w[k], impl="reference") for k in parts])
for impl in ("reference", "fused"):
    close(drift.scale_sums(gen, pos, neg, neg_weight=w, groups=groups, impl=impl), separate, 1e-5, f"grouped {impl}")
totals = separate * torch.tensor([[1.0, 1.0], [0.5, 1.0]], dtype=torch.float64)  # scales 2x apart
separate = torch.stack([drift.field_square_sums(gen[k], pos[k], neg[k], neg_weight=w[k], total_scale_sums=t,
                                                impl="reference", **opts) for k, t in zip(parts, totals)])
for impl in ("reference", "fused"):
    grouped = drift.field_square_sums(gen, pos, neg, neg_weight=w, total_scale_sums=totals, groups=groups, impl=impl,
                                      **opts)
    close(grouped, separate, 1e-4, f"grouped field_square_sums {impl}")

# the loss (pass 3) with those statistics, and its gradient
stats = drift.DriftStats.from_sums(sums["reference"], squares["reference"])
out = {}
for impl in ("reference", "fused"):
    leaf = gen.clone().requires_grad_()
    loss, _ = drift.drift_loss(leaf, pos, neg, neg_weight=w, stats=stats, impl=impl, **opts)
    loss.sum().backward()
    out[impl] = (loss.detach(), leaf.grad)
close(out["fused"][0], out["reference"][0], 1e-4, "loss")
close(out["fused"][1], out["reference"][1], 1e-4, "gradient")

# two keys' problems stacked in one loss call, each at its own statistics (per-problem scale and lambdas)
key_stats = [drift.DriftStats.from_sums(t, q) for t, q in zip(totals, separate)]
stacked = drift.DriftStats(*(torch.stack(part) for part in zip(*key_stats)))
alone = torch.cat([drift.drift_loss(gen[k], pos[k], neg[k], neg_weight=w[k], stats=st, impl="reference", **opts)[0]
                   for k, st in zip(parts, key_stats)])
for impl in ("reference", "fused"):
    leaf = gen.clone().requires_grad_()
    loss, _ = drift.drift_loss(leaf, pos, neg, neg_weight=w, stats=stacked, groups=groups, impl=impl, **opts)
    loss.sum().backward()
    close(loss.detach(), alone, 1e-4, f"grouped loss {impl}")
    out[impl + " grouped"] = leaf.grad
close(out["fused grouped"], out["reference grouped"], 1e-4, "grouped gradient")

# the whole call (passes 1-3; pass 3 takes the softmax normalisers of pass 2), in every mode and kernel variant
from drifting.kernels import drift_triton
for normalize, variants in (("xy", ({}, {"share_norm": False}, {"split2": False})), ("y", ({},)), ("none", ({},))):
    for variant in variants:
        drift_triton.VARIANT.update(dict(split2=True, share_norm=True), **variant)
        o = dict(opts, normalize=normalize)
        res = {}
        for impl in ("reference", "fused"):
            leaf = gen.clone().requires_grad_()
            loss, info = drift.drift_loss(leaf, pos, neg, neg_weight=w, impl=impl, **o)
            loss.sum().backward()
            res[impl] = (loss.detach(), leaf.grad, info["drift_ms"])
        for k, what in enumerate(("loss", "gradient", "drift_ms")):
            close(res["fused"][k], res["reference"][k], 1e-4, f"whole call {what} {normalize} {variant}")
drift_triton.VARIANT.update(split2=True, share_norm=True)

# FeatureDriftLoss.stats over class chunks: raw samples, 3 classes in chunks of 1 and 2
x = torch.randn(3 * 4, 1, 4, 4, generator=g)
p = torch.randn(3 * 5, 1, 4, 4, generator=g)
n = torch.randn(3 * 2, 1, 4, 4, generator=g)
cw = torch.tensor([1.0, 2.0, 0.5])
chunks = [ClassBatch(x[:4], p[:5], n[:2], cw[:1]), ClassBatch(x[4:], p[5:], n[2:], cw[1:])]
fs = {impl: FeatureDriftLoss(None, FeatureConfig(), impl=impl, **opts).stats(chunks) for impl in ("reference", "fused")}
for key, st in fs["reference"].keys.items():
    close(fs["fused"].keys[key].scale, st.scale, 1e-5, f"{key} scale")
    close(fs["fused"].keys[key].drift_ms, st.drift_ms, 1e-4, f"{key} drift_ms")
assert fs["fused"].num_classes == 3

# the losses of the stacked statistics calls on the kernel (stats(stacked_losses=True)), taken by the chunk calls
grads = {}
for impl, options in (("reference", {}), ("fused", dict(stack_below=10**6, stacked_losses=True))):
    fdl = FeatureDriftLoss(None, FeatureConfig(), impl=impl, **opts)
    st = fdl.stats(chunks, **options)
    assert (st.losses is None) == (impl == "reference")
    leaf = x.clone().requires_grad_()
    for k, (lo, hi) in enumerate(((0, 4), (4, 12))):
        fdl(leaf[lo:hi], chunks[k].pos, chunks[k].neg, chunks[k].w, stats=st, chunk=k)[0].backward()
    grads[impl] = leaf.grad
close(grads["fused"], grads["reference"], 1e-4, "stacked losses gradient")
print("ok")
'''


def run_under_the_interpreter(code: str) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_fused_passes_equal_reference_under_the_interpreter():
    run_under_the_interpreter(CHILD)


TAPS_CHILD = r'''
import torch
from torch import nn
from drifting.feature_loss import ClassBatch, FeatureDriftLoss
import drifting.features
from drifting.features import FeatureConfig, tap_sets

calls = []  # the fused kernel's calls (to know that the fused path ran)
kernel = drifting.features.fused_tap_statistics
drifting.features.fused_tap_statistics = lambda fmap, *a: calls.append(fmap.requires_grad) or kernel(fmap, *a)
import drifting.feature_loss
layout_calls = []  # the layout kernel's, likewise
layout_kernel = drifting.feature_loss.fused_problem_layout
drifting.feature_loss.fused_problem_layout = lambda v, n_c: layout_calls.append(n_c) or layout_kernel(v, n_c)

def close(a, b, tol, what):
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: relative error {err:.3g}"

g = torch.Generator().manual_seed(0)
# The six statistics keys and their gradient (with weights on all, or on some keys only), fused against reference:
# maps divisible by 4, by 2 only, by neither; non-square; channels-last and transposed strides; bf16; every subset.
cases = [((3, 5, 8, 8), torch.float32, "a-d", None), ((2, 3, 6, 6), torch.float32, "a-d", None),
         ((2, 3, 7, 5), torch.float32, "a-d", None), ((2, 40, 4, 4), torch.float32, "a-d", "channels_last"),
         ((2, 3, 8, 12), torch.float32, "a-c", "transposed"), ((2, 3, 8, 8), torch.float32, "a,b", None),
         ((2, 3, 16, 16), torch.float32, "a-d", "some"), ((2, 3, 32, 32), torch.bfloat16, "a-d", None)]
for shape, dtype, subset, how in cases:
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)
    if how == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if how == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    res = {}
    for fused in (False, True):
        leaf = x.detach().clone().requires_grad_()
        keys = dict(tap_sets("t", leaf, subset, fused=fused))
        del keys["t"]  # the location key is a view either way
        assert ("TapStatistics" in type(keys["t_mean"].grad_fn).__name__) == fused
        used = [k for k in keys if how != "some" or k in ("t_mean", "t_std_2", "t_std_4")]
        weights = [torch.randn(keys[k].shape, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(used)]
        (grad,) = torch.autograd.grad(sum((keys[k] * wk).sum() for k, wk in zip(used, weights)), leaf)
        res[fused] = (keys, grad)
    (ref, ref_grad), (got, got_grad) = res[False], res[True]
    assert list(got) == list(ref), (list(got), list(ref))
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype == torch.float32, k
        close(got[k], ref[k], 1e-6, f"{shape} {subset} {how} key {k}")
    assert got_grad.dtype == dtype and got_grad.stride() == x.stride()
    # bf16 gradients: the same fp32 sums rounded once to bf16; one rounding step apart where the order differs
    close(got_grad, ref_grad, 1e-2 if dtype == torch.bfloat16 else 1e-6, f"{shape} {subset} {how} gradient")

# FeatureDriftLoss with fused keys (drift math on the reference) against reference keys: the statistics over two
# class chunks, then each chunk's loss call, grouped (one drift_loss call per tap and dtype) or not (one per key; a
# tap's fused keys still differentiated together), with and without stacked losses; and one call without chunks.
class Taps(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1)
    def taps(self, x):
        a = torch.relu(self.a(x))
        return {"a": a, "b": torch.tanh(self.b(a))}

torch.manual_seed(0)
enc = Taps()
features = FeatureConfig(use_norm_x=False)
x = torch.randn(3 * 4, 1, 8, 8, generator=g)
p = torch.randn(3 * 5, 1, 8, 8, generator=g)
n = torch.randn(3 * 2, 1, 8, 8, generator=g)
cw = torch.tensor([1.0, 2.0, 0.5])
chunks = [ClassBatch(x[:4], p[:5], n[:2], cw[:1]), ClassBatch(x[4:], p[5:], n[2:], cw[1:])]
results, whole = {}, {}
for fused in (False, True):
    for group_keys, options in ((False, {}), (True, {}), (True, dict(stack_below=40, stacked_losses=True))):
        fdl = FeatureDriftLoss(enc, features, impl="reference")
        fdl.fused_keys = fused
        calls.clear()
        layout_calls.clear()
        st = fdl.stats(chunks, group_keys=group_keys, **options)
        leaf = x.clone().requires_grad_()
        total = 0.0
        for k, (lo, hi) in enumerate(((0, 4), (4, 12))):
            loss, _ = fdl(leaf[lo:hi], chunks[k].pos, chunks[k].neg, chunks[k].w, stats=st, chunk=k,
                          group_keys=group_keys)
            loss.backward()
            total += loss.item()
        # fused: every key of the statistics passes and of the loss calls, the generated samples' with gradient too
        assert bool(calls) == fused and any(calls) == fused, calls
        assert set(layout_calls) == ({2} if fused else set()), layout_calls  # the 2-class chunk (1 class: a view)
        results[fused, group_keys, bool(options)] = (st, total, leaf.grad)
    # the whole batch in one call (no chunks: the per-process call of multi-GPU training)
    fdl = FeatureDriftLoss(enc, features, impl="reference")
    fdl.fused_keys = fused
    calls.clear()
    leaf = x.clone().requires_grad_()
    loss, _ = fdl(leaf, p, n, cw)
    loss.backward()
    assert any(calls) == fused, calls
    whole[fused] = (loss.item(), leaf.grad)
# each against the reference in float64 (float32 itself is ~2e-5 from it here, on either path: the keys' float
# rounding, ~1e-7, grows in the distances of nearly equal vectors)
enc64 = Taps().double()
enc64.load_state_dict(enc.state_dict())
chunks64 = [ClassBatch(c.gen.double(), c.pos.double(), c.neg.double(), c.w.double()) for c in chunks]
fdl = FeatureDriftLoss(enc64, features, impl="reference")
ref_st = fdl.stats(chunks64)
leaf = x.double().requires_grad_()
ref_loss = sum(fdl(leaf[lo:hi], chunks64[k].pos, chunks64[k].neg, chunks64[k].w, stats=ref_st, chunk=k)[0]
               for k, (lo, hi) in enumerate(((0, 4), (4, 12))))
ref_loss.backward()
for name, (st, total, grad) in results.items():
    for key, s in ref_st.keys.items():
        close(st.keys[key].scale, s.scale, 1e-4, f"{name} {key} scale")
        close(st.keys[key].drift_ms, s.drift_ms, 1e-4, f"{name} {key} drift_ms")
    assert abs(total - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (name, total, ref_loss.item())
    close(grad, leaf.grad, 5e-5, f"{name} gradient")
assert abs(whole[True][0] - whole[False][0]) <= 1e-5 * abs(whole[False][0]), whole
close(whole[True][1], whole[False][1], 5e-5, "one call: gradient")
print("ok")
'''


def test_fused_tap_statistics_equal_reference_under_the_interpreter():
    run_under_the_interpreter(TAPS_CHILD)


LAYOUT_CHILD = r'''
import torch
from drifting.feature_loss import _problems
from drifting.kernels.layout_triton import problem_layout

g = torch.Generator().manual_seed(0)
# (classes, samples per class, C, H, W, dtype, how): the per-location key of an NCHW or channels-last tap, a slice of
# one (the real samples' positives), and contiguous vectors (the window keys); sizes off the 64 x 64 tiles
cases = [(3, 4, 5, 8, 8, torch.float32, "nchw"), (2, 3, 70, 9, 10, torch.bfloat16, "nchw"),
         (2, 2, 6, 4, 4, torch.float32, "channels_last"), (3, 2, 5, 6, 6, torch.float32, "sliced"),
         (1, 5, 130, 2, 2, torch.bfloat16, "contiguous"), (4, 1, 3, 1, 1, torch.float32, "nchw")]
for classes, per_class, c, h, w, dtype, how in cases:
    n = classes * per_class
    tap = torch.randn(n + (per_class if how == "sliced" else 0), c, h, w, generator=g).to(dtype)
    if how == "channels_last":
        tap = tap.to(memory_format=torch.channels_last)
    if how == "contiguous":
        tap = tap.flatten(2).transpose(1, 2).contiguous()  # already [N, L, S]
    res = {}
    for layout in (_problems, problem_layout):
        leaf = tap.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        vectors = leaf if how == "contiguous" else leaf.flatten(2).transpose(1, 2)
        if how == "sliced":
            vectors = vectors[per_class:]
        strides = []
        vectors.register_hook(lambda grad: strides.append(grad.stride()))
        out = layout(vectors, classes)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        (grad,) = torch.autograd.grad((out.float() * weight.float()).sum(), leaf)
        res[layout] = (out, grad)
        if layout is problem_layout and how in ("nchw", "channels_last", "contiguous"):
            # the vectors' gradient comes in their own layout, so it passes back through the view without a copy
            assert strides == [vectors.stride()], (how, strides, vectors.stride())
    (ref, ref_grad), (got, got_grad) = res[_problems], res[problem_layout]
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.is_contiguous(), (how, got.shape, ref.shape)
    assert torch.equal(got, ref), how  # pure data movement: bitwise
    assert torch.equal(got_grad, ref_grad), how
    with torch.no_grad():  # the statistics passes' path: the kernel without an autograd node
        vectors = tap if how == "contiguous" else tap.flatten(2).transpose(1, 2)
        vectors = vectors[per_class:] if how == "sliced" else vectors
        got = problem_layout(vectors, classes)
    assert got.grad_fn is None and torch.equal(got, _problems(vectors, classes)), how

print("ok")
'''


def test_fused_problem_layout_equals_reference_under_the_interpreter():
    """The keys' vectors laid out as problems by the layout kernel: bitwise the reference's, forward and backward,
    from NCHW and channels-last taps, slices of them and contiguous vectors, in fp32 and bf16."""
    run_under_the_interpreter(LAYOUT_CHILD)


def test_fused_tap_statistics_only_where_the_kernel_takes_the_map(monkeypatch):
    """The fused keys run on CUDA or under the interpreter, for float32/bf16/fp16 maps of at most 64 x 64 locations;
    elsewhere (a CPU, float64 maps, larger maps) the reference reductions."""
    import torch

    from drifting import kernels

    cpu = torch.zeros(2, 3, 8, 8)
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    assert not kernels.use_fused_taps(cpu)
    monkeypatch.setattr(kernels, "_interpreting", lambda: True)
    assert kernels.use_fused_taps(cpu) and kernels.use_fused_taps(cpu.bfloat16())
    assert kernels.use_fused_taps(torch.zeros(1, 1, 64, 64)) and not kernels.use_fused_taps(torch.zeros(1, 1, 64, 65))
    assert not kernels.use_fused_taps(cpu.double()) and not kernels.use_fused_taps(torch.zeros(0, 3, 8, 8))
