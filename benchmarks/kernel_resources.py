"""Compile the fused drifting-loss kernel for a GPU architecture without a GPU, and report what each pass costs the
hardware: registers and spilled bytes per thread (cuobjdump -res-usage), and counts of the PTX instructions that
matter for its pipelining (asynchronous copies, tensor-core products and their waits, proxy fences).

The launch is specialised as at the ablation's 32x32 key (bf16 inputs, C_g = C_p = 64, C_n = 16, S = 256, three
temperatures, guidance weights on the negatives; pointers and row strides divisible by 16, unit column strides), so
the code is what an H100/H200 runs there. With --dtype fp32, as at the window mean and std keys of a training step
(fp32 inputs), with their products as VARIANT["fp32_dot"] or --fp32-dot says ("ieee": FMAs; "tf32x3": tensor cores).

    python benchmarks/kernel_resources.py                     # sm_90, 4 warps, 2 stages, S tiles of 64
    python benchmarks/kernel_resources.py --warps 8 --arch 90
    python benchmarks/kernel_resources.py --dtype fp32 --fp32-dot tf32x3
    python benchmarks/kernel_resources.py --maxnreg 168             # registers capped (VARIANT["maxnreg"])
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from drifting.kernels import drift_triton

PTX_COUNTS = ("cp.async.cg", "cp.async.wait", "wgmma.mma_async", "wgmma.wait_group", "fence.proxy.async", "bar.sync",
              "fma.rn.f32")
PASSES = {  # label -> kernel constexprs that differ from pass 1's
    "pass 1 (scale sums)": dict(PASS=1),
    "pass 2 (square sums), writes the normalisers": dict(PASS=2, STORE_NORM=True),
    "pass 3 (loss, gradient), reads them": dict(PASS=3, LOAD_NORM=True, WRITE_GRAD=True),
    "pass 3 alone (statistics given)": dict(PASS=3, WRITE_GRAD=True),
}


def compile_pass(arch: int = 90, num_warps: int = 4, num_stages: int = 2, block_s: int = 64, dtype: str = "bf16",
                 fp32_dot: str | None = None, maxnreg: int = 0, **constexprs):
    """The compiled kernel (triton.compile) of one pass for cuda sm_<arch>, specialised as at the 32x32 key, with
    inputs (and gradient) of `dtype` ("bf16" or "fp32"); maxnreg: a cap on registers per thread (0: none)."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype: expected 'bf16' or 'fp32', got {dtype!r}")
    fn = drift_triton._drift_kernel
    names = list(inspect.signature(fn.fn).parameters)
    const = dict(PASS=1, R=3, NORMALIZE=0, HAS_NEG=True, HAS_WG=False, HAS_WN=True, HAS_WP=False, BG=64, BN=16, BP=64,
                 BS=block_s, IEEE=dtype == "fp32", UPCAST=False, F32DOT=fp32_dot or drift_triton.VARIANT["fp32_dot"],
                 WRITE_GRAD=False, UNROLL_R=1, SPLIT2=True, STORE_NORM=False, LOAD_NORM=False,
                 sgs=1, sns=1, sps=1)  # unit column strides are specialised as constants
    const.update(constexprs)
    inputs = ("gen_ptr", "neg_ptr", "pos_ptr", "grad_ptr")
    floats = ("sqrt_floor", "self_mask", "attraction", "repulsion")
    signature = {n: "constexpr" if n in const else (f"*{dtype}" if n in inputs else "*fp32") if n.endswith("_ptr")
                 else "fp32" if n in floats else "i32" for n in names}
    div16 = [n for n in names if n.endswith("_ptr") or n in ("sgb", "sgr", "snb", "snr", "spb", "spr", "CG", "CN", "CP",
                                                              "S")]
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in const.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(kernel) -> str:
    """cuobjdump's resource line of the kernel's cubin (REG = registers per thread, STACK = spilled bytes)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return next((line.strip() for line in out.splitlines() if "REG:" in line), out.strip())


def ptx_counts(kernel) -> dict[str, int]:
    return {name: kernel.asm["ptx"].count(name) for name in PTX_COUNTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--block-s", type=int, default=64)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the inputs' dtype")
    parser.add_argument("--fp32-dot", choices=("ieee", "tf32x3"), help="fp32 products (default: the kernel's VARIANT)")
    parser.add_argument("--maxnreg", type=int, default=0, choices=drift_triton.MAXNREG_CHOICES,
                        help="a cap on registers per thread (VARIANT['maxnreg']; 0: the compiler's choice)")
    args = parser.parse_args()
    dot = f", fp32 products {args.fp32_dot or drift_triton.VARIANT['fp32_dot']}" if args.dtype == "fp32" else ""
    cap = f", at most {args.maxnreg} registers" if args.maxnreg else ""
    print(f"sm_{args.arch}, {args.warps} warps, {args.stages} stages, S tiles of {args.block_s}, {args.dtype} inputs"
          f"{dot}{cap}; Triton {triton.__version__}")
    for label, constexprs in PASSES.items():
        kernel = compile_pass(args.arch, args.warps, args.stages, args.block_s, args.dtype, args.fp32_dot,
                              args.maxnreg, **constexprs)
        print(f"{label:<46} {resource_usage(kernel)}")
        print(f"{'':<46} {ptx_counts(kernel)}", flush=True)


if __name__ == "__main__":
    main()
