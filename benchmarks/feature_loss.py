"""Time and peak memory of FeatureDriftLoss for the ablation-size step: N_c classes with 64 generated, 64 positive
and 16 unconditional samples each, on 32x32x4 latents, with the MAE-256 encoder (86 keys), bf16 encoder, fp32 drift.

    python benchmarks/feature_loss.py --impl reference --out feature_loss.json
    python benchmarks/feature_loss.py --encoder mae_tiny --classes 2 --device cpu --iters 1   # smoke test
    python benchmarks/feature_loss.py --impl fused --stats-chunks 16   # also the statistics pass over 16 chunks

"whole" = one call over all keys (encoder forward on the real and generated samples, 86 drift losses, backward
through the encoder to the generated samples). --stats-chunks K also times `FeatureDriftLoss.stats` over the same
classes in K chunks (the statistics pass of class-chunked training; with --impl fused, passes 1 and 2 of the kernel;
with --group-keys, one call per tap and pass, the tap's keys stacked) and then the K chunks' loss calls at those
statistics, forward and backward, as a class-chunked training step makes them (with --loss-group-keys, a source's
keys of one dtype in one call: `FeatureDriftLoss(..., group_keys=True)`).

    python benchmarks/feature_loss.py --impl auto --classes 16 --iters 1 --stats-chunks 4 --loss-group-keys
    python benchmarks/feature_loss.py --impl auto --classes 16 --iters 1 --stats-chunks 4 --loss-group-keys \
        --fused-min-problems 1 --stack-below 128 --stacked-losses   # the small keys once over the chunks
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from drifting.feature_loss import ClassBatch, FeatureDriftLoss
from drifting.kernels import kernel_variant
from drifting.models.resnet_mae import resnet_maes


def timed_ms(fn, iters: int, cuda: bool, reset_peak: bool = False):
    """(milliseconds per call of fn over `iters` calls after one warm-up call, the warm-up's result); reset_peak:
    the peak-memory counter starts after the warm-up."""
    first = fn()  # warm-up: kernel compilation, autotuning, caches
    if cuda:
        torch.cuda.synchronize()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / iters, first


def chunk_parser() -> argparse.ArgumentParser:
    """The options of the benchmarks that time one class chunk's encoder maps (tap_stats.py, encoder_step.py)."""
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", default="mae_latent_256", choices=list(resnet_maes))
    p.add_argument("--classes", type=int, default=4, help="classes in the chunk (64 generated, 80 real samples each)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=5)
    return p


def parse_chunk_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """`p.parse_args()`, with --classes and --iters checked before any work."""
    args = p.parse_args()
    for name, value in (("classes", args.classes), ("iters", args.iters)):
        if value < 1:
            p.error(f"--{name}: expected an integer >= 1, got {value}")
    return args


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoder", default="mae_latent_256", choices=list(resnet_maes))
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--impl", default="reference", choices=["reference", "fused", "auto"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--stats-chunks", type=int, default=0, help="also time stats() over this many class chunks")
    parser.add_argument("--group-keys", action="store_true", help="stats(group_keys=True): one call per tap and pass")
    parser.add_argument("--fused-min-problems", type=int, default=None,
                        help="stats(fused_min_problems=N): calls of at least N problems on the fused kernel")
    parser.add_argument("--compiled-stats", action="store_true", help="stats(compiled=True): the math compiled")
    parser.add_argument("--stack-below", type=int, default=None,
                        help="stats(stack_below=N): calls of fewer than N problems per chunk once over all chunks")
    parser.add_argument("--stacked-losses", action="store_true",
                        help="stats(stacked_losses=True): those calls' losses in the statistics pass (with "
                             "--stack-below); the chunks' loss calls take them")
    parser.add_argument("--loss-group-keys", action="store_true",
                        help="the chunks' loss calls with group_keys=True (a source's keys of one dtype together)")
    parser.add_argument("--kernel-variant", type=kernel_variant, default="",
                        help="drift_triton.VARIANT items, e.g. fp32_block_s=64")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.stats_chunks < 0 or (args.stats_chunks and args.classes % args.stats_chunks):
        parser.error(f"--stats-chunks: expected a divisor of --classes {args.classes}, got {args.stats_chunks}")
    if args.stack_below is not None and args.stack_below < 1:
        parser.error(f"--stack-below: expected >= 1, got {args.stack_below}")
    if args.stacked_losses and (args.stack_below is None or not args.stats_chunks):
        parser.error("--stacked-losses: needs --stack-below and --stats-chunks")
    cuda = args.device == "cuda"
    encoder = resnet_maes[args.encoder]().to(args.device)
    cfg = encoder.cfg
    if cuda:
        encoder = encoder.to(torch.bfloat16)  # the authors run the frozen encoder in bf16
    loss_fn = FeatureDriftLoss(encoder, impl=args.impl, check_finite=False)
    g = torch.Generator(device=args.device).manual_seed(0)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    dtype = torch.bfloat16 if cuda else torch.float32
    n_c = args.classes
    gen = torch.randn(n_c * 64, *shape, generator=g, device=args.device, dtype=dtype).requires_grad_()
    pos = torch.randn(n_c * 64, *shape, generator=g, device=args.device, dtype=dtype)
    neg = torch.randn(n_c * 16, *shape, generator=g, device=args.device, dtype=dtype)
    w = torch.rand(n_c, generator=g, device=args.device) * 4

    def step():
        gen.grad = None
        loss, info = loss_fn(gen, pos, neg, w)
        loss.backward()
        return info

    ms, info = timed_ms(step, args.iters, cuda, reset_peak=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"FeatureDriftLoss ({args.impl}), {args.encoder}, {n_c} classes x 64/64/16, {len(info)} keys, {card}: "
          f"{ms:.0f} ms per forward + backward, peak {peak:.1f} GiB")
    result = {"card": card, "kernel_variant": args.kernel_variant, "encoder": args.encoder, "classes": n_c,
              "impl": args.impl, "keys": len(info), "ms": ms, "peak_gib": peak}
    if args.stats_chunks:
        k = n_c // args.stats_chunks  # classes per chunk
        batches = [ClassBatch(gen.detach()[i * 64:(i + k) * 64], pos[i * 64:(i + k) * 64], neg[i * 16:(i + k) * 16],
                              w[i:i + k]) for i in range(0, n_c, k)]
        with torch.autocast(args.device, torch.bfloat16, enabled=cuda):
            result["stats_ms"], stats = timed_ms(
                lambda: loss_fn.stats(batches, group_keys=args.group_keys, fused_min_problems=args.fused_min_problems,
                                      compiled=args.compiled_stats, stack_below=args.stack_below,
                                      stacked_losses=args.stacked_losses), args.iters, cuda)
        result["stats_chunks"] = args.stats_chunks
        result["group_keys"] = args.group_keys
        result["stack_below"], result["stacked_losses"] = args.stack_below, args.stacked_losses
        print(f"statistics pass over {args.stats_chunks} chunks of {k} classes: {result['stats_ms']:.0f} ms")
        with torch.autocast(args.device, torch.bfloat16, enabled=cuda):
            def chunk_losses():
                gen.grad = None
                for j, i in enumerate(range(0, n_c, k)):
                    part = gen[i * 64:(i + k) * 64]  # a view of the leaf: the gradients accumulate into gen.grad
                    loss, _ = loss_fn(part, pos[i * 64:(i + k) * 64], neg[i * 16:(i + k) * 16], w[i:i + k],
                                      stats=stats, chunk=j, group_keys=args.loss_group_keys)
                    loss.backward()

            result["chunk_losses_ms"], _ = timed_ms(chunk_losses, args.iters, cuda)
        result["loss_group_keys"] = args.loss_group_keys
        print(f"loss calls of the {args.stats_chunks} chunks at those statistics, forward + backward"
              f"{' (keys grouped)' if args.loss_group_keys else ''}: {result['chunk_losses_ms']:.0f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
