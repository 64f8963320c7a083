"""The fused kernel compiled for an H100/H200 (sm_90) on any machine with Triton's NVIDIA backend: no GPU needed.

The distance loop must stay unpipelined: software-pipelined by Triton 3.6 it wrote its tiles to shared memory with
cp.async and let the tensor cores read them with no proxy fence between, and on an H200 it raced (a few problems in a
thousand wrong, differently at every launch; docs/benchmarks.md). Pass 1 is that loop alone.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


def test_the_distance_loop_is_not_pipelined_and_fences_before_the_tensor_cores():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import kernel_resources
    finally:
        sys.path.pop(0)
    try:
        kernel = kernel_resources.compile_pass(PASS=1)
    except Exception as err:  # a Triton without the NVIDIA backend or its tools
        pytest.skip(f"cannot compile for sm_90 here: {type(err).__name__}: {err}")
    counts = kernel_resources.ptx_counts(kernel)
    assert counts["wgmma.mma_async"] > 0  # bf16 tensor-core products, as on the GPU
    assert counts["cp.async.cg"] == 0, counts  # no asynchronous copies: the loop is not pipelined
    assert counts["fence.proxy.async"] > 0, counts  # shared-memory writes fenced before the tensor cores read them
