"""What the training step's ~6,500 cudaMemsetAsync calls cost on the GPU, operator by operator.

The step's operator table (`benchmarks/train_step.py --profile`) gives `cudaMemsetAsync` 277-567 ms of "CUDA total"
(up to 10% of the step's GPU work). The profiler's parent chains put those calls in cuBLASLt's matrix products
(one per generator linear), in cuDNN's convolutions with 4 input channels (the MAE's first layer on SD-VAE
latents) and in cuDNN's attention. This times each of those operators alone at the step's shapes, with the device
time of its own memsets and of its kernels, per call: if a memset costs ~1 us, the table's figure is not memset
work and there is nothing to win by avoiding them.

    python benchmarks/memsets.py --out memsets.json
    python benchmarks/memsets.py --device cpu --tokens 64 --iters 1   # smoke test (no device events on a CPU)
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

# The ablation generator's (DiT-B/2) linears, input -> output width; 256 samples x 272 tokens per class chunk.
LINEARS = {"x_embedder": (16, 768), "qkv": (768, 2304), "proj": (768, 768), "w1 / w3": (768, 2048), "w2": (2048, 768)}


def device_us(fn, iters: int, device: torch.device) -> dict[str, float]:
    """Per call of fn: memsets launched, their device us, the other kernels' device us, and the kernels' names."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        sync()
    memsets, memset_us, kernel_us, names = 0, 0.0, 0.0, []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if "memset" in e.name.lower():
            memsets, memset_us = memsets + 1, memset_us + e.device_time
        else:
            kernel_us += e.device_time
            names += [e.name[:70]] if e.name[:70] not in names else []
    return {"memsets": memsets / iters, "memset_us": memset_us / iters, "kernel_us": kernel_us / iters,
            "kernels": names[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=256, help="samples per class chunk (4 classes x 64)")
    p.add_argument("--tokens", type=int, default=272, help="tokens per sample (16 in-context + 256 patches)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    for name in ("samples", "tokens", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    device = torch.device(args.device)
    dtype = torch.bfloat16
    torch.backends.cudnn.benchmark = True
    rows = {}

    m = args.samples * args.tokens
    for name, (k, n) in LINEARS.items():
        x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        b, g = torch.randn(n, device=device, dtype=dtype), torch.randn(m, n, device=device, dtype=dtype)
        rows[f"linear {name} {k}->{n}, forward (addmm)"] = device_us(lambda: torch.addmm(b, x, w.t()), args.iters,
                                                                     device)
        rows[f"linear {name} {k}->{n}, backward (two mm)"] = device_us(lambda: (g.t() @ x, g @ w), args.iters, device)

    for c_in in (4, 8):  # the MAE's first convolution sees 4-channel latents; 8 shows the padding's cost
        x = torch.randn(args.samples, c_in, 32, 32, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.randn(256, c_in, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        rows[f"conv 3x3, {c_in} -> 256 channels, 32x32, forward"] = device_us(lambda: F.conv2d(x, w, padding=1),
                                                                              args.iters, device)

    q = torch.randn(args.samples, 12, args.tokens, 64, device=device, dtype=dtype)
    rows["attention forward (SDPA), 12 heads of 64"] = device_us(lambda: F.scaled_dot_product_attention(q, q, q),
                                                                 args.iters, device)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{card}, {args.samples} samples x {args.tokens} tokens, bf16; per call:")
    print(f"{'operator':58s} {'memsets':>8s} {'memset us':>10s} {'kernels us':>11s}  kernels")
    for name, r in rows.items():
        kernels = ", ".join(r["kernels"])
        print(f"{name:58s} {r['memsets']:8.1f} {r['memset_us']:10.1f} {r['kernel_us']:11.1f}  {kernels}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "samples": args.samples, "tokens": args.tokens,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
