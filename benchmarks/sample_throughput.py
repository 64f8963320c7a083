"""One-step sampling throughput of the generator presets: samples per second of `generate` (one forward pass).

    python benchmarks/sample_throughput.py --out sample_throughput.json                 # every paper preset, CUDA
    python benchmarks/sample_throughput.py --presets DiT-B/2 DiT-L/2 --batch-sizes 256
    python benchmarks/sample_throughput.py --device cpu --presets DiT-tiny --batch-sizes 4 --iters 2   # smoke test

Each (preset, batch) is timed after `--warmup` untimed calls, over `--iters` calls between two synchronisations, on
freshly initialised weights (the speed of dense layers does not depend on the values). bf16 means
the preset's bf16 autocast with its `attn_fp32` setting unless overridden; parameters stay fp32, as in training.
Times include drawing the noise and style indices and the label checks of `generate`, i.e. what a user pays.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from drifting.models.dit import GENERATORS, build_generator, generator_config
from drifting.models.generate import generate

DEFAULT_PRESETS = ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "DiT-B/4", "DiT-B/16", "DiT-L/16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch: int, device: torch.device, *, bf16: bool, attn_fp32: bool | None, warmup: int,
            iters: int, compile_model: bool) -> dict:
    """Seconds per call and samples/s of `generate` for one preset and batch size."""
    overrides = {"bf16": bf16}
    if attn_fp32 is not None:
        overrides["attn_fp32"] = attn_fp32
    cfg = generator_config(name, **overrides)
    model = build_generator(name, **overrides).to(device).eval()
    if compile_model:
        model = torch.compile(model)  # generate() only reads attributes the compiled wrapper forwards
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        generate(model, labels, 1.5, generator=g)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        generate(model, labels, 1.5, generator=g)
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    result = {
        "preset": name, "batch": batch, "ms_per_batch": 1e3 * seconds, "samples_per_s": batch / seconds,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "bf16": cfg.bf16, "attn_fp32": cfg.attn_fp32,
        "compiled": compile_model,
    }
    if device.type == "cuda":
        result["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=list(GENERATORS),
                        metavar="NAME", help=f"generator presets (default: the paper-scale ones); any of "
                                             f"{', '.join(GENERATORS)}")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fp32", action="store_true", help="turn bf16 autocast off (default: bf16)")
    parser.add_argument("--attn-fp32", action=argparse.BooleanOptionalAction, default=None,
                        help="force attention in fp32 on/off (default: the preset's setting)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("CUDA is not available; pass --device cpu for a smoke test")
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (fp32 attention, adaLN) as training runs them
        torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    results = []
    print(f"{'preset':<14}{'params':>9}{'batch':>7}{'ms/batch':>11}{'samples/s':>12}{'peak GiB':>10}")
    for name in args.presets:
        for batch in args.batch_sizes:
            try:
                r = measure(name, batch, device, bf16=not args.fp32, attn_fp32=args.attn_fp32, warmup=args.warmup,
                            iters=args.iters, compile_model=args.compile)
            except torch.cuda.OutOfMemoryError:
                r = {"preset": name, "batch": batch, "error": "out of memory"}
                print(f"{name:<14}{'':>9}{batch:>7}  out of memory")
            else:
                print(f"{name:<14}{r['params_M']:>8.2f}M{batch:>7}{r['ms_per_batch']:>11.2f}{r['samples_per_s']:>12.1f}"
                      f"{r.get('peak_mem_GiB', float('nan')):>10.2f}")
            results.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if args.out is not None:
        record = {
            "benchmark": "one-step sampling throughput",
            "device": card, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
            "warmup": args.warmup, "iters": args.iters, "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
