"""Time of a training chunk's statistics keys (every tap's mean and std over the whole map, 2x2 and 4x4 windows):
the reference reductions (`features.tap_sets`) against the fused kernel (`kernels/tap_stats_triton.py`); and of
laying out its per-location keys as problems: `feature_loss._problems` (a torch copy) against the layout kernel
(`kernels/layout_triton.py`).

The maps are the MAE encoder's taps of one class chunk at the ablation size (default 4 classes: 256 generated and
320 real samples of 32x32x4 latents; random weights, which give the same shapes), in bf16 as FeatureDriftLoss gives
them under autocast (--fp32: as autocast leaves them, fp32 GroupNorm outputs). Two cases, as a chunked step makes
them: every key without gradient (the statistics pass and the real samples), and the generated samples' keys forward
and backward (the loss call; one backward over all keys of a tap).

    python benchmarks/tap_stats.py --out tap_stats.json
    python benchmarks/tap_stats.py --channels-last       # maps in channels-last memory (a channels-last encoder)
    python benchmarks/tap_stats.py --fp32                # fp32 maps
    python benchmarks/tap_stats.py --device cpu --encoder mae_tiny --classes 1 --iters 1 --impls reference  # smoke
"""

from __future__ import annotations

import json

import torch
from feature_loss import chunk_parser, parse_chunk_args, timed_ms  # benchmarks/feature_loss.py

from drifting.feature_loss import _problems
from drifting.features import tap_sets
from drifting.models.resnet_mae import resnet_maes


def main() -> None:
    p = chunk_parser()  # --encoder, --classes, --device, --iters
    p.add_argument("--impls", default="reference,fused", help="comma-separated: reference, fused")
    p.add_argument("--channels-last", action="store_true", help="the maps in channels-last memory")
    p.add_argument("--fp32", action="store_true", help="the maps in fp32, as autocast leaves them")
    p.add_argument("--out", default=None)
    args = parse_chunk_args(p)
    impls = args.impls.split(",")
    if not impls or any(i not in ("reference", "fused") for i in impls):
        p.error(f"--impls: expected a comma-separated list of reference and fused, got {args.impls!r}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if "fused" in impls and not cuda:
        p.error("--impls fused: needs --device cuda")

    encoder = resnet_maes[args.encoder]().to(device).eval()
    cfg = encoder.cfg
    gen_n, real_n = 64 * args.classes, 80 * args.classes
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        def maps(n):
            out = encoder.taps(torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, device=device))
            out = [m if args.fp32 or not cuda else m.to(torch.bfloat16) for m in out.values()]
            return [m.to(memory_format=torch.channels_last) if args.channels_last else m for m in out]
        gen_maps, real_maps = maps(gen_n), maps(real_n)
    read_gb = sum(m.numel() * m.element_size() for m in gen_maps + real_maps) / 1e9

    def keys_no_grad(fused: bool):
        with torch.no_grad():
            for m in gen_maps + real_maps:
                for _ in tap_sets("t", m, fused=fused):
                    pass

    weights = {}

    def keys_with_grad(fused: bool):
        for i, m in enumerate(gen_maps):
            leaf = m.detach().requires_grad_()
            keys = [v for k, v in tap_sets("t", leaf, fused=fused) if k != "t"]
            ws = weights.setdefault(i, [torch.randn_like(v) for v in keys])
            torch.autograd.grad(sum((v * w).sum() for v, w in zip(keys, ws)), leaf)

    def layout_of(fused: bool):
        if fused:
            from drifting.kernels import fused_problem_layout

            return fused_problem_layout
        return _problems

    def problems_no_grad(fused: bool):  # each tap's location key, real samples in one block (pos and neg apart in
        layout = layout_of(fused)        # a step: the same bytes)
        with torch.no_grad():
            for m in gen_maps + real_maps:
                layout(m.flatten(2).transpose(1, 2), args.classes)

    problem_weights = {}

    def problems_with_grad(fused: bool):
        layout = layout_of(fused)
        for i, m in enumerate(gen_maps):
            leaf = m.detach().requires_grad_()
            out = layout(leaf.flatten(2).transpose(1, 2), args.classes)
            weight = problem_weights.setdefault(i, torch.randn_like(out))
            torch.autograd.grad((out * weight).sum(), leaf)

    rows = []
    card = torch.cuda.get_device_name() if cuda else "cpu"
    dtype = str(gen_maps[0].dtype).removeprefix("torch.")
    layout = ", channels-last" if args.channels_last else ""
    print(f"{card}: {len(gen_maps)} taps of {args.encoder}, {gen_n} generated + {real_n} real samples, "
          f"{dtype}{layout}; maps {read_gb:.2f} GB")
    print(f"{'':10s} {'statistics keys':>30s}   {'location keys as problems':>30s}")
    columns = f"{'no grad, all maps':>18s} {'gen fwd+bwd':>12s}"
    print(f"{'impl':10s} {columns}   {columns}")
    for impl in impls:
        fused = impl == "fused"
        row = {"impl": impl, "no_grad_ms": timed_ms(lambda: keys_no_grad(fused), args.iters, cuda)[0],
               "gen_fwd_bwd_ms": timed_ms(lambda: keys_with_grad(fused), args.iters, cuda)[0],
               "problems_no_grad_ms": timed_ms(lambda: problems_no_grad(fused), args.iters, cuda)[0],
               "problems_gen_fwd_bwd_ms": timed_ms(lambda: problems_with_grad(fused), args.iters, cuda)[0]}
        rows.append(row)
        print(f"{impl:10s} {row['no_grad_ms']:15.2f} ms {row['gen_fwd_bwd_ms']:9.2f} ms   "
              f"{row['problems_no_grad_ms']:15.2f} ms {row['problems_gen_fwd_bwd_ms']:9.2f} ms")
    if args.out:
        result = {"card": card, "torch": torch.__version__, "encoder": args.encoder, "classes": args.classes,
                  "channels_last": args.channels_last, "dtype": dtype, "map_gb": read_gb, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
