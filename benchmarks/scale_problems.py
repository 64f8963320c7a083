"""The fused drifting loss's backward pass on the 32x32 key: the gradient, written by pass 3 in the forward, scaled
per problem by the loss's incoming gradient (`drift_triton.scale_problems_`, in place; CUDA only), or for a reduced
loss by one scalar, skipped where it is 1 (`drift_triton.scale_all_`).

It reads and writes the whole bf16 gradient once, so its floor is the card's memory bandwidth: the script times it
next to a plain device copy of the same bytes (`copy_`, read + write), and with --sweep the same kernel at other
launch settings (elements per program, warps, an eviction hint, a flat grid):

    python benchmarks/scale_problems.py --sweep --out scale_problems.json
"""

from __future__ import annotations

import argparse
import json

import torch

C_G, S = 64, 256  # the 32x32 key's problems: [C_g, S] gradients


def sweep_kernels():
    """The kernels of the sweep: the library's with an eviction hint on its loads (otherwise the same code), and a
    flat grid whose programs find their problem by division. (Without the hint the sweep runs the library's own.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def evict_first(grad_ptr, scale_ptr, per_problem, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < per_problem
        ptr = grad_ptr + b.to(tl.int64) * per_problem + offs
        x = tl.load(ptr, mask=mask, eviction_policy="evict_first")
        tl.store(ptr, (x.to(tl.float32) * tl.load(scale_ptr + b)).to(x.dtype), mask=mask)

    @triton.jit
    def flat(grad_ptr, scale_ptr, per_problem, total, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        x = tl.load(grad_ptr + offs, mask=mask)
        s = tl.load(scale_ptr + offs // per_problem, mask=mask)
        tl.store(grad_ptr + offs, (x.to(tl.float32) * s).to(x.dtype), mask=mask)

    return triton, evict_first, flat


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=65536, help="problems of the 32x32 key (65,536 in a step)")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per figure (the median is reported)")
    parser.add_argument("--sweep", action="store_true", help="also other launch settings of the same kernel")
    parser.add_argument("--out", help="a JSON file for the results")
    args = parser.parse_args(argv)
    for name in ("problems", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernel is the fused loss's CUDA backward)")

    from drifting.kernels import drift_triton
    from tune_drift_kernel import cuda_ms  # median of CUDA-event timings after a warm-up call

    def median_ms(fn, repeat: int) -> float:
        fn()  # a second warm-up: a Triton kernel's first call compiles it
        return cuda_ms(fn, repeat)

    b, per = args.problems, C_G * S
    grad = torch.randn(b, C_G, S, device="cuda").bfloat16()
    scale = torch.full((b,), -1.0, device="cuda")  # x -1: exact, the same magnitudes every call
    gigabytes = 2 * grad.numel() * grad.element_size() / 1e9  # read + write
    copy = torch.empty_like(grad)
    ones = torch.ones(b, device="cuda")  # the gradient of losses.sum(): nothing to do
    rows = {"library kernel (scale_problems_)": median_ms(lambda: drift_triton.scale_problems_(grad, scale),
                                                           args.repeat),
            "library kernel (scale_problems_), every scale 1": median_ms(
                lambda: drift_triton.scale_problems_(grad, ones), args.repeat),
            "copy_ to another buffer (bandwidth reference)": median_ms(lambda: copy.copy_(grad), args.repeat)}
    # a reduced loss's backward (drift_loss(reduction="mean"/"sum")): the whole gradient by one scalar, and nothing
    # at all where it is exactly 1
    for value in (1.0, -1.0):
        one = torch.tensor(value, device="cuda")
        rows[f"reduced loss's kernel (scale_all_), scalar {value}"] = median_ms(
            lambda: drift_triton.scale_all_(grad, one), args.repeat)
    if args.sweep:
        triton, evict_first, flat = sweep_kernels()
        for block in (2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                for evict, kernel in ((False, drift_triton._scale_problems), (True, evict_first)):
                    grid = (b, triton.cdiv(per, block))
                    rows[f"per problem, block {block}, {warps} warps, evict_first {evict}"] = median_ms(
                        lambda: kernel[grid](grad, scale, per, BLOCK=block, num_warps=warps), args.repeat)
        for block in (4096, 8192, 16384):
            for warps in (4, 8):
                grid = (triton.cdiv(b * per, block),)
                rows[f"flat, block {block}, {warps} warps"] = median_ms(
                    lambda: flat[grid](grad, scale, per, b * per, BLOCK=block, num_warps=warps), args.repeat)
    card = torch.cuda.get_device_name()
    print(f"{card}, gradient [{b}, {C_G}, {S}] bf16, read + write {gigabytes:.2f} GB, median of {args.repeat}")
    for name, ms in sorted(rows.items(), key=lambda item: item[1]):
        print(f"{name:60s} {ms:7.3f} ms  {gigabytes / ms:5.2f} TB/s")
    result = {"card": card, "problems": b, "gigabytes": gigabytes, "ms": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
