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


def _compile(**kwargs):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import kernel_resources
    finally:
        sys.path.pop(0)
    try:
        return kernel_resources, kernel_resources.compile_pass(**kwargs)
    except Exception as err:  # a Triton without the NVIDIA backend or its tools
        pytest.skip(f"cannot compile for sm_90 here: {type(err).__name__}: {err}")


def test_the_distance_loop_is_not_pipelined_and_fences_before_the_tensor_cores():
    tools, kernel = _compile(PASS=1)
    counts = tools.ptx_counts(kernel)
    assert counts["wgmma.mma_async"] > 0  # bf16 tensor-core products, as on the GPU
    assert counts["cp.async.cg"] == 0, counts  # no asynchronous copies: the loop is not pipelined
    assert counts["fence.proxy.async"] > 0, counts  # shared-memory writes fenced before the tensor cores read them


def test_fp32_inputs_at_the_default_tile_do_not_spill_in_pass_1():
    """fp32 inputs (a training step's mean and std keys) at tiles of 64 spilled 7.7 KB per thread in pass 1; the
    kernel's fp32 tile (VARIANT["fp32_block_s"]) must not spill there."""
    from drifting.kernels import drift_triton

    tools, kernel = _compile(PASS=1, dtype="fp32", block_s=drift_triton.VARIANT["fp32_block_s"], fp32_dot="ieee")
    usage = tools.resource_usage(kernel)
    assert "STACK:0 " in usage, usage
    assert tools.ptx_counts(kernel)["wgmma.mma_async"] == 0  # "ieee": FMAs, no tensor cores


def test_tf32x3_products_run_on_the_tensor_cores():
    tools, kernel = _compile(PASS=1, dtype="fp32", block_s=32, fp32_dot="tf32x3")
    counts = tools.ptx_counts(kernel)
    assert counts["wgmma.mma_async"] > 0, counts
    assert "tf32" in kernel.asm["ptx"]


def test_set_variant_checks_every_item_before_applying_any(monkeypatch):
    from drifting.kernels import drift_triton

    monkeypatch.setattr(drift_triton, "VARIANT", dict(drift_triton.VARIANT))
    before = dict(drift_triton.VARIANT)
    for bad, message in [("fp32_dot=tf32x3,nope=1", "name in"), ("fp32_dot=tf32", "'ieee' or 'tf32x3'"),
                         ("split2=maybe", "true or false"), ("fp32_block_s=48", "tile width"),
                         ("split2", "name=value"), ("maxnreg=100", "registers per thread")]:
        with pytest.raises(ValueError, match=message):
            drift_triton.set_variant(bad)
        assert drift_triton.VARIANT == before
    new = drift_triton.set_variant("fp32_dot=tf32x3, fp32_block_s=16,split2=false,maxnreg=168")
    assert new == {**before, "fp32_dot": "tf32x3", "fp32_block_s": 16, "split2": False, "maxnreg": 168}


def test_a_register_cap_reaches_the_compiler_and_the_launch(monkeypatch):
    """VARIANT["maxnreg"] is a launch option of every pass (not under the interpreter), and compiled for sm_90 it
    holds pass 3, which otherwise takes all 255 registers."""
    import torch

    from drifting.kernels import drift_triton

    tools, capped = _compile(PASS=3, WRITE_GRAD=True, maxnreg=168)
    _, free = _compile(PASS=3, WRITE_GRAD=True)
    registers = lambda kernel: int(tools.resource_usage(kernel).split("REG:")[1].split()[0])  # noqa: E731
    assert registers(capped) <= 168 < registers(free)
    monkeypatch.setattr(drift_triton, "_INTERPRET", False)
    monkeypatch.setitem(drift_triton.VARIANT, "maxnreg", 168)
    gen, pos = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    options = dict(temperatures=(0.05,), gen_weight=None, pos_weight=None, neg_weight=None, normalize="xy",
                   affinity_floor=0.0, self_mask=0.0, attraction=1.0, repulsion=1.0)
    assert drift_triton._Kernel(gen, pos, None, **options).common["maxnreg"] == 168
    monkeypatch.setitem(drift_triton.VARIANT, "maxnreg", 0)
    assert "maxnreg" not in drift_triton._Kernel(gen, pos, None, **options).common


def test_benchmarks_kernel_variant_option_applies_or_is_a_usage_error(monkeypatch):
    import argparse

    from drifting.kernels import drift_triton, kernel_variant

    monkeypatch.setattr(drift_triton, "VARIANT", dict(drift_triton.VARIANT))
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel-variant", type=kernel_variant, default="")
    assert parser.parse_args([]).kernel_variant == "" and drift_triton.VARIANT["fp32_block_s"] == 32
    assert parser.parse_args(["--kernel-variant", "fp32_block_s=64"]).kernel_variant == "fp32_block_s=64"
    assert drift_triton.VARIANT["fp32_block_s"] == 64
    with pytest.raises(argparse.ArgumentTypeError, match="tile width"):
        kernel_variant("fp32_block_s=7")


@pytest.mark.parametrize("to_problems", [True, False], ids=["to_problems", "to_vectors"])
def test_the_layout_kernel_compiles_with_vector_accesses_on_both_sides(to_problems):
    """Compiled for sm_90 as from an NCHW tap (channels L apart, locations contiguous), the layout kernel reads and
    writes global memory in vectors (a coalesced transpose staged through shared memory), not value by value."""
    import inspect

    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from drifting.kernels import layout_triton

        fn = layout_triton._relayout
        names = list(inspect.signature(fn.fn).parameters)
        const = dict(TO_PROBLEMS=to_problems, BLOCK_L=layout_triton.BLOCK_L, BLOCK_S=layout_triton.BLOCK_S, s_l=1)
        signature = {n: "constexpr" if n in const else "*bf16" if n.endswith("_ptr") else "i32" for n in names}
        aligned = [n for n in names if n.endswith("_ptr") or n in ("L", "S", "s_n", "s_s")]
        source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in const.items()},
                           attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    except Exception as err:  # a Triton without the NVIDIA backend or its tools
        pytest.skip(f"cannot compile for sm_90 here: {type(err).__name__}: {err}")
    assert ptx.count("ld.global.v") > 0 and ptx.count("ld.global.v") == ptx.count("ld.global"), "scalar loads"
    assert ptx.count("st.global.v") > 0 and ptx.count("st.global.v") == ptx.count("st.global"), "scalar stores"
    assert "st.shared" in ptx  # the transpose goes through shared memory
