"""Forward + backward time of a generator preset (bf16 autocast, fp32 parameters), one optimiser-free step.

    python benchmarks/generator_step.py --presets DiT-B/2 --batch 256 --out step.json
    python benchmarks/generator_step.py --presets DiT-B/2 --no-attn-fp32 --compile              # the training step's
    python benchmarks/generator_step.py --presets DiT-B/2 --no-attn-fp32 --compile --rope-per-call   # its baseline
    python benchmarks/generator_step.py --presets DiT-B/2 --no-attn-fp32 --compile --profile dit_profile.txt
    python benchmarks/generator_step.py --presets DiT-B/2 --no-attn-fp32 --compile \
        --compile-mode max-autotune-no-cudagraphs
    python benchmarks/generator_step.py --presets DiT-tiny --batch 4 --device cpu --iters 1   # smoke test

--rope-per-call builds RoPE's cos/sin tables in every forward, as the DiT did before it kept them in buffers (under
torch.compile they fuse into the kernels that rotate q and k, which then evaluate cos/sin per element).
--compile-mode passes torch.compile's mode (the training step compiles with the default; max-autotune-no-cudagraphs
lets inductor time Triton templates against cuBLAS for each product and fuse epilogues into them, at minutes of
compilation; the CUDA-graph modes are left out: the trainer's steps replay graphs of their own).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kernel_classes import device_ms_by_class, format_classes  # benchmarks/kernel_classes.py

from drifting.models.dit import build_generator
from drifting.models.generate import draw_inputs

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["DiT-B/2"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--no-attn-fp32", action="store_true", help="attention in bf16 (the latent SOTA setting)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator (as train.compile)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="with --compile: torch.compile's mode")
    parser.add_argument("--rope-per-call", action="store_true",
                        help="RoPE tables built in every forward (the baseline of the buffered tables)")
    parser.add_argument("--profile", help="also profile one step of the last preset; the operators by GPU time here")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.compile_mode != "default" and not args.compile:
        parser.error("--compile-mode: expected --compile as well")
    cuda = args.device == "cuda"
    card = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    print(f"generator forward + backward, {card}")
    print(f"{'preset':<14} {'batch':>5} {'ms/step':>9} {'samples/s':>10} {'peak GiB':>9}")
    for name in args.presets:
        model = build_generator(name, activation_checkpointing=args.checkpointing,
                                attn_fp32=not args.no_attn_fp32).to(args.device)
        if args.rope_per_call:
            model.rope = lambda model=model: model.rope_tables(model.rope_cos.device)
        run = torch.compile(model, mode=args.compile_mode) if args.compile else model
        g = torch.Generator(device="cpu").manual_seed(0)
        noise, style = draw_inputs(model, args.batch, generator=g, device=torch.device(args.device))
        labels = torch.randint(0, model.num_classes, (args.batch,), generator=g).to(args.device)
        alpha = 1 + 3 * torch.rand(args.batch, generator=g).to(args.device)

        def step():
            model.zero_grad(set_to_none=True)
            out = run(noise, labels, alpha, style)
            out.float().square().mean().backward()

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        if cuda:
            torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0) / args.iters
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append({"preset": name, "batch": args.batch, "checkpointing": args.checkpointing,
                     "attn_fp32": not args.no_attn_fp32, "compile": args.compile,
                     "compile_mode": args.compile_mode if args.compile else None, "rope_per_call": args.rope_per_call,
                     "ms": ms, "samples_per_s": args.batch / ms * 1e3, "peak_gib": peak})
        print(f"{name:<14} {args.batch:>5} {ms:>9.1f} {args.batch / ms * 1e3:>10.0f} {peak:>9.2f}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                step()
                if cuda:
                    torch.cuda.synchronize()
            classes = format_classes(device_ms_by_class(prof.events()))
            print(classes, end="")
            with open(args.profile, "w") as f:
                f.write(classes + "\n" + prof.key_averages().table(
                    sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40, max_name_column_width=90)
                    + "\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
