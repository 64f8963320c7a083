"""The loss calls and statistics replayed from CUDA graphs (`cuda_graph.py`, `FeatureDriftLoss(cuda_graph=True)`,
`FeatureDriftLoss.stats(cuda_graph=True)`).

On CPU the graph is emulated (`backend="eager"`: the function re-run on the static inputs, its outputs copied into
the first run's): what is checked there is the caller's side of the contract, that every input reaches the graph
through its static copies and that no output is read after the next call has overwritten it. The GPU test replays a
real graph."""

from __future__ import annotations

import pytest
import torch

from drifting.cuda_graph import GraphedFunction
from drifting.feature_loss import ClassBatch, FeatureDriftLoss
from test_feature_loss import C_G, chunk_of, make_encoder, make_inputs

SPANS = [(0, 2), (2, 4)]  # two chunks of two classes: the same shapes, so one graph serves both


def test_graphed_function_reads_its_inputs_through_static_copies_and_recaptures_on_a_new_signature():
    seen = []

    def fn(x, pair, scale):
        seen.append(x)
        return {"y": x * pair[0] + pair[1] * scale, "scale": scale}

    graphed = GraphedFunction(fn, backend="eager")
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    out = graphed(a, (b, torch.ones(())), 2.0)
    torch.testing.assert_close(out["y"], a * b + 2.0, rtol=0, atol=0)
    assert out["scale"] == 2.0 and graphed.captures == 1
    first = out["y"]
    out = graphed(b, (a, torch.zeros(())), 2.0)  # same signature: replayed into the same output buffer
    assert graphed.captures == 1 and out["y"] is first
    torch.testing.assert_close(out["y"], a * b, rtol=0, atol=0)
    assert all(x is seen[0] for x in seen)  # fn only ever saw the static copy, never the caller's tensors
    graphed(b, (a, torch.zeros(())), 3.0)  # a plain value changed
    graphed(torch.randn(4, 2), (a[:1], torch.zeros(())), 3.0)  # a shape changed
    square = torch.randn(2, 2)
    graphed(square, (square, torch.zeros(())), 3.0)
    graphed(square.t(), (square, torch.zeros(())), 3.0)  # only a stride changed
    assert graphed.captures == 5
    with torch.no_grad():
        graphed(square.t(), (square, torch.zeros(())), 3.0)  # grad mode is part of the signature
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graphed(square.t(), (square, torch.zeros(())), 3.0)  # and autocast
    assert graphed.captures == 7
    with pytest.raises(ValueError, match="backend"):
        GraphedFunction(fn, backend="triton")


def test_the_emulated_graph_rejects_a_function_whose_output_depends_on_more_than_its_arguments():
    calls = []

    def fn(x):  # reads state that is not an argument: its second call returns another structure
        calls.append(1)
        return (x * 2,) * len(calls)

    graphed = GraphedFunction(fn, backend="eager")
    with pytest.raises(RuntimeError, match="changed between calls"):
        graphed(torch.ones(2))


def step(fdl, inputs, cuda_graph, backward_late=False, group_keys=False, stats_graph=False, **stats_options):
    """The trainer's chunked step; cuda_graph: the loss calls graphed; stats_graph: the statistics; backward_late:
    every chunk's backward after all the loss calls (the tap gradients of a graphed call must survive the next)."""
    gen, pos, neg, w = inputs
    stats = fdl.stats([ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in SPANS], cuda_graph=stats_graph,
                      **stats_options)
    leaf, losses, infos = gen.clone().requires_grad_(), [], []
    for k, (lo, hi) in enumerate(SPANS):
        loss, info = fdl(leaf[lo * C_G:hi * C_G], *chunk_of(gen, pos, neg, w, lo, hi)[1:], stats=stats, chunk=k,
                         group_keys=group_keys, cuda_graph=cuda_graph)
        if not backward_late:
            loss.backward()
        losses.append(loss)
        infos.append(info)
    if backward_late:
        sum(losses).backward()
    return [v.detach() for v in losses], infos, leaf.grad


