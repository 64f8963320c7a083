"""Try block sizes and warp counts of the fused drifting-loss kernel on one key size (CUDA only).

    python benchmarks/tune_drift_kernel.py --key 32x32
"""

from __future__ import annotations

import argparse

import torch

from drift_loss import KEYS, TEMPERATURES, floor_ms, make_inputs
from drifting.kernels.drift_triton import fused_drift_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", default="32x32", choices=list(KEYS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--block-s", default="32,64,128")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--stages", default="1,2")
    args = parser.parse_args()
    locations, s = KEYS[args.key]
    gen, pos, neg, w = make_inputs(locations, s, "cuda")
    print(f"key {args.key}: floor {floor_ms(locations, s):.2f} ms")
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    grid = [(bs, w, st) for bs in ints(args.block_s) for w in ints(args.warps) for st in ints(args.stages)]
    for block_s, warps, stages in grid:
        if True:
            def step():
                gen.grad = None
                loss, _ = fused_drift_loss(
                    gen, pos, neg, temperatures=TEMPERATURES, gen_weight=None, pos_weight=None, neg_weight=w,
                    normalize="xy", affinity_floor=1e-6, self_mask=100.0, attraction=1.0, repulsion=1.0,
                    all_reduce=None, stats=None, block_s=block_s, num_warps=warps, num_stages=stages)
                loss.mean().backward()

            try:
                step()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.repeat):
                    step()
                end.record()
                torch.cuda.synchronize()
                print(f"block_s {block_s:>4} warps {warps:>2} stages {stages}: "
                      f"{start.elapsed_time(end) / args.repeat:8.2f} ms")
            except Exception as err:  # out of resources for a configuration: report it and go on
                print(f"block_s {block_s:>4} warps {warps:>2} stages {stages}: failed ({type(err).__name__})")


if __name__ == "__main__":
    main()
