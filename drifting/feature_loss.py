"""FeatureDriftLoss: the drifting loss over every feature key of a frozen encoder (official-code-notes.md 2.2-2.3).

One training step, for N_c classes with C_g generated samples, C_p positives and C_n unconditional real samples each:

    features of gen [N_c C_g, ...] (with grad), pos [N_c C_p, ...] and neg [N_c C_n, ...] (no grad)   features.py
    per key [N, L, S] -> problems [N_c L, C, S], class-major then location      _problems (kernels/layout_triton)
    neg columns weighted by the class's guidance weight w [N_c]
    drift_loss per key: [N_c L] losses sharing one distance scale and one lambda per temperature         drift.py
    total = sum over keys of (mean over the key's N_c L problems)

Exact statistics under chunking and across processes. The scale and lambdas of a key are global: over every class
and location of the step, on every process. Three ways to call, all giving the same loss and gradient:

* whole batch, one process:  loss, info = fdl(gen, pos, neg, w); loss.backward()
* whole local batch on each of several processes:  fdl(gen, pos, neg, w, all_reduce=all_reduce_sum()) sums the
  statistics' partial sums over processes inside each key's `drift_loss` (2 small collectives per key), and the
  per-key mean divides by the global number of problems. The returned loss is this process's share: the sum of the
  shares over processes is the global loss. DDP averages gradients over processes, so its gradient is that of the
  global loss divided by the world size (multiply the loss by the world size to undo it).
* classes in chunks with gradient accumulation (and optionally several processes):
      stats = fdl.stats([ClassBatch(gen_k.detach(), pos_k, neg_k, w_k) for k in chunks], all_reduce=...)
      for k in chunks: fdl(gen_k, pos_k, neg_k, w_k, stats=stats)[0].backward()
  `stats` makes two no-grad passes over all chunks (encoder forward on every sample each time, or once with
  `keep_sources=True`, which holds every chunk's taps between the passes): the first sums
  sum(w d) and sum(w) per key, reduced over processes in one collective, giving each key's scale; the second sums
  the squared fields per temperature at that scale, again one collective, giving the lambdas. The chunk calls then
  reuse them and divide by the global class count. gen_k with grad must be the same samples as the detached ones
  (regenerate from the same noise, or keep the generator's graph).

Memory: keys are built and consumed one at a time. Kept during a call: the encoder's taps of the real samples (no
graph); the taps of the generated samples with the encoder's autograd graph, up to the caller's backward; one
gradient buffer per tap, of the tap's size and dtype (the gradient of the summed key losses with respect to that
tap). Per key, only that key's vector sets, its problems ([N_c L, C, S] for gen, pos and neg) and the drift
temporaries (bounded by `chunk_size`) exist, and they are freed before the next key: each key's loss is
differentiated with respect to its tap right away (`torch.autograd.grad`), and the returned loss carries the
accumulated tap gradients into one backward through the encoder. Building every key's graph instead would keep each
key's fp32 residual for the backward until the end, about 1.6x the generated taps in fp32 (the per-location keys
are 1x, the 2x2 and 4x4 window statistics 0.6x); the tap gradient buffers are 1x in the taps' dtype. Where the fused
statistics keys run (CUDA; `kernels/tap_stats_triton.py`), a tap's six mean and std keys come from one kernel and are
differentiated together (with `group_keys` anyway): that run's drift graphs, ~0.6x the tap in fp32, live until its
backward. On CPU
(width 32, 4 classes of 8/8/2 samples) the peak grows by 160 MiB instead of 236 MiB with a bf16 encoder and 259 MiB
instead of 289 MiB in fp32.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from drifting import drift
from drifting.cuda_graph import GraphedFunction
from drifting.drift import AllReduce, DriftStats, drift_loss
from drifting.features import FeatureConfig, channel_norm, flatten_sample, tap_sets
from drifting.kernels import fused_problem_layout, fused_taps_run_on

# Names of the two non-tap sources of keys (brackets keep them apart from any tap name).
SAMPLE, INPUT = "(sample)", "(input)"
OWN_KEY = "(key)"  # prefix of the sources that are ready-made keys of an encoder with `feature_sets`
# Profiler ranges (torch.profiler.record_function) of the parts of a statistics pass and a loss call, so that a
# profile of a training step says how much GPU time each takes (benchmarks/train_step.py --profile sums them).
RANGE_ENCODERS = "drifting: encoders"
RANGE_PASS1 = "drifting: statistics pass 1 (keys, distance scale)"
RANGE_PASS2 = "drifting: statistics pass 2 (keys, fields)"
RANGE_STACKED = "drifting: stacked losses"
RANGE_LOSS = "drifting: keys and drift loss"
RANGES = (RANGE_ENCODERS, RANGE_PASS1, RANGE_PASS2, RANGE_STACKED, RANGE_LOSS)
DRIFT_OPTIONS = frozenset(
    {"temperatures", "normalize", "affinity_floor", "self_mask", "attraction", "repulsion", "chunk_size",
     "check_finite", "impl"}
)


class ClassBatch(NamedTuple):
    """Samples of N_c classes, class-major. num_classes is needed only when w is None."""

    gen: Tensor  # [N_c C_g, C, H, W] generated samples
    pos: Tensor  # [N_c C_p, C, H, W] positives: real samples of each class
    neg: Tensor | None = None  # [N_c C_n, C, H, W] unconditional real samples (extra negatives), or None
    w: Tensor | None = None  # [N_c] guidance weight of each class's unconditional samples (default 1)
    num_classes: int | None = None


class FeatureStats(NamedTuple):
    """Global statistics of one step: per key its DriftStats, and N_c over all chunks and processes.

    real_sources: with `stats(keep_sources=True)`, the encoder's taps of each batch's real samples (no graph), which
    the loss call of batch k reuses when given `chunk=k` instead of running the encoder on them again."""

    keys: dict[str, DriftStats]
    num_classes: int
    real_sources: tuple[dict[str, Tensor], ...] | None = None
    # with `stats(stacked_losses=True)`: per batch, key -> (its problems' losses [n], the gradient of their sum with
    # respect to the key's generated problems [n, C_g, S]), which the loss call of batch k takes given `chunk=k`
    losses: tuple[dict[str, tuple[Tensor, Tensor]], ...] | None = None


class FeatureDriftLoss:
    """Sum over feature keys of the mean drifting loss of the key's problems.

    Args:
        encoder: a module with `taps(x) -> {name: [N, C, h, w]}` and, for `norm_x`, `patchify(x) -> [N, C_in, h, w]`
            (e.g. `ResNetMAE`), or None for the loss on the raw samples alone (the `global` key). It is frozen
            here: requires_grad_(False) and eval(). Gradients still flow through it to the generated samples.
            Moving it to a device or running it under autocast is the caller's business.
        features: which keys (`FeatureConfig`; default the authors' 86-key set).
        **drift_options: passed to `drift_loss` and the partial sums of `drift.py`: temperatures, normalize,
            affinity_floor, self_mask, attraction, repulsion, chunk_size (problems per chunk inside a key),
            check_finite.
    """

    def __init__(self, encoder: nn.Module | Sequence[nn.Module] | None, features: FeatureConfig = FeatureConfig(),
                 **drift_options):
        unknown = set(drift_options) - DRIFT_OPTIONS
        if unknown:
            raise ValueError(f"unknown drift option(s) {sorted(unknown)}; valid: {sorted(DRIFT_OPTIONS)}")
        # encoder=None: the drifting loss on the raw samples only (the `global` key; vector data, the paper's policies)
        if encoder is None and not features.use_global:
            raise ValueError("features.use_global: must be on when there is no encoder (it would leave no key)")
        encoders = [] if encoder is None else list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
        # Tap encoders (`taps`, e.g. ResNet-MAE) get the key set of `features`; encoders with `feature_sets` (e.g. the
        # ConvNeXt-V2 of the pixel configs) bring their own keys. norm_x comes from the first tap encoder's input.
        self.encoders = [e.requires_grad_(False).eval() for e in encoders]
        for e in self.encoders:
            if not (hasattr(e, "taps") or hasattr(e, "feature_sets")):
                raise ValueError(f"encoder: {type(e).__name__} has neither taps(x) nor feature_sets(x)")
        taps = [e for e in self.encoders if not hasattr(e, "feature_sets")]
        self.encoder = taps[0] if taps else None  # the encoder whose patchify gives norm_x
        self.features = features
        self.drift_options = drift_options
        # a tap's mean and std keys from one kernel (kernels/tap_stats_triton.py) where it runs, unless impl="reference"
        self.fused_keys = drift_options.get("impl", "auto") != "reference"
        # with fused_keys, the keys' vectors laid out as problems by one kernel too (kernels/layout_triton.py); False:
        # by torch's copy (`_problems`), the baseline of benchmarks/train_step.py --reference-layout
        self.fused_layout = True
        # Under autocast, tap encoders' maps in the autocast dtype (see _sources); False: as the encoder gives them.
        self.taps_in_autocast_dtype = True
        self.num_temperatures = len(tuple(drift_options.get("temperatures", (0.02, 0.05, 0.2))))
        # __call__(cuda_graph=True): its graph (captured at the first such call) and a weak reference to the tap
        # gradients of the last graphed call, which live in the graph's buffers until the next replay.
        # graph_backend "eager": the graph emulated by re-running (`cuda_graph.GraphedFunction`), for CPU tests.
        self.graph_backend = "cuda"
        self._graph: GraphedFunction | None = None
        self._stats_graph: GraphedFunction | None = None  # stats(cuda_graph=True)
        self._pending_gradients: weakref.ref | None = None

    def compile_encoders(self, **options) -> None:
        """torch.compile the `taps` of every tap encoder (its GroupNorms and activations fuse around the convolutions).

        The same keys to float rounding; one compilation per input shape and grad mode (generated samples with
        gradient, real ones and the statistics pass without). options: passed to torch.compile; dynamic=False unless
        given: a training step calls the encoders at a few fixed batch sizes, and inductor lays out convolutions
        channels-last only in graphs without dynamic shapes (measured on an H200 at the ablation size: the generated
        chunk's forward + backward 52.3 -> 44.6 ms, the whole step 0.4 s faster; docs/benchmarks.md)."""
        options.setdefault("dynamic", False)
        for encoder in self.encoders:
            if hasattr(encoder, "taps") and not hasattr(encoder, "feature_sets"):
                # An instance attribute over the method. The cast of _sources (the taps in the autocast dtype) runs
                # inside the compiled region, fused into the kernels that make the maps: they write bf16 once,
                # not fp32 and then a bf16 copy of it.
                encoder.taps = torch.compile(lambda x, taps=encoder.taps: self._in_tap_dtype(taps(x), x.device.type),
                                             **options)

    def _in_tap_dtype(self, named: dict[str, Tensor], device_type: str) -> dict[str, Tensor]:
        """A tap encoder's fp32 maps in the autocast dtype under autocast (see _sources), unless
        taps_in_autocast_dtype is off; other maps as they are."""
        if not (self.taps_in_autocast_dtype and torch.is_autocast_enabled(device_type)):
            return named
        dtype = torch.get_autocast_dtype(device_type)
        return {name: t.to(dtype) if t.dtype == torch.float32 else t for name, t in named.items()}

    # -----------------------------------------------------------------------------------------------------------------
    # Features -> problems
    # -----------------------------------------------------------------------------------------------------------------

    def _sources(self, x: Tensor) -> dict[str, Tensor]:
        """The tensors the keys are computed from: the sample, the encoder input (for norm_x) and the taps.

        Under autocast the taps come in its dtype (bf16), as the authors' bf16 MAE gives its features
        (official-code-notes.md 1.3: the drift math's inputs "arrive as bf16"): torch's autocast would leave them
        fp32, because it runs GroupNorm, whose output most taps are, in fp32 on CUDA. That doubled the memory of
        kept taps, the bytes every key reads, and put the per-location keys on the drift kernel's fp32 path instead
        of its bf16 tensor-core one. Own-key encoders (ConvNeXt, fp32 in the authors' code) are left as they are."""
        out = {SAMPLE: x}
        if self.encoder is not None and self.features.use_norm_x:
            out[INPUT] = self.encoder.patchify(x)
        for encoder in self.encoders:
            if hasattr(encoder, "feature_sets"):  # ready-made vector sets [N, L, S], one source per key
                named = {OWN_KEY + key: vectors for key, vectors in encoder.feature_sets(x).items()}
            else:
                named = self._in_tap_dtype(encoder.taps(x), x.device.type)  # (compiled taps come cast already)
            for name in named:
                if name in out or name in (SAMPLE, INPUT):
                    raise ValueError(f"encoder: two sources are named {name!r}; tap and key names must be unique")
            out.update(named)
        return out

    def _vector_sets(self, sources: dict[str, Tensor], fused: bool = False) -> Iterator[tuple[str, str, Tensor]]:
        """(source name, key, vectors [N, L, S]) for every key, lazily, in the order of `features.feature_sets`.
        fused: a tap's statistics keys from the fused kernel where it runs (`features.tap_sets`); they then share
        one autograd node and must be differentiated together."""
        cfg = self.features
        if cfg.use_global:
            yield SAMPLE, "global", flatten_sample(sources[SAMPLE])
        if INPUT in sources:
            yield INPUT, "norm_x", channel_norm(sources[INPUT], cfg.input_stat)
        for name, fmap in sources.items():
            if name.startswith(OWN_KEY):
                yield name, name[len(OWN_KEY):], fmap
            elif name not in (SAMPLE, INPUT):
                for key, vectors in tap_sets(name, fmap, cfg.subset, fused=fused):
                    yield name, key, vectors

    def _problem_sets(self, gen_sources, real_sources, b: ClassBatch, gen_only=frozenset()):
        """Per key, lazily: (source, key, L, gen [N_c L, C_g, S], pos [N_c L, C_p, S], neg [N_c L, C_n, S] or None,
        neg_weight [N_c L, C_n] or None). The real sources hold pos then neg along the sample axis.
        gen_only: keys whose real problems are not needed (their losses are ready): pos, neg and neg_weight None.
        The neg weights [N_c L, C_n] depend on L only: one tensor per L, shared by the keys of that L (read only)."""
        n_c, n_pos = b.num_classes, b.pos.shape[0]
        sets = (self._vector_sets(sources, fused=self.fused_keys) for sources in (gen_sources, real_sources))
        fused = self.fused_keys and self.fused_layout and fused_taps_run_on(b.gen.device) and n_c > 1
        neg_weights: dict[int, Tensor] = {}  # L -> the neg weights of the keys with L locations
        for (src, key, g), (_, real_key, r) in zip(*sets):
            assert key == real_key, (key, real_key)  # same encoder, same shapes: same keys in the same order
            num_loc = g.shape[1]
            # the layout kernel where _problems copies (several classes and locations; otherwise it is a view)
            layout = fused_problem_layout if fused and num_loc > 1 else _problems
            if key in gen_only:
                yield src, key, num_loc, layout(g, n_c), None, None, None
                continue
            neg = neg_weight = None
            if b.neg is not None:
                neg = layout(r[n_pos:], n_c)
                if b.w is not None:
                    neg_weight = neg_weights.get(num_loc)
                    if neg_weight is None:
                        c_n = b.neg.shape[0] // n_c
                        neg_weight = b.w[:, None, None].expand(n_c, num_loc, c_n).reshape(n_c * num_loc, c_n)
                        neg_weights[num_loc] = neg_weight
            yield src, key, num_loc, layout(g, n_c), layout(r[:n_pos], n_c), neg, neg_weight

    # -----------------------------------------------------------------------------------------------------------------
    # The loss
    # -----------------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        gen: Tensor,
        pos: Tensor,
        neg: Tensor | None = None,
        w: Tensor | None = None,
        *,
        num_classes: int | None = None,
        stats: FeatureStats | None = None,
        all_reduce: AllReduce | None = None,
        chunk: int | None = None,
        group_keys: bool = False,
        cuda_graph: bool = False,
        total_classes: int | None = None,
    ) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
        """The loss of one batch of classes (or of one chunk / one process's share, see the module docstring).

        Args:
            gen: [N_c C_g, C, H, W] generated samples, class-major; gradient flows to them.
            pos: [N_c C_p, C, H, W] positives; neg: [N_c C_n, C, H, W] unconditional samples or None.
            w: [N_c] guidance weight put on each class's unconditional columns (default 1); also gives N_c.
            num_classes: N_c, when w is None.
            stats: global statistics from `stats` (classes processed in chunks); the per-key mean then divides by
                stats.num_classes * L.
            all_reduce: sums partial sums over processes (`drift.all_reduce_sum()`); not with `stats`.
            chunk: this batch's index in the batches given to `stats`; with stats from `keep_sources=True`, the taps
                of its real samples (pos, neg: the same tensors as then) are taken from the stats, not recomputed.
            group_keys: with stats, one `drift_loss` call per run of consecutive keys of one source and dtype
                (with a bf16 encoder: a tap's six mean and std keys, fp32, together; its location key, bf16, alone),
                their problems stacked, each at its own key's statistics (`drift_loss(groups=...)`): the same
                losses, 26 calls instead of 86 for the latent MAE-256, more memory for one group's stacked
                problems. Keys of few problems leave the GPU nearly empty alone (on an H200 at the ablation size the
                loss calls of a step take 18% less time grouped).
            cuda_graph: with stats, the keys and drift losses (all but the encoders) replayed from one CUDA graph,
                captured at the first call and again whenever a shape, dtype or option changes: the same loss and
                gradient, the host's launches of ~900 kernels per call replaced by one (`cuda_graph.py`). Needs
                check_finite=False (a sync inside a graph is an error) and memory for the graph's own copy of the
                inputs (the generated and real taps) and of the temporaries of one call.
            total_classes: with all_reduce, the number of classes of all processes together where the caller knows
                it: then not summed over processes and read back (a host sync). Not with stats (they hold it).

        Returns:
            loss: scalar, sum over keys of (sum of this batch's key losses / global number of problems of the key).
            info: key -> {"loss": that key's term, "scale": scalar, "drift_ms": [R]} (detached; scale and drift_ms
                are the global statistics).
        """
        b = _check_batch(ClassBatch(gen, pos, neg, w, num_classes))
        if stats is not None and all_reduce is not None:
            raise ValueError("all_reduce: not needed with stats (they are already global)")
        if group_keys and stats is None:
            raise ValueError("group_keys: needs stats (each key's statistics must be known before its call)")
        if total_classes is not None:
            if stats is not None:
                raise ValueError("total_classes: not needed with stats (they hold the global count)")
            if (isinstance(total_classes, bool) or not isinstance(total_classes, int)
                    or total_classes < b.num_classes or (all_reduce is None and total_classes != b.num_classes)):
                raise ValueError(f"total_classes: expected an integer >= this batch's {b.num_classes} classes (equal "
                                 f"to it without all_reduce), got {total_classes!r}")
        if cuda_graph:
            if stats is None:
                raise ValueError("cuda_graph: needs stats (a graph is replayed over the chunks of a step)")
            self._check_graphable(gen)
        need_grad = torch.is_grad_enabled() and gen.requires_grad
        if chunk is not None and stats is not None and stats.real_sources is not None:
            if not 0 <= chunk < len(stats.real_sources):
                raise ValueError(f"chunk: expected an index below {len(stats.real_sources)} (the batches given to "
                                 f"stats), got {chunk}")
            real_sources = stats.real_sources[chunk]
            real_count = next(iter(real_sources.values())).shape[0]
            if real_count != pos.shape[0] + (0 if neg is None else neg.shape[0]):
                raise ValueError(f"chunk {chunk}: the statistics hold {real_count} real samples for it, "
                                 f"got {pos.shape[0]} positives and {0 if neg is None else neg.shape[0]} negatives")
        else:
            real = pos if neg is None else torch.cat([pos, neg])
            with torch.no_grad(), record_function(RANGE_ENCODERS):
                real_sources = self._sources(real)
        with record_function(RANGE_ENCODERS):
            sources = self._sources(gen)
        if stats is not None:
            total_classes = stats.num_classes
        elif total_classes is None and all_reduce is not None:  # the global count, read back: a host sync
            total_classes = round(all_reduce(gen.new_tensor([b.num_classes], dtype=torch.float64)).item())
        elif total_classes is None:
            total_classes = b.num_classes
        # the losses that the statistics pass computed already (stats(stacked_losses=True)), for this batch
        ready = {}
        if chunk is not None and stats is not None and stats.losses is not None:
            if not 0 <= chunk < len(stats.losses):
                raise ValueError(f"chunk: expected an index below {len(stats.losses)} (the batches given to stats), "
                                 f"got {chunk}")
            ready = stats.losses[chunk]
        key_stats = None if stats is None else stats.keys
        # Keys are computed from detached copies of the sources; their gradients are collected per key and handed to
        # the graph-carrying sources (and through the encoder to gen) in one backward by _WithGradients.
        leaves = {k: v.detach().requires_grad_(need_grad) for k, v in sources.items()}
        if cuda_graph:
            total, info, grads = self._graphed_key_losses(leaves, real_sources, b, ready, key_stats, total_classes,
                                                          need_grad, group_keys)
        else:
            with torch.set_grad_enabled(need_grad), record_function(RANGE_LOSS):
                total, info, grads = self._key_losses(leaves, real_sources, b, ready, key_stats, total_classes,
                                                      need_grad, group_keys, all_reduce, chunk)
        if need_grad:
            names = list(grads)
            tap_grads = _TapGradients(tuple(grads[k] for k in names))
            if cuda_graph:  # they are the graph's buffers: the next call clones them if their backward is still to come
                self._pending_gradients = weakref.ref(tap_grads)
            total = _WithGradients.apply(total, tap_grads, *(sources[k] for k in names))
        return total, info

    def _key_losses(self, leaves: dict[str, Tensor], real_sources: dict[str, Tensor], b: ClassBatch,
                    ready: dict[str, tuple[Tensor, Tensor]], key_stats: dict[str, DriftStats] | None,
                    total_classes: int, need_grad: bool, group_keys: bool, all_reduce: AllReduce | None = None,
                    chunk: int | None = None) -> tuple[Tensor, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        """The keys' losses from the sources' detached `leaves`: (total, info in the keys' order, per source the
        gradient of total with respect to it). See __call__; `ready`: key -> its losses and gradient from the
        statistics pass."""
        total, grads, info, order = None, {}, {}, []

        def add_gradient(src: str, grad: Tensor) -> None:
            # Accumulate in place into a buffer of our own (the gradient of a mean can be an expanded view).
            grads[src] = grads[src].add_(grad) if src in grads else grad.contiguous()

        # (source, key, L, g, p, n, nw), lazily; the keys whose losses are ready need no real problems
        problem_sets = self._problem_sets(leaves, real_sources, b, gen_only=ready.keys())
        # Runs of keys differentiated together, in one backward to their tap: a source's keys of one dtype with
        # group_keys (which also stacks them into one drift_loss call) or with fused statistics keys (a tap's six
        # share one autograd node, freed by the first backward through it); otherwise each key alone, its graph
        # freed before the next key is built.
        fused = self.fused_keys and fused_taps_run_on(b.gen.device)
        run_of = (lambda ps: (ps[0], ps[3].dtype)) if group_keys or fused else (lambda ps: ps[1])
        for _, together in itertools.groupby(problem_sets, key=run_of):
            together = list(together)
            order += [ps[1] for ps in together]
            src = together[0][0]  # one source per run
            outputs, output_grads = [], []  # what the run's backward starts from
            for _, key, num_loc, g, *_ in (ps for ps in together if ps[1] in ready):
                losses, grad_of_sum = ready[key]
                if losses.shape[0] != g.shape[0]:
                    raise ValueError(f"chunk {chunk}: the statistics hold {losses.shape[0]} problems of key "
                                     f"{key!r} for it, got {g.shape[0]}")
                denominator = total_classes * num_loc
                key_loss = losses.sum() / denominator
                if need_grad:  # the key's gradient with respect to its problems, to carry back to the tap
                    outputs.append(g)
                    output_grads.append((grad_of_sum / denominator).to(g.dtype))
                total = key_loss if total is None else total + key_loss
                info[key] = {"loss": key_loss, "scale": key_stats[key].scale, "drift_ms": key_stats[key].drift_ms}
            rest = [ps for ps in together if ps[1] not in ready]
            for call in ([rest] if group_keys and rest else [[ps] for ps in rest]):  # drift_loss calls
                _, keys, locs, g, p, n, nw = zip(*call)
                stacked_stats = None
                if key_stats is not None:
                    missing = [k for k in keys if k not in key_stats]
                    if missing:
                        raise KeyError(f"stats: no statistics for feature key {missing[0]!r}")
                    stacked_stats = _stacked_stats([key_stats[k] for k in keys])
                counts = [t.shape[0] for t in g]
                g, p, n, nw = _stacked(g, p, n, nw)
                groups = counts if len(keys) > 1 else None
                # The drift math stays in fp32 when the caller runs the encoder under autocast.
                with torch.autocast(b.gen.device.type, enabled=False):
                    losses, run_info = drift_loss(g, p, n, neg_weight=nw, stats=stacked_stats, all_reduce=all_reduce,
                                                  groups=groups, **self.drift_options)  # (sum of N_c L,)
                key_losses = [part.sum() / (total_classes * num_loc)
                              for part, num_loc in zip(losses.split(counts), locs)]
                if need_grad:
                    outputs.append(sum(key_losses))
                    output_grads.append(None)  # a scalar: d/d itself = 1
                for i, (key, key_loss) in enumerate(zip(keys, key_losses)):
                    key_loss = key_loss.detach()
                    total = key_loss if total is None else total + key_loss
                    info[key] = {"loss": key_loss, **(run_info if groups is None else
                                                      {name: v[i] for name, v in run_info.items()})}
            if outputs:
                add_gradient(src, torch.autograd.grad(outputs, leaves[src], output_grads)[0])
        if total is None:
            raise ValueError("FeatureDriftLoss: the feature configuration selects no keys")
        return total, {key: info[key] for key in order}, grads  # info in the keys' order, whichever were ready

    def _graphed_key_losses(self, leaves, real_sources, b, ready, key_stats, total_classes, need_grad, group_keys):
        """`_key_losses` replayed from a CUDA graph (`cuda_graph.GraphedFunction`): the sources, real sources, ready
        losses and statistics are copied into the graph's inputs, and its ~900 launches per chunk cost one. Returns
        the graph's own total and gradient buffers, which the next call overwrites (see `_TapGradients`)."""
        if self._graph is None:
            self._graph = GraphedFunction(self._graph_body, backend=self.graph_backend)
        pending = self._pending_gradients() if self._pending_gradients is not None else None
        if pending is not None and pending.grads is not None:  # the previous call's backward has not run yet
            pending.grads = tuple(g.clone() for g in pending.grads)
        with torch.set_grad_enabled(need_grad), record_function(RANGE_LOSS):
            total, losses, grads, order = self._graph(leaves, real_sources, b._replace(gen=b.gen.detach()), ready,
                                                      key_stats, total_classes, need_grad, group_keys,
                                                      self._graph_state())
            losses = losses.clone().unbind()  # the graph's buffer is overwritten by the next call
        info = {key: {"loss": loss, "scale": key_stats[key].scale, "drift_ms": key_stats[key].drift_ms}
                for key, loss in zip(order, losses)}
        return (total if need_grad else total.clone()), info, grads

    def _graph_body(self, leaves, real_sources, b, ready, key_stats, total_classes, need_grad, group_keys, _state):
        """What the CUDA graph of a loss call runs: `_key_losses` with tensor outputs (the key order is static).
        _state: `_graph_state()`, unused here: an argument so that a change of it makes a new graph."""
        total, info, grads = self._key_losses(leaves, real_sources, b, ready, key_stats, total_classes, need_grad,
                                              group_keys)
        return total, torch.stack([v["loss"] for v in info.values()]), grads, tuple(info)

    # -----------------------------------------------------------------------------------------------------------------
    # Exact global statistics over class chunks and processes
    # -----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def stats(self, batches: Sequence[ClassBatch], *, all_reduce: AllReduce | None = None,
              keep_sources: bool = False, group_keys: bool = False,
              fused_min_problems: int | None = None, compiled: bool = False,
              stack_below: int | None = None, stacked_losses: bool = False,
              cuda_graph: bool = False, total_classes: int | None = None) -> FeatureStats:
        """The per-key statistics of the union of `batches` (this process's class chunks) over all processes.

        Two passes over the batches (see the module docstring); two collectives in all. batches: a sequence (it is
        traversed twice) of `ClassBatch`, gen detached or not. keep_sources: run the encoders once per batch and
        keep every batch's taps for the second pass (one encoder pass less, memory for the taps of all batches at
        once); by default each pass runs the encoders again and only one batch's taps exist at a time. Same result.
        With keep_sources the real samples' taps stay in the returned stats for the loss calls (`chunk=k`).
        group_keys: one call of the statistics math per source (tap) and pass instead of one per key, the keys'
        problems stacked (see `_accumulate`); the same statistics to float rounding, ~4x fewer kernels, more memory
        for one source's stacked problems. On a 2-core CPU it was slower (larger temporaries fall out of cache: 8.2
        against 7.3 s, `mae_tiny`, 2 chunks of 1 class); on an H200 the pass took 1,490 instead of 1,592 ms.
        fused_min_problems: calls of at least this many problems take the fused kernel where it runs (impl "auto"),
        smaller ones the reference math; None: the reference math for all (unless the loss's impl is "fused").
        compiled: the reference math under torch.compile (`drift.scale_sums(impl="compiled")`): its element-wise
        chains fused into a few kernels; one compilation per kind of call (dynamic shapes), the same statistics to
        float rounding.
        stack_below: the calls of fewer problems than this in one batch (a key, or a source's keys with group_keys)
        wait for the last batch and run once, every batch's problems stacked: a key of 4 problems per 4-class chunk
        makes one call of 64 problems per step instead of 16 calls of 4, each of which would fill 4 of a GPU's
        ~132 SMs. The same statistics to float rounding (the float64 sums are added in another order); memory for
        those calls' problems of every batch until the end of each pass. None: every call per batch.
        stacked_losses: with stack_below, also the losses of those stacked calls, once the statistics are known: one
        `drift_loss` call over every batch's problems with its gradient, kept per batch in the returned stats (the
        size of those keys' generated problems). The loss call of batch k (`chunk=k`) then takes them instead of
        calling `drift_loss` on them again: it only carries their gradient back through the key to the tap. The same
        loss and gradient to float rounding, computed at the features of `batches` (the loss call's generated
        samples must be the same, as for the statistics).
        cuda_graph: the whole computation (encoders included) replayed from one CUDA graph, captured at the first
        call and again whenever a shape, dtype or option changes: the same statistics, the host's launches of some
        thousands of kernels per step replaced by one. The kept real taps and losses (keep_sources, stacked_losses)
        are then the graph's buffers, valid until the next call (the loss calls of the step read them); the key
        statistics are copies. One process only (no all_reduce), check_finite=False, and memory: the graph keeps
        its peak, the generated samples' taps of every batch included, reserved for its replays.
        total_classes: the number of classes of all processes' batches together, where the caller knows it (the
        trainer does): with all_reduce the count is then not summed over processes and read back to the host, the
        one host sync of the pass (under torchrun it drained the GPU's queue between the two passes). Without
        all_reduce it must equal this process's count.
        """
        batches = [_check_batch(ClassBatch(*b)) for b in batches]
        if not batches:
            raise ValueError("stats: expected at least one ClassBatch")
        if fused_min_problems is not None and (isinstance(fused_min_problems, bool)
                                               or not isinstance(fused_min_problems, int) or fused_min_problems < 1):
            raise ValueError(f"fused_min_problems: expected None or an integer >= 1, got {fused_min_problems!r}")
        if stack_below is not None and (isinstance(stack_below, bool) or not isinstance(stack_below, int)
                                        or stack_below < 1):
            raise ValueError(f"stack_below: expected None or an integer >= 1, got {stack_below!r}")
        if stacked_losses and stack_below is None:
            raise ValueError("stacked_losses: needs stack_below (the losses precomputed are those of the stacked calls)")
        local_classes = sum(b.num_classes for b in batches)
        if total_classes is not None:
            if isinstance(total_classes, bool) or not isinstance(total_classes, int) or total_classes < local_classes:
                raise ValueError(f"total_classes: expected None or an integer >= this process's {local_classes} "
                                 f"classes, got {total_classes!r}")
            if all_reduce is None and total_classes != local_classes:
                raise ValueError(f"total_classes: without all_reduce expected this process's {local_classes} "
                                 f"classes, got {total_classes}")
        if cuda_graph:
            self._check_graphable(batches[0].gen)
            if all_reduce is not None:
                raise ValueError("cuda_graph: statistics of one process only (their collectives are not captured)")
            if self._stats_graph is None:
                self._stats_graph = GraphedFunction(self._graph_stats_body, backend=self.graph_backend)
            stats, scales, drift_ms = self._stats_graph(batches, keep_sources, group_keys, fused_min_problems,
                                                        compiled, stack_below, stacked_losses,
                                                        self._graph_state(encoders=True))
            scales, drift_ms = scales.clone(), drift_ms.clone()  # the graph's buffers are overwritten by the next call
            return stats._replace(keys={k: DriftStats(s, m) for k, s, m in zip(stats.keys, scales, drift_ms)})
        # The partial sums run the reference math unless impl="fused" or fused_min_problems asks for the kernel:
        # with the kernel's first fp32 tiles it was the slower path (3.0 s of passes 1-2 per step against 1.9 s).
        # With the fp32 tiles of 32 the math alone turned (one 4-class chunk, 86 keys, H200: 98 ms on the kernel, 193
        # compiled, 259 reference; docs/benchmarks.md, ninth sitting); in the step, fused_min_problems=1 alone did
        # not move it (the time was in building the keys), so "auto" still means the reference math here.
        asked = self.drift_options.get("impl", "auto")

        def impl(problems: int) -> str:
            if asked != "auto":
                return asked
            if fused_min_problems is not None and problems >= fused_min_problems:
                return "auto"
            return "compiled" if compiled else "reference"

        options = {k: v for k, v in self.drift_options.items() if k != "impl"}
        with record_function(RANGE_ENCODERS):
            sources = [self._batch_sources(b) for b in batches] if keep_sources else None

        # Pass 1: sum(w d) and sum(w) per key (the distance scale), and the class count.
        # chunk_size and check_finite too: the default check reads a flag back from the GPU (a host sync per key)
        pass1 = {k: options[k] for k in ("chunk_size", "check_finite") if k in options}
        with record_function(RANGE_PASS1):
            scale_sums = self._accumulate(
                batches, lambda g, p, n, nw, keys, groups: drift.scale_sums(g, p, n, neg_weight=nw, groups=groups,
                                                                            impl=impl(g.shape[0]), **pass1),
                sources, group_keys, stack_below)
        keys = list(scale_sums)
        packed = torch.stack([scale_sums[k] for k in keys]).flatten()
        num_classes = local_classes if total_classes is None else total_classes
        count = all_reduce is not None and total_classes is None  # the global count is summed with the sums
        if count:
            packed = torch.cat([packed, packed.new_full((1,), local_classes)])  # a fill: no copy from the host
        if all_reduce is not None:
            packed = all_reduce(packed)
        if count:
            num_classes = round(packed[-1].item())  # the global count: a host sync, only with processes
            packed = packed[:-1]
        global_scale_sums = dict(zip(keys, packed.view(len(keys), 2)))

        # Pass 2: sum of squared fields per temperature and the number of field entries, at the global scale.
        held = [] if stacked_losses else None  # pass 2's stacked calls, for their losses below
        with record_function(RANGE_PASS2):
            square_sums = self._accumulate(
                batches,
                lambda g, p, n, nw, keys, groups: drift.field_square_sums(
                    g, p, n, neg_weight=nw, total_scale_sums=torch.stack([global_scale_sums[k] for k in keys]),
                    groups=groups, impl=impl(g.shape[0]), **options),
                sources, group_keys, stack_below, held,
            )
        packed = torch.stack([square_sums[k] for k in keys])  # (K, R + 1)
        if all_reduce is not None:
            packed = all_reduce(packed)
        key_stats = {k: DriftStats.from_sums(s, q) for k, s, q in zip(keys, global_scale_sums.values(), packed)}
        return FeatureStats(key_stats, num_classes, None if sources is None else tuple(real for _, real in sources),
                            None if held is None else self._stacked_losses(held, key_stats, len(batches)))

    def _graph_stats_body(self, batches, keep_sources, group_keys, fused_min_problems, compiled, stack_below,
                          stacked_losses, _state):
        """What the CUDA graph of `stats` runs: the statistics, and the keys' scales and drift_ms each stacked into
        one tensor (copied out of the graph's buffers in two copies, not two per key)."""
        stats = self.stats(batches, keep_sources=keep_sources, group_keys=group_keys,
                           fused_min_problems=fused_min_problems, compiled=compiled, stack_below=stack_below,
                           stacked_losses=stacked_losses)
        return (stats, torch.stack([s.scale for s in stats.keys.values()]),
                torch.stack([s.drift_ms for s in stats.keys.values()]))

    def _graph_state(self, encoders: bool = False) -> tuple:
        """What a graph of this loss reads from `self`: its options and, with encoders, each encoder's parameters and
        buffers (where they lie) and whether its taps are compiled. Given to the graph as an argument, so that a change
        captures a new graph instead of replaying the old options' kernels or reading moved weights."""
        options = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                               for k, v in self.drift_options.items()))
        state = (options, self.features, self.fused_keys, self.fused_layout, self.taps_in_autocast_dtype)
        if encoders:
            state += tuple((id(e), type(e.taps).__name__ if hasattr(e, "taps") else None,
                            tuple(t.data_ptr() for t in itertools.chain(e.parameters(), e.buffers())))
                           for e in self.encoders)
        return state

    def _check_graphable(self, gen: Tensor) -> None:
        """The conditions of cuda_graph=True (stats and loss calls)."""
        if self.drift_options.get("check_finite", True):
            raise ValueError("cuda_graph: needs the drift option check_finite=False (its check syncs the host)")
        if self.graph_backend == "cuda" and gen.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs CUDA tensors, got gen on {gen.device}")

    def _stacked_losses(self, held, key_stats: dict[str, DriftStats], num_batches: int):
        """Per batch, key -> (losses, gradient of their sum) of the stacked calls `held` of pass 2: (keys, batch
        indices, per key its problem counts per batch, g, p, n, nw, device type) with every batch's problems."""
        out: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in range(num_batches)]
        with record_function(RANGE_STACKED):
            for keys, batch_ids, counts, g, p, n, nw, device_type in held:
                per_key = [sum(c) for c in counts]
                leaf = g.detach().requires_grad_()
                with torch.enable_grad(), torch.autocast(device_type, enabled=False):
                    losses, _ = drift_loss(leaf, p, n, neg_weight=nw, groups=per_key if len(keys) > 1 else None,
                                           stats=_stacked_stats([key_stats[k] for k in keys]), **self.drift_options)
                    (grad,) = torch.autograd.grad(losses.sum(), leaf)
                for key, key_counts, key_losses, key_grad in zip(keys, counts, losses.split(per_key),
                                                                 grad.split(per_key)):
                    for i, batch_losses, batch_grad in zip(batch_ids, key_losses.split(key_counts),
                                                           key_grad.split(key_counts)):
                        out[i][key] = (batch_losses.detach(), batch_grad)
        return tuple(out)

    def _batch_sources(self, b: ClassBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The sources of a batch's generated and of its real samples (pos, then neg)."""
        return self._sources(b.gen), self._sources(b.pos if b.neg is None else torch.cat([b.pos, b.neg]))

    def _accumulate(self, batches: list[ClassBatch], partial, sources=None, group_keys=False,
                    stack_below: int | None = None, keep_held: list | None = None) -> dict[str, Tensor]:
        """Sum partial(gen, pos, neg, neg_weight, keys, groups) per key over the batches (sources: precomputed, or
        None); partial returns one row of sums per key. With group_keys the keys of one source (a tap's location,
        mean, std and window keys all have the tap's channels as their dimension S) go in one call, their problems
        stacked, groups being their problem counts: one call instead of seven per tap, at the memory of one source's
        stacked problems (no gradient is kept here). Otherwise one call per key (groups of one). stack_below: calls
        of fewer problems are held and made once after the last batch, over every batch's problems (see `stats`);
        keep_held: a list to which those stacked calls are appended (for `_stacked_losses`)."""
        sums: dict[str, Tensor] = {}
        order: dict[str, None] = {}  # the keys in the order of the problem sets, whichever calls were held
        held: dict[tuple, list[tuple]] = {}  # (keys, shapes) -> each batch's (g, p, n, nw) of those keys

        def add(keys, counts, g, p, n, nw, device_type):  # g, p, n, nw: the keys' problems stacked
            with torch.autocast(device_type, enabled=False):
                part = partial(g, p, n, nw, keys, counts)
            for key, row in zip(keys, part):
                sums[key] = row if key not in sums else sums[key] + row

        for i, b in enumerate(batches):
            gen_sources, real_sources = sources[i] if sources is not None else self._batch_sources(b)
            problem_sets = self._problem_sets(gen_sources, real_sources, b)  # (source, key, L, g, p, n, nw)
            by = 0 if group_keys else 1  # consecutive problem sets of one source, or each key alone
            for _, together in itertools.groupby(problem_sets, key=lambda problem_set: problem_set[by]):
                _, keys, _, g, p, n, nw = zip(*together)
                order.update(dict.fromkeys(keys))
                if stack_below is not None and sum(len(t) for t in g) < stack_below:
                    # batches whose problems have other sample counts are stacked apart (torch.cat needs equal ones)
                    shapes = tuple(None if t is None else tuple(t.shape[1:]) for t in (*g, *p, *n, *nw))
                    held.setdefault((keys, shapes), []).append((g, p, n, nw, b.gen.device.type, i))
                    continue
                add(keys, [len(t) for t in g], *_stacked(g, p, n, nw), b.gen.device.type)
        for (keys, _), per_batch in held.items():  # each key's problems batch after batch, then keys as above
            per_key = [tuple(_cat([batch[j][k] for batch in per_batch]) for k in range(len(keys))) for j in range(4)]
            stacked = _stacked(*per_key)
            add(keys, [len(t) for t in per_key[0]], *stacked, per_batch[0][4])
            if keep_held is not None:
                counts = [[len(batch[0][k]) for batch in per_batch] for k in range(len(keys))]
                keep_held.append((keys, [batch[5] for batch in per_batch], counts, *stacked, per_batch[0][4]))
        return {key: sums[key] for key in order}


def _stacked_stats(stats: list[DriftStats]) -> DriftStats:
    """One key's statistics, or several keys' stacked field by field (for `drift_loss(groups=...)`)."""
    return stats[0] if len(stats) == 1 else DriftStats(*map(torch.stack, zip(*stats)))


def _cat(tensors: list[Tensor | None]) -> Tensor | None:
    return None if tensors[0] is None else tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _stacked(*per_key: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """Each argument, a tuple of one tensor per key (or of Nones), as one tensor: the keys' problems stacked."""
    return [t[0] if len(t) == 1 or t[0] is None else torch.cat(t) for t in per_key]


def _problems(vectors: Tensor, num_classes: int) -> Tensor:
    """[N_c C, L, S] (class-major samples) -> [N_c L, C, S]: one problem per (class, location), class-major.

    The reference of `kernels.fused_problem_layout`, which `FeatureDriftLoss` takes where its fused keys run: from a
    view of an NCHW tap this copy gathers values L apart (docs/benchmarks.md, eleventh sitting)."""
    n, num_loc, s = vectors.shape
    c = n // num_classes
    if num_loc == 1:  # one location: the problems are the samples [N_c, C, S] (the same view, in one op, not three)
        return vectors.reshape(num_classes, c, s)
    return vectors.reshape(num_classes, c, num_loc, s).transpose(1, 2).reshape(num_classes * num_loc, c, s)


def _check_batch(b: ClassBatch) -> ClassBatch:
    """Validate shapes and resolve num_classes."""
    for name in ("gen", "pos", "neg"):
        t = getattr(b, name)
        if t is not None and (not isinstance(t, Tensor) or t.dim() < 2):
            raise ValueError(f"{name}: expected a tensor [N_c * count, ...], got {type(t).__name__} "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else ''}")
    n_c = b.num_classes
    if b.w is not None:
        if b.w.dim() != 1:
            raise ValueError(f"w: expected shape [N_c], got {tuple(b.w.shape)}")
        if n_c is not None and n_c != b.w.shape[0]:
            raise ValueError(f"num_classes {n_c} does not match w of shape {tuple(b.w.shape)}")
        n_c = b.w.shape[0]
    if n_c is None or n_c < 1:
        raise ValueError("the number of classes: give w [N_c] or num_classes >= 1")
    for name in ("gen", "pos", "neg"):
        t = getattr(b, name)
        if t is not None and (t.shape[0] == 0 or t.shape[0] % n_c):
            raise ValueError(f"{name}: expected N_c * count samples (N_c = {n_c}, count >= 1), got {t.shape[0]}")
        if t is not None and t.shape[1:] != b.gen.shape[1:]:
            raise ValueError(f"{name}: expected samples of shape {tuple(b.gen.shape[1:])}, got {tuple(t.shape[1:])}")
    return b._replace(num_classes=n_c)


class _TapGradients:
    """The tap gradients of one loss call, until its backward takes them (a weak reference can follow them)."""

    __slots__ = ("grads", "__weakref__")

    def __init__(self, grads: tuple[Tensor, ...]):
        self.grads = grads


class _WithGradients(torch.autograd.Function):
    """Returns `value`; backward gives each input its precomputed gradient (of value) times the incoming gradient.

    This is what lets the loss differentiate each key right after computing it (freeing the key's graph) while the
    caller still calls loss.backward() once, through the encoder and the generator, as for any loss.
    """

    @staticmethod
    def forward(ctx, value: Tensor, tap_grads: _TapGradients, *inputs: Tensor) -> Tensor:
        ctx.tap_grads = tap_grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads, ctx.tap_grads.grads = ctx.tap_grads.grads, None  # free the tap gradients as soon as they are used
        if grads is None:
            raise RuntimeError("FeatureDriftLoss: backward through the same loss twice is not supported")
        return (None, None, *(g * grad_out.to(g.dtype) for g in grads))
