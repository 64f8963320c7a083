"""The tap encoder's part of one class chunk of the ablation step, alone: its forward without gradient (the real
samples, as in the statistics pass) and its forward and backward to the input (the generated samples; the weights
are frozen), under bf16 autocast as FeatureDriftLoss runs it (taps in bf16), eager or compiled as
train.compile_encoder, with the encoder in NCHW or channels-last memory. To see where a channels-last encoder wins
(no cuDNN layout conversions: 0.4 s of the step) and where it loses (the compiled GroupNorms: the tenth sitting's
encoder forward went from 804 to 921 ms), with --profile the operators by GPU time. Compiled, the taps have static
shapes (`compile_encoders`' default; inductor then lays out the convolutions channels-last itself); --dynamic gives
torch.compile's automatic dynamic shapes instead.

    python benchmarks/encoder_step.py --compile
    python benchmarks/encoder_step.py --compile --dynamic
    python benchmarks/encoder_step.py --compile --channels-last --profile encoder_cl_profile.txt
    python benchmarks/encoder_step.py --compile --compile-mode max-autotune-no-cudagraphs
    python benchmarks/encoder_step.py --device cpu --encoder mae_tiny --classes 1 --iters 1   # smoke test
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch
from feature_loss import chunk_parser, parse_chunk_args, timed_ms  # benchmarks/feature_loss.py
from generator_step import COMPILE_MODES  # benchmarks/generator_step.py
from kernel_classes import device_ms_by_class, format_classes  # benchmarks/kernel_classes.py
from torch.profiler import ProfilerActivity, profile

from drifting.feature_loss import FeatureDriftLoss
from drifting.models.resnet_mae import resnet_maes


def main() -> None:
    p = chunk_parser()  # --encoder, --classes, --device, --iters
    p.add_argument("--compile", action="store_true", help="torch.compile the taps, as train.compile_encoder=true")
    p.add_argument("--dynamic", action="store_true",
                   help="with --compile: torch.compile's automatic dynamic shapes (the baseline of compile_encoders' "
                        "static shapes, under which inductor lays out the convolutions channels-last)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="with --compile: torch.compile's mode (benchmarks/generator_step.py says why these two)")
    p.add_argument("--channels-last", action="store_true", help="the encoder in channels-last memory")
    p.add_argument("--profile", help="also profile one call of each and write the operators by GPU time here")
    p.add_argument("--out", default=None)
    args = parse_chunk_args(p)
    if args.dynamic and not args.compile:
        p.error("--dynamic: expected --compile as well")
    if args.compile_mode != "default" and not args.compile:
        p.error("--compile-mode: expected --compile as well")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu for a smoke test)")

    encoder = resnet_maes[args.encoder]().to(device)
    if args.channels_last:
        encoder.to(memory_format=torch.channels_last)
    loss = FeatureDriftLoss(encoder)  # frozen, eval; its taps in the autocast dtype, as in training
    if args.compile:
        loss.compile_encoders(mode=args.compile_mode, **({"dynamic": None} if args.dynamic else {}))
    cfg = encoder.cfg
    g = torch.Generator(device=device).manual_seed(0)
    real = torch.randn(80 * args.classes, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, device=device)
    gen = torch.randn(64 * args.classes, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    weights = {}

    def forward_real():
        with torch.no_grad(), autocast:
            return loss.encoder.taps(real)

    def forward_backward_gen():
        leaf = gen.clone().requires_grad_()
        with autocast:
            taps = loss.encoder.taps(leaf)
        total = sum((t.float() * weights.setdefault(k, torch.randn(t.shape, generator=g, device=device))).sum()
                    for k, t in taps.items())
        return torch.autograd.grad(total, leaf)[0]

    real_ms, taps = timed_ms(forward_real, args.iters, cuda)
    gen_ms, _ = timed_ms(forward_backward_gen, args.iters, cuda)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in taps.values()})
    layout = "channels-last" if args.channels_last else "NCHW"
    mode = ("compiled, dynamic shapes" if args.dynamic else "compiled") if args.compile else "eager"
    mode += f" ({args.compile_mode})" if args.compile_mode != "default" else ""
    print(f"{card}: {args.encoder}, {layout}, {mode}, taps {'/'.join(dtypes)}")
    print(f"forward, {real.shape[0]} real samples, no gradient      {real_ms:9.2f} ms")
    print(f"forward + backward, {gen.shape[0]} generated samples      {gen_ms:9.2f} ms")
    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            forward_real()
            forward_backward_gen()
            if cuda:
                torch.cuda.synchronize()
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        classes = format_classes(device_ms_by_class(prof.events()))
        print(classes, end="")
        with open(args.profile, "w") as f:
            f.write(classes + "\n" + prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
                    + "\n")
    if args.out:
        result = {"card": card, "torch": torch.__version__, "encoder": args.encoder, "classes": args.classes,
                  "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None,
                  "dynamic": args.dynamic, "channels_last": args.channels_last,
                  "taps_dtypes": dtypes,
                  "real_forward_ms": real_ms, "gen_forward_backward_ms": gen_ms}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
