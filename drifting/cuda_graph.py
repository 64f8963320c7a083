"""A function replayed as one CUDA graph: the host cost of its kernel launches paid once, at capture.

The drifting loss of a chunk launches ~900 small kernels (86 keys: their layouts, statistics, drift kernels and
gradients) for ~12 ms of GPU work; the Python that launches them takes several times that, so the GPU waits for the
host (docs/benchmarks.md, twelfth sitting). A CUDA graph records the launches once and replays them in one call.

`GraphedFunction(fn)` calls fn(*args) where args is a tree (tuples, lists, dicts, named tuples) of tensors and plain
values. The first call with a new signature (the tree's structure, every tensor's shape, stride, dtype, device and
requires_grad, every plain value, grad mode and autocast state) allocates static copies of the tensors, runs fn on
them once eagerly (lazy initialisations, Triton compilations) and captures a graph of fn on them; every call then
copies its tensors into the static copies and replays. What fn does must therefore depend on the signature only,
never on tensor values read on the host (a sync inside a capture is an error), and fn must not keep state between
calls; what it reads besides its arguments (options, weights) must not change, or be passed as an argument too.
The returned tree holds the graph's own output tensors: the next call overwrites them, so a caller that keeps an
output past the next call clones it. Plain values in the output are those of the capture.

`backend="eager"` replays by running fn again and copying its outputs into those of the first run: the same contract
(static inputs, outputs overwritten) without a GPU, so that CPU tests check a caller's use of it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.utils import _pytree as pytree


def _describe(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    return ("value", value)


def _autocast_state() -> tuple:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu"))


class GraphedFunction:
    """fn(*args) replayed from one CUDA graph per signature (the latest one only; a new signature recaptures)."""

    def __init__(self, fn: Callable[..., Any], backend: Literal["cuda", "eager"] = "cuda"):
        if backend not in ("cuda", "eager"):
            raise ValueError(f"backend: expected 'cuda' or 'eager', got {backend!r}")
        self.fn = fn
        self.backend = backend
        self.signature = None
        self.captures = 0  # graphs captured so far (a test and the benchmark read it)
        self._static: list[Tensor] = []
        self._static_args = None
        self._outputs = None
        self._graph = None

    def __call__(self, *args: Any) -> Any:
        flat, spec = pytree.tree_flatten(args)
        signature = (spec, tuple(_describe(v) for v in flat), torch.is_grad_enabled(), _autocast_state())
        new = signature != self.signature
        if new:
            self._allocate(flat, spec)
        self._copy_in(flat)
        if new:
            self._capture()
            self.signature = signature
        if self.backend == "cuda":
            self._graph.replay()
        else:
            fresh, fresh_spec = pytree.tree_flatten(self.fn(*self._static_args))
            outputs, spec = pytree.tree_flatten(self._outputs)
            if fresh_spec != spec or any(not isinstance(o, Tensor) and o != f for o, f in zip(outputs, fresh)):
                raise RuntimeError("GraphedFunction: fn's output changed between calls of one signature (it depends "
                                   "on more than its arguments' signature, which a CUDA graph would not see)")
            with torch.no_grad():
                for out, new in zip(outputs, fresh):
                    if isinstance(out, Tensor):
                        out.copy_(new)
        return self._outputs

    def _copy_in(self, flat: list) -> None:
        src = [v.detach() for v in flat if isinstance(v, Tensor)]
        if src:
            with torch.no_grad():
                torch._foreach_copy_(self._static, src)  # grouped by dtype and device into a few launches

    def _allocate(self, flat: list, spec) -> None:
        """Static copies of the tensors of `flat` (tree `spec`), the previous graph's pool and buffers freed first."""
        self.signature = self._graph = self._outputs = self._static_args = None
        self._static = []  # (the old copies go before the new ones are made)
        self._static = [torch.empty_like(v).requires_grad_(v.requires_grad) for v in flat if isinstance(v, Tensor)]
        it = iter(self._static)
        self._static_args = pytree.tree_unflatten([next(it) if isinstance(v, Tensor) else v for v in flat], spec)

    def _capture(self) -> None:
        """Warm up fn on the static inputs (holding this call's values) and capture its graph."""
        # Autocast caches its casts of leaf tensors that require grad (the static inputs may be such leaves) until
        # its outermost context exits: a cast cached by the warm-up would be read, not recomputed, by the graph.
        with contextlib.ExitStack() as stack:
            for d in ("cuda", "cpu"):
                if torch.is_autocast_enabled(d):
                    stack.enter_context(torch.autocast(d, dtype=torch.get_autocast_dtype(d), cache_enabled=False))
            if self.backend == "eager":
                self._outputs = self.fn(*self._static_args)
            else:
                self.fn(*self._static_args)  # warm-up: lazy initialisations and compilations happen outside the graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._outputs = self.fn(*self._static_args)
                self._graph = graph
        self.captures += 1

