"""Variants and launch settings of the fused drifting-loss kernel on one key size, pass by pass (CUDA only).

For each variant of `drifting.kernels.drift_triton.VARIANT` and each launch setting (tile width of S, warps,
pipeline stages): the whole call (passes 1-3, forward + backward) in ms, each pass alone, the peak memory, and the
relative error of loss, gradient and statistics against the reference on the first problems of the key (bf16
inputs as timed, and the same problems in fp32).

    python benchmarks/tune_drift_kernel.py --key 32x32 --variants recompute,share,share_nosplit2
    python benchmarks/tune_drift_kernel.py --key 32x32 --variants share,share_maxnreg168,share_maxnreg128
    python benchmarks/tune_drift_kernel.py --key 32x32 --variants share,cuda --check-problems 9,1024
    python benchmarks/tune_drift_kernel.py --key 32x32 --variants share --block-s 32,64 --warps 4,8 --stages 1,2
    python benchmarks/tune_drift_kernel.py --key 16x16 --dtype fp32 --variants share,share_tf32x3 --block-s 16,32,64

With --dtype fp32 the inputs are fp32, as the mean and std keys of a training step; --block-s 0 is the kernel's own
choice. Every variant runs the Triton kernel but "cuda" (every pass of the problems it takes on drift_cuda.cu, the
library's default).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from drift_loss import KEYS, TEMPERATURES, floor_ms, make_inputs
from drifting.drift import drift_loss
from drifting.kernels import drift_triton
from drifting.kernels.drift_triton import _Kernel, fused_drift_loss

VARIANTS = {
    # pass 3 recomputes the softmaxes (the kernel before 2026-11-27)
    "recompute": dict(share_norm=False, split2=True),
    # pass 3 reads the softmax normalisers of pass 2: one exponential per entry and temperature, no column sums
    "share": dict(share_norm=True, split2=True),
    "share_nosplit2": dict(share_norm=True, split2=False),
    # fp32 inputs: products on the tensor cores as three TF32 products each, instead of FMAs
    "share_tf32x3": dict(share_norm=True, split2=True, fp32_dot="tf32x3"),
    # registers capped for occupancy (three / four programs of 4 warps per SM instead of two), at the cost of spills
    "share_maxnreg168": dict(share_norm=True, split2=True, maxnreg=168),
    "share_maxnreg128": dict(share_norm=True, split2=True, maxnreg=128),
    # the CUDA C++ kernel (drift_cuda.cu) where the problems fit it: inputs staged in shared memory
    "cuda": dict(share_norm=True, split2=True, cuda=True),
}
DEFAULT_VARIANT = dict(drift_triton.VARIANT, cuda=False)  # every variant on Triton unless it names cuda
OPTIONS = dict(temperatures=TEMPERATURES, gen_weight=None, pos_weight=None, normalize="xy", affinity_floor=1e-6,
               self_mask=100.0, attraction=1.0, repulsion=1.0)


def cuda_ms(fn, repeat: int) -> float:
    """Median milliseconds of fn() over `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def errors(gen, pos, neg, w, problems: int) -> dict[str, float]:
    """Relative errors of the fused call against the reference on the first `problems` problems, bf16 and fp32."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        args = [t[:problems].detach().to(dtype) for t in (gen, pos, neg)]
        res = {}
        # "again": the fused call once more, to see whether it repeats bit for bit
        for label, impl in (("reference", "reference"), ("fused", "fused"), ("again", "fused")):
            leaf = args[0].clone().requires_grad_()
            loss, info = drift_loss(leaf, args[1], args[2], neg_weight=w[:problems], impl=impl,
                                    temperatures=TEMPERATURES, affinity_floor=1e-6, check_finite=False)
            loss.sum().backward()
            res[label] = (loss.detach(), leaf.grad, info["drift_ms"])
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        out[f"{name}_repeatable"] = float(all(torch.equal(a, b) for a, b in zip(res["fused"], res["again"])))
        for k, what in enumerate(("loss", "grad", "drift_ms")):
            out[f"{name}_{what}"] = relative(res["fused"][k], res["reference"][k])
    return out


def measure(gen, pos, neg, w, launch: dict, repeat: int) -> dict[str, float]:
    def whole():
        gen.grad = None
        loss, _ = fused_drift_loss(gen, pos, neg, neg_weight=w, all_reduce=None, stats=None, **OPTIONS, **launch)
        loss.mean().backward()

    torch.cuda.reset_peak_memory_stats()
    row = {"whole_ms": cuda_ms(whole, repeat), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    kernel = _Kernel(gen, pos, neg, neg_weight=w, **OPTIONS, **launch)
    norm = kernel.norm_buffer()  # shared by the three passes, as in a call
    sums = kernel.scale_sums(norm).sum(0)
    scale = sums[0] / sums[1]
    squares = kernel.square_sums(scale, norm).sum(0)
    inv_lambda = (squares[:-1] / squares[-1]).sqrt().reciprocal().float()
    b, c_g, s = kernel.shape
    loss = torch.empty(b, **kernel.f32)
    grad = torch.empty(b, c_g, s, dtype=gen.dtype, device=gen.device)
    params = kernel.params(scale)
    row["pass1_ms"] = cuda_ms(lambda: kernel.scale_sums(norm), repeat)
    row["pass2_ms"] = cuda_ms(lambda: kernel.square_sums(scale, norm), repeat)
    row["pass3_ms"] = cuda_ms(lambda: kernel.launch(3, loss, params, inv_lambda, grad, norm), repeat)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key", default="32x32", choices=list(KEYS))
    parser.add_argument("--variants", default="recompute,share", help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the inputs' dtype")
    parser.add_argument("--block-s", default="0", help="comma list of S tile widths (0: the kernel's choice)")
    parser.add_argument("--warps", default="4")
    parser.add_argument("--stages", default="2")
    parser.add_argument("--check-problems", default="9,1024", help="problems in the accuracy checks (0: none)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    locations, s = KEYS[args.key]
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    gen, pos, neg, w = make_inputs(locations, s, "cuda", dtype=dtype)
    card = torch.cuda.get_device_name()
    print(f"key {args.key}, {args.dtype} inputs, {card}: floor {floor_ms(locations, s, dtype.itemsize):.2f} ms, "
          f"inputs {sum(t.numel() * t.element_size() for t in (gen, pos, neg)) / 2**30:.2f} GiB")
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    grid = [(bs, wp, st) for bs in ints(args.block_s) for wp in ints(args.warps) for st in ints(args.stages)]
    checks = [n for n in ints(args.check_problems) if n > 0]
    rows = []
    for name in args.variants.split(","):
        drift_triton.VARIANT.update(DEFAULT_VARIANT, **VARIANTS[name])
        for block_s, warps, stages in grid:
            launch = dict(block_s=block_s or None, num_warps=warps, num_stages=stages)
            label = f"{name:<15} S-tile {block_s:>3} warps {warps:>2} stages {stages}"
            try:
                row = {"variant": name, **launch, **measure(gen, pos, neg, w, launch, args.repeat)}
            except Exception as err:  # out of resources for a setting: report it and go on
                print(f"{label}: failed ({type(err).__name__}: {str(err)[:120]})")
                continue
            if (block_s, warps, stages) == grid[0]:
                for n in checks:
                    row.update({f"{k}@{n}": v for k, v in errors(gen, pos, neg, w, n).items()})
            rows.append(row)
            errs = " ".join(f"{k} {v:.1e}" if "repeatable" not in k else f"{k} {bool(v)}"
                            for k, v in row.items() if "@" in k)
            print(f"{label}: whole {row['whole_ms']:7.2f} ms  passes {row['pass1_ms']:6.2f} {row['pass2_ms']:6.2f} "
                  f"{row['pass3_ms']:6.2f}  peak {row['peak_gib']:.2f} GiB  {errs}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "key": args.key, "dtype": args.dtype, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