def assert_same_step(got, expected, rtol=0.0, atol=0.0) -> None:
    """Equal losses, infos and gradient (bit for bit by default)."""
    for loss, ref in zip(got[0], expected[0]):
        torch.testing.assert_close(loss, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(got[2], expected[2], rtol=rtol, atol=atol)
    for info, ref_info in zip(got[1], expected[1]):
        assert list(info) == list(ref_info)
        for key, entry in ref_info.items():
            for name in ("loss", "scale", "drift_ms"):
                torch.testing.assert_close(info[key][name], entry[name], rtol=rtol, atol=atol, msg=f"{key} {name}")


@pytest.mark.parametrize("options", [dict(), dict(keep_sources=True, stack_below=8, stacked_losses=True),
                                     dict(keep_sources=True, stack_below=8, stacked_losses=True, group_keys=True)])
def test_graphed_loss_calls_equal_the_eager_ones(options):
    fdl = FeatureDriftLoss(make_encoder(), check_finite=False)
    fdl.graph_backend = "eager"
    group_keys = options.pop("group_keys", False)
    for seed in (1, 2):  # the second step replays the graph of the first on new samples and statistics
        inputs = make_inputs(seed)
        expected = step(fdl, inputs, False, group_keys=group_keys, **options)
        assert_same_step(step(fdl, inputs, True, group_keys=group_keys, **options), expected)
        assert_same_step(step(fdl, inputs, True, backward_late=True, group_keys=group_keys, **options), expected)
    assert fdl._graph.captures == 1


@pytest.mark.parametrize("loss_graph", [False, True])
def test_graphed_statistics_equal_the_eager_ones(loss_graph):
    fdl = FeatureDriftLoss(make_encoder(), check_finite=False)
    fdl.graph_backend = "eager"
    options = dict(keep_sources=True, stack_below=8, stacked_losses=True)
    for seed in (1, 2):  # the second step replays the first one's graph of the statistics on new samples
        inputs = make_inputs(seed)
        expected = step(fdl, inputs, False, **options)
        assert_same_step(step(fdl, inputs, loss_graph, stats_graph=True, **options), expected)
    assert fdl._stats_graph.captures == 1
    gen, pos, neg, w = make_inputs()
    batches = [ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in SPANS]
    stats = fdl.stats(batches, cuda_graph=True, **options)
    scale = stats.keys["conv1"].scale.clone()
    fdl.stats([b._replace(gen=b.gen * 2) for b in batches], cuda_graph=True, **options)
    assert torch.equal(stats.keys["conv1"].scale, scale)  # the key statistics are copies, not the graph's buffers
    with pytest.raises(ValueError, match="cuda_graph: statistics of one process"):
        fdl.stats(batches, cuda_graph=True, all_reduce=lambda t: t)


def test_graphed_loss_calls_without_gradient_and_after_an_option_changed():
    fdl = FeatureDriftLoss(make_encoder(), check_finite=False)
    fdl.graph_backend = "eager"
    gen, pos, neg, w = make_inputs()
    stats = fdl.stats([ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in SPANS])
    with torch.no_grad():
        expected = [fdl(*chunk_of(gen, pos, neg, w, lo, hi), stats=stats, chunk=k) for k, (lo, hi) in enumerate(SPANS)]
        got = [fdl(*chunk_of(gen, pos, neg, w, lo, hi), stats=stats, chunk=k, cuda_graph=True)
               for k, (lo, hi) in enumerate(SPANS)]
    for (loss, info), (ref, ref_info) in zip(got, expected):  # the first call's values survive the second call
        torch.testing.assert_close(loss, ref, rtol=0, atol=0)
        for key, entry in ref_info.items():
            torch.testing.assert_close(info[key]["loss"], entry["loss"], rtol=0, atol=0)
    assert fdl._graph.captures == 1
    fdl.drift_options = {**fdl.drift_options, "attraction": 2.0}  # an option the graph reads from the loss
    with torch.no_grad():
        loss, _ = fdl(*chunk_of(gen, pos, neg, w, 0, 2), stats=stats, chunk=0, cuda_graph=True)
        ref, _ = fdl(*chunk_of(gen, pos, neg, w, 0, 2), stats=stats, chunk=0)
    assert fdl._graph.captures == 2
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)


