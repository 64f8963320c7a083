"""Where the host's time goes in one fused drifting-loss call on the 32x32 key, up to each kernel launch (CUDA only).

A call's kernels start only once the host has checked the arguments, set up the kernel and launched pass 1; with
the GPU idle before the call, that host time adds to the call's. This script wraps the functions on that path, keeps
the GPU busy before each call (so that no host step waits for it), and prints the median time from the call's start
at which each function is entered (">") and left ("<"):

    python benchmarks/host_time.py --out host_time.txt

The wrappers cost a little themselves (about a microsecond each on an H200's host).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

# (module, attribute) of the functions on a call's path, in the order a call meets them
WRAPPED = [("drifting.drift", "_check_loss_inputs"), ("drifting.drift", "_fused"),
           ("drifting.kernels.drift_triton", "fused_drift_loss"), ("drifting.kernels.drift_triton", "_Kernel.__init__"),
           ("drifting.kernels.drift_cuda", "supports"), ("drifting.kernels.drift_triton", "_Kernel.norm_buffer"),
           ("drifting.kernels.drift_triton", "_Kernel.params"), ("drifting.kernels.drift_cuda", "launch"),
           ("drifting.kernels.drift_cuda", "_launch_kernel")]


def wrap_all(marks: list) -> None:
    """Replaces each function of WRAPPED (that exists) by one that appends (">name", t) and ("<name", t) to marks."""
    import importlib

    for module_name, path in WRAPPED:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        fn = getattr(owner, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _label=path, **kwargs):
            marks.append((">" + _label, time.perf_counter()))
            try:
                return _fn(*args, **kwargs)
            finally:
                marks.append(("<" + _label, time.perf_counter()))

        setattr(owner, name, functools.wraps(fn)(wrapped))


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=65536, help="problems of the 32x32 key (65,536 in a step)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls (the median of each mark is printed)")
    parser.add_argument("--reduction", choices=("none", "mean"), default="none", help="as drift_loss's")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    for name in ("problems", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times the fused kernel's host path)")

    from drift_cuda_builds import TEMPERATURES, key_problems

    from drifting.drift import drift_loss

    marks: list[tuple[str, float]] = []
    wrap_all(marks)
    gen, pos, neg, neg_weight, _ = key_problems(args.problems)
    leaf = gen.clone().requires_grad_()

    def call() -> None:
        leaf.grad = None
        marks.append(("start", time.perf_counter()))
        loss, _ = drift_loss(leaf, pos, neg, neg_weight=neg_weight, temperatures=TEMPERATURES, impl="fused",
                             check_finite=False, reduction=args.reduction)
        marks.append(("forward returned", time.perf_counter()))
        (loss.mean() if args.reduction == "none" else loss).backward()
        marks.append(("backward returned", time.perf_counter()))

    for _ in range(3):  # compiles the kernels
        call()
    torch.cuda.synchronize()
    runs = []
    for _ in range(args.repeat):
        marks.clear()
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU work queued ahead: the host never waits for the GPU
        call()
        runs.append([(name, 1e6 * (t - marks[0][1])) for name, t in marks])
        torch.cuda.synchronize()
    rows = [(runs[0][i][0], statistics.median(run[i][1] for run in runs)) for i in range(len(runs[0]))]
    lines = [f"{torch.cuda.get_device_name()}, {args.problems} problems of the 32x32 key, reduction "
             f"{args.reduction}: host microseconds from the call's start, median of {args.repeat}"]
    lines += [f"  {us:8.1f}  {name}" for name, us in rows]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
