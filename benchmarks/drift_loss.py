"""Speed and memory of the drifting loss at the paper's ablation sizes, forward plus backward.

64 classes; 64 generated, 16 unconditional and 64 positive samples per class; temperatures 0.02, 0.05, 0.2; bf16
inputs, fp32 math. One feature key at a time (the five sizes of the ROADMAP table), then the whole 86-key set of a
latent MAE-256 (one ablation step). For each: median ms, peak GiB (everything allocated during the call, inputs
included), the floor max(FLOPs / 400 TFLOP/s, bytes / 3 TB/s) with FLOPs = (1 + R) products of [C_g, S] x [S, T] per
problem and bytes = inputs read once + gradient written once, and the ratio to the floor.

    python benchmarks/drift_loss.py --out results.json                 # on a CUDA machine
    python benchmarks/drift_loss.py --reduction mean --out results.json   # drift_loss(reduction="mean") instead
    python benchmarks/drift_loss.py --impls reference --keys 4x4 --device cpu --repeat 1   # a smoke test

As a chunked training step calls it: `--keys none --all-keys --training-dtypes --classes 4` (the 86 keys of one
chunk of 4 classes, the mean and std keys in fp32 as the features give them; a 64-class step makes 16 such calls per
key). `--kernel-variant fp32_dot=tf32x3` sets `drift_triton.VARIANT` for the fused path (`cuda=false`: every pass on
Triton, without the CUDA kernel that by default takes the 32x32 key's problems). `--given-stats` passes each
call its statistics, computed beforehand and not timed, as a class-chunked step does (the fused kernel then runs
pass 3 alone); the JSON holds every key's time (`per_key_ms`), the profile of where a step's loss phase goes.
`--stats-pass` times instead what the statistics pass of a class-chunked step computes per key (`scale_sums` then
`field_square_sums`, no gradient; impls reference, fused = the kernel's passes 1-2, compiled = the reference math
under torch.compile as `train.stats_compiled`); the "x floor" column stays the loss's floor there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from drifting.drift import drift_loss, drift_stats, field_square_sums, scale_sums
from drifting.kernels import kernel_variant

N_C, C_G, C_N, C_P = 64, 64, 16, 64
REDUCTION = "none"  # --reduction
TEMPERATURES = (0.02, 0.05, 0.2)
PEAK_FLOPS, PEAK_BYTES = 400e12, 3e12

# The five keys of the ROADMAP table: name -> (locations per class L, feature size S).
KEYS = {
    "32x32": (1024, 256),
    "16x16": (256, 512),
    "8x8": (64, 1024),
    "4x4": (16, 2048),
    "mean/std": (2, 2048),  # the global mean and std keys of layer4 together: 128 problems
}


def ablation_key_set() -> list[tuple[str, int, int]]:
    """The 86 keys of a latent MAE-256 (official-code-notes.md 2.1): (name, L, S)."""
    keys = [("global", 1, 4096), ("norm_x", 1, 4)]
    taps = [("conv1", 32, 256), ("layer1", 32, 256), ("layer1_blk2", 32, 256),
            ("layer2", 16, 512), ("layer2_blk2", 16, 512), ("layer2_blk4", 16, 512),
            ("layer3", 8, 1024), ("layer3_blk2", 8, 1024), ("layer3_blk4", 8, 1024), ("layer3_blk6", 8, 1024),
            ("layer4", 4, 2048), ("layer4_blk2", 4, 2048)]
    for name, h, s in taps:
        keys += [(name, h * h, s), (f"{name}_mean", 1, s), (f"{name}_std", 1, s)]
        for p in (2, 4):
            if h % p == 0:
                keys += [(f"{name}_mean_{p}", (h // p) ** 2, s), (f"{name}_std_{p}", (h // p) ** 2, s)]
    return keys


def training_dtype(name: str) -> torch.dtype:
    """The dtype a training step's features give a key of `ablation_key_set`: the location keys and `global` come
    from the bf16 encoder and generator as they are; the mean, std and norm_x keys are computed in fp32
    (drifting/features.py)."""
    return torch.float32 if name == "norm_x" or "_mean" in name or "_std" in name else torch.bfloat16


def make_inputs(locations: int, s: int, device: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    b = N_C * locations
    gen = torch.randn(b, C_G, s, generator=g, device=device, dtype=dtype).requires_grad_()
    pos = torch.randn(b, C_P, s, generator=g, device=device, dtype=dtype)
    neg = torch.randn(b, C_N, s, generator=g, device=device, dtype=dtype)
    # guidance weights w = (alpha - 1)(C_g - 1)/C_n for alpha in [1, 4], one per class, repeated over locations
    alpha = 1 + 3 * torch.rand(N_C, generator=g, device=device)
    w = ((alpha - 1) * (C_G - 1) / C_N).repeat_interleave(locations)[:, None].expand(b, C_N).contiguous()
    return gen, pos, neg, w


def floor_ms(locations: int, s: int, itemsize: int = 2) -> float:
    b, t = N_C * locations, C_G + C_N + C_P
    flops = b * (1 + len(TEMPERATURES)) * 2 * C_G * t * s
    bytes_ = b * t * s * itemsize + b * C_G * s * itemsize + b * C_N * 4
    return 1e3 * max(flops / PEAK_FLOPS, bytes_ / PEAK_BYTES)


def loss_step(impl: str, gen, pos, neg, w, stats=None):
    """Forward and backward of the mean over the call's problems: the [B] losses then `.mean()` (REDUCTION "none"),
    or `drift_loss(reduction="mean")`, whose gradient the fused kernel writes for the mean in the forward pass."""
    gen.grad = None
    if impl == "compiled":
        loss, _ = _compiled(gen, pos, neg, w)
    else:
        loss, _ = drift_loss(gen, pos, neg, neg_weight=w, temperatures=TEMPERATURES, impl=impl, check_finite=False,
                             stats=stats, reduction=REDUCTION)
    (loss.mean() if REDUCTION == "none" else loss).backward()


@torch.no_grad()
def stats_step(impl: str, gen, pos, neg, w):
    """The statistics math of one key of one chunk, as the statistics pass runs it."""
    sums = scale_sums(gen, pos, neg, neg_weight=w, impl=impl, check_finite=False)
    field_square_sums(gen, pos, neg, neg_weight=w, total_scale_sums=sums, temperatures=TEMPERATURES, impl=impl,
                      check_finite=False)


@torch.no_grad()
def given_stats(gen, pos, neg, w):
    """The statistics a class-chunked step hands its loss calls (here from the call's own problems)."""
    return drift_stats(gen, pos, neg, neg_weight=w, temperatures=TEMPERATURES, check_finite=False)


def _reference(gen, pos, neg, w):
    return drift_loss(gen, pos, neg, neg_weight=w, temperatures=TEMPERATURES, impl="reference", check_finite=False,
                      reduction=REDUCTION)


_compiled = None


def time_impl(impl: str, inputs, device: str, repeat: int, step=loss_step, idle_ms: float = 0.0) -> tuple[float, float]:
    """Median milliseconds and peak GiB of step(impl, *inputs) (default: the loss's forward + backward); idle_ms:
    the device idles that long before each timed call (see --idle-ms)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step(impl, *inputs)  # warm-up (compilation, autotuning)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        sync()
        if idle_ms:
            time.sleep(idle_ms / 1e3)
        t0 = time.perf_counter()
        step(impl, *inputs)
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    global _compiled, N_C, REDUCTION
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="reference,fused", help="comma list of reference, fused, compiled")
    parser.add_argument("--keys", default=",".join(KEYS), help="comma list of " + ", ".join(KEYS) + " (or none)")
    parser.add_argument("--all-keys", action="store_true", help="also time the whole 86-key ablation set")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the inputs' dtype")
    parser.add_argument("--training-dtypes", action="store_true",
                        help="86-key set: each key in the dtype a training step gives it (mean/std keys fp32)")
    parser.add_argument("--classes", type=int, default=N_C, help="N_C classes per call (a training chunk: 4)")
    parser.add_argument("--kernel-variant", type=kernel_variant, default="",
                        help="drift_triton.VARIANT items, e.g. fp32_dot=tf32x3")
    parser.add_argument("--given-stats", action="store_true",
                        help="86-key set: pass each call its statistics (untimed), as a class-chunked step does")
    parser.add_argument("--stats-pass", action="store_true",
                        help="86-key set: time each key's statistics math (scale_sums, field_square_sums) instead")
    parser.add_argument("--reduction", choices=("none", "mean"), default="none",
                        help="none: the [B] losses, then .mean() (the backward scales the gradient per problem); "
                             "mean: drift_loss(reduction='mean'), the gradient written for the mean in the forward")
    parser.add_argument("--idle-ms", type=float, default=0.0,
                        help="let the GPU idle this long before each timed call: back-to-back calls of the large keys "
                             "reach an H200's power cap, which lowers its clocks (benchmarks/power_draw.py)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    impls = args.impls.split(",")
    key_names = [] if args.keys == "none" else args.keys.split(",")
    unknown = [k for k in key_names if k not in KEYS]
    if unknown:
        parser.error(f"--keys: expected names from {', '.join(KEYS)} or none, got {', '.join(unknown)}")
    if args.classes < 1:
        parser.error(f"--classes: expected >= 1, got {args.classes}")
    if not args.idle_ms >= 0:
        parser.error(f"--idle-ms: expected a number >= 0, got {args.idle_ms}")
    N_C, REDUCTION = args.classes, args.reduction
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if (args.given_stats or args.stats_pass) and not args.all_keys:
        parser.error("--given-stats, --stats-pass: they time the 86-key set, expected --all-keys with them")
    if args.given_stats and args.stats_pass:
        parser.error("--given-stats: not with --stats-pass (one times the loss calls, the other the statistics)")
    if "compiled" in impls and not args.stats_pass:
        if args.given_stats:
            parser.error("--given-stats: not with the compiled impl (it computes its own statistics)")
        _compiled = torch.compile(_reference)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"drifting loss, forward + backward, {args.dtype} inputs, {N_C} classes, reduction {REDUCTION}, {card}"
          + (f", kernel variant {args.kernel_variant}" if args.kernel_variant else ""))
    rows = []
    header = f"{'key':<10} {'problems':>8} {'S':>5} {'in GiB':>7} {'floor ms':>8} " + " ".join(
        f"{impl + ' ms/GiB':>20} {'x floor':>7}" for impl in impls)
    print(header)
    for key in key_names:
        locations, s = KEYS[key]
        inputs = make_inputs(locations, s, args.device, dtype=dtype)
        in_gib = sum(t.numel() * t.element_size() for t in inputs) / 2**30
        row = {"key": key, "problems": N_C * locations, "S": s, "input_gib": in_gib,
               "floor_ms": floor_ms(locations, s, dtype.itemsize)}
        for impl in impls:
            ms, gib = time_impl(impl, inputs, args.device, args.repeat, idle_ms=args.idle_ms)
            row[impl] = {"ms": ms, "peak_gib": gib, "x_floor": ms / row["floor_ms"]}
        rows.append(row)
        print(f"{key:<10} {row['problems']:>8} {s:>5} {in_gib:>7.2f} {row['floor_ms']:>8.2f} " + " ".join(
            f"{row[i]['ms']:>11.2f} / {row[i]['peak_gib']:>6.2f} {row[i]['x_floor']:>7.1f}" for i in impls))
        del inputs
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.all_keys:
        keys = ablation_key_set()
        assert len(keys) == 86
        dtypes = {name: training_dtype(name) if args.training_dtypes else dtype for name, _, _ in keys}
        total_floor = sum(floor_ms(l, s, dtypes[name].itemsize) for name, l, s in keys)
        row = {"key": "86 keys", "problems": N_C * sum(l for _, l, _ in keys), "floor_ms": total_floor,
               "training_dtypes": args.training_dtypes, "fp32_keys": sum(d == torch.float32 for d in dtypes.values())}
        row["given_stats"], row["stats_pass"] = args.given_stats, args.stats_pass
        step = stats_step if args.stats_pass else loss_step
        for impl in impls:
            per_key, peak = {}, 0.0
            for name, locations, s in keys:
                inputs = make_inputs(locations, s, args.device, dtype=dtypes[name])
                if args.given_stats:
                    inputs = (*inputs, given_stats(*inputs))
                per_key[name], gib = time_impl(impl, inputs, args.device, max(1, args.repeat // 2), step,
                                               idle_ms=args.idle_ms)
                peak = max(peak, gib)
                del inputs
            total_ms = sum(per_key.values())
            row[impl] = {"ms": total_ms, "peak_gib": peak, "x_floor": total_ms / total_floor, "per_key_ms": per_key}
            slowest = sorted(per_key, key=per_key.get, reverse=True)[:8]
            print(f"  {impl}, slowest keys: " + ", ".join(f"{k} {per_key[k]:.1f}" for k in slowest))
        rows.append(row)
        print(f"{'86 keys':<10} {row['problems']:>8} {'':>5} {'':>7} {total_floor:>8.2f} " + " ".join(
            f"{row[i]['ms']:>11.2f} / {row[i]['peak_gib']:>6.2f} {row[i]['x_floor']:>7.1f}" for i in impls))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "classes": N_C, "dtype": args.dtype,
                       "reduction": REDUCTION, "idle_ms": args.idle_ms, "kernel_variant": args.kernel_variant,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