def test_graphed_loss_calls_need_statistics_and_no_finiteness_check():
    gen, pos, neg, w = make_inputs()
    fdl = FeatureDriftLoss(make_encoder(), check_finite=False)
    with pytest.raises(ValueError, match="cuda_graph: needs stats"):
        fdl(gen, pos, neg, w, cuda_graph=True)
    stats = fdl.stats([ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in SPANS])
    with pytest.raises(ValueError, match="cuda_graph: needs CUDA"):
        fdl(*chunk_of(gen, pos, neg, w, 0, 2), stats=stats, chunk=0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph: needs CUDA"):
        fdl.stats([ClassBatch(*chunk_of(gen, pos, neg, w, lo, hi)) for lo, hi in SPANS], cuda_graph=True)
    checked = FeatureDriftLoss(make_encoder())
    with pytest.raises(ValueError, match="check_finite"):
        checked(*chunk_of(gen, pos, neg, w, 0, 2), stats=stats, chunk=0, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_calls_replayed_from_a_cuda_graph_equal_the_eager_ones_on_the_gpu():
    torch.manual_seed(0)
    fdl = FeatureDriftLoss(make_encoder().float().cuda(), check_finite=False)
    options = dict(keep_sources=True, stack_below=8, stacked_losses=True, fused_min_problems=1)
    for seed in (1, 2):
        inputs = [t.float().cuda() for t in make_inputs(seed)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = step(fdl, inputs, False, group_keys=True, **options)
            # the same kernels on the same inputs; a tolerance of float rounding in case a kernel adds atomically
            assert_same_step(step(fdl, inputs, True, group_keys=True, **options), expected, rtol=1e-6, atol=1e-9)
            assert_same_step(step(fdl, inputs, True, backward_late=True, group_keys=True, **options), expected,
                             rtol=1e-6, atol=1e-9)
            assert_same_step(step(fdl, inputs, True, group_keys=True, stats_graph=True, **options), expected,
                             rtol=1e-6, atol=1e-9)
    assert fdl._graph.captures == 1 and fdl._stats_graph.captures == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_with_the_pixel_encoders_equal_the_eager_calls_on_the_gpu():
    # the ConvNeXt adapter normalises its input with ImageNet's mean and std: made once per device, not copied from
    # the host at each call (which is an error inside the statistics graph's capture)
    from drifting.models.adapters import ConvNeXtV2Features, adapter_configs
    from drifting.models.resnet_mae import resnet_maes

    torch.manual_seed(0)
    mae = resnet_maes["mae_tiny"](in_channels=3, image_size=32).cuda()
    convnext = ConvNeXtV2Features(adapter_configs["convnextv2_tiny_test"]).cuda()
    fdl = FeatureDriftLoss([mae, convnext], check_finite=False)
    g = torch.Generator().manual_seed(1)
    n_c, c_g, c_p, c_n = 4, 3, 3, 2
    spans = [(0, 2), (2, 4)]

    def samples():
        gen = torch.randn(n_c * c_g, 3, 32, 32, generator=g).tanh().cuda().requires_grad_()
        pos = torch.randn(n_c * c_p, 3, 32, 32, generator=g).tanh().cuda()
        neg = torch.randn(n_c * c_n, 3, 32, 32, generator=g).tanh().cuda()
        w = torch.rand(n_c, generator=g).cuda() * 3
        return gen, pos, neg, w

    for _ in range(2):
        gen, pos, neg, w = samples()
        out = []
        for graphs in (False, True):
            stats = fdl.stats([ClassBatch(gen[lo * c_g:hi * c_g].detach(), pos[lo * c_p:hi * c_p],
                                          neg[lo * c_n:hi * c_n], w[lo:hi]) for lo, hi in spans],
                              keep_sources=True, cuda_graph=graphs)
            gen.grad = None
            total = 0.0
            for k, (lo, hi) in enumerate(spans):
                loss, _ = fdl(gen[lo * c_g:hi * c_g], pos[lo * c_p:hi * c_p], neg[lo * c_n:hi * c_n], w[lo:hi],
                              stats=stats, chunk=k, cuda_graph=graphs)
                loss.backward()
                total = total + loss.detach()
            out.append((total, gen.grad.clone()))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-9)
        # The gradient runs back through the encoders' convolutions (cuDNN, TF32 by default), which are not
        # bitwise repeatable: two eager runs differ by up to 7e-7 of the largest entry on an H200, and the graphs
        # by as much (docs/benchmarks.md, fourteenth sitting); 1e-5 of the largest entry is float rounding.
        torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=1e-5 * out[0][1].abs().max().item())
    assert fdl._stats_graph.captures == 1 and fdl._graph.captures == 1
