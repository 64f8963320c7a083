"""How the precision of the force's coefficients moves drift_ms, on the 32x32 key's problems (CPU, float64).

The CUDA kernel computes each field F = C Y on tensor cores: the coefficients C (fp32, the self-term folded into the
diagonal) are rounded to a 16-bit type, the targets Y are the bf16 inputs, and the products accumulate in fp32.
Here the same F is computed in float64 with C rounded as a kernel would round it, and drift_ms (the mean of F^2 per
temperature, which sets the loss's drift scale) is compared with the unrounded one:
- `bf16 hi+lo`: C split into bf16 high and low parts, two products (today's kernel, ~16 bits);
- `bf16`: the high part alone (the timing-only build `no_lo_pass2` of drift_cuda_whatif.py);
- `fp16`: C rounded to fp16 (11 bits), the targets converted to fp16 too, each problem at a power-of-two scale.
The accumulation in fp32 is left out: it is common to all three.

    python benchmarks/force_precision.py --problems 256 --offset 0 3 --out force_precision.json

--offset adds a constant to every feature of the problems (all rows, all coordinates): features with a large common
mean make |y| large against |y - x|, which the rounding errors of C Y scale with.
"""

from __future__ import annotations

import argparse
import json

import torch

from drifting.drift import CODE_AFFINITY_FLOOR, CODE_SELF_MASK, affinity, pairwise_distance

TEMPERATURES = (0.02, 0.05, 0.2)
C_G, C_P, C_N, S = 64, 64, 16, 256  # the 32x32 key's problems
ROUNDINGS = ("bf16 hi+lo", "bf16", "fp16")


def problems(b: int, offset: float, seed: int = 0):
    """b problems like benchmarks/drift_cuda_builds.py's (bf16 values, weights on the unconditional rows), in float64:
    x [b, C_g, S], targets [b, T, S] (generated, unconditional, positive), weights [b, T]."""
    g = torch.Generator().manual_seed(seed)
    gen = (torch.randn(b, C_G, S, generator=g) + offset).bfloat16().double()
    pos = (torch.randn(b, C_P, S, generator=g) + 0.2 + offset).bfloat16().double()
    neg = (torch.randn(b, C_N, S, generator=g) + offset).bfloat16().double()
    neg_weight = torch.rand(b, C_N, generator=g).double() * 4
    targets = torch.cat([gen, neg, pos], dim=1)
    weights = torch.cat([torch.ones(b, C_G, dtype=torch.float64), neg_weight, torch.ones(b, C_P, dtype=torch.float64)],
                        dim=1)
    return gen, targets, weights


def coefficients(x, targets, weights, temperatures=TEMPERATURES, floor=CODE_AFFINITY_FLOOR, self_mask=CODE_SELF_MASK):
    """Per temperature the [b, C_g, T] coefficients C of F = C Y, the self-term -rowsum(coef) x folded into the
    diagonal (as the CUDA kernel does), from the reference's affinities (the `drift_loss` defaults otherwise)."""
    dist = pairwise_distance(x, targets)
    scale = (dist * weights[:, None, :]).sum() / (weights.sum() * x.shape[1])  # one scale over the call
    n, t = x.shape[1], targets.shape[1]
    normalized = dist / scale + torch.eye(n, t, dtype=x.dtype) * self_mask
    num_neg = C_G + C_N
    out = []
    for tau in temperatures:
        a = affinity(-normalized / tau, "xy", floor) * weights[:, None, :]
        a_neg, a_pos = a[..., :num_neg], a[..., num_neg:]
        coef = torch.cat([-a_neg * a_pos.sum(-1, keepdim=True), a_pos * a_neg.sum(-1, keepdim=True)], dim=-1)
        coef = coef.float().double()  # the kernel's coefficients are fp32
        coef[:, torch.arange(n), torch.arange(n)] -= coef.sum(-1)
        out.append(coef.float().double())
    return out


def rounded(coef, how: str):
    """C as a kernel's products see it (float64 values)."""
    if how == "bf16 hi+lo":
        hi = coef.bfloat16().double()
        return hi + (coef - hi).bfloat16().double()
    if how == "bf16":
        return coef.bfloat16().double()
    if how == "fp16":
        return coef.half().double()
    raise ValueError(f"rounding {how!r}: expected one of {', '.join(ROUNDINGS)}")


def fp16_targets(targets):
    """The targets as fp16 products would see them: each problem scaled by the power of two that puts its largest
    value in [2^14, 2^15), rounded to fp16, scaled back (exact but for values more than ~2^28 below the largest)."""
    largest = targets.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    scale = torch.exp2(14 - torch.floor(torch.log2(largest)))
    return (targets * scale).half().double() / scale


def study(b: int, offset: float) -> dict:
    """drift_ms per temperature, exact and its relative error under each rounding; the median of |y| / |y - x|; and
    the largest change that fp16 makes to a target value, relative to the problem's largest."""
    x, targets, weights = problems(b, offset)
    y_half = fp16_targets(targets)
    result = {"problems": b, "offset": offset, "drift_ms": [], "relative_error": {how: [] for how in ROUNDINGS},
              "per_problem_error": {how: [] for how in ROUNDINGS},
              "fp16_target_change": ((y_half - targets).abs().amax() / targets.abs().amax()).item()}
    for coef in coefficients(x, targets, weights):
        exact = (coef @ targets).square().sum(dim=(1, 2))  # per problem, as pass 2 writes them
        result["drift_ms"].append(exact.mean().item() / (C_G * S))
        for how in ROUNDINGS:
            sums = (rounded(coef, how) @ (y_half if how == "fp16" else targets)).square().sum(dim=(1, 2))
            result["relative_error"][how].append(((sums.sum() - exact.sum()) / exact.sum()).item())
            # drift_cuda_builds.py's measure of pass 2's outputs: the largest difference over the largest value
            result["per_problem_error"][how].append(((sums - exact).abs().max() / exact.abs().max()).item())
    few = slice(0, min(b, 8))
    ratio = targets[few].norm(dim=-1)[:, None, :] / pairwise_distance(x[few], targets[few]).clamp_min(1e-12)
    result["norm_ratio_median"] = ratio.median().item()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=256, help="problems of the 32x32 key's shape")
    parser.add_argument("--offset", type=float, nargs="+", default=[0.0], help="constants added to every feature")
    parser.add_argument("--out", help="a JSON file for the results")
    args = parser.parse_args(argv)
    if args.problems < 1:
        parser.error(f"--problems: expected a positive integer, got {args.problems}")
    results = [study(args.problems, offset) for offset in args.offset]
    print(f"drift_ms: relative error by the coefficients' rounding; per problem: the largest error of a problem's sum "
          f"of F^2 over the largest sum. {args.problems} problems of the 32x32 key, temperatures "
          f"{', '.join(map(str, TEMPERATURES))}")
    for r in results:
        print(f"offset {r['offset']:g} (median |y| / |y - x| {r['norm_ratio_median']:.2f}):")
        for how in ROUNDINGS:
            print(f"  {how:11s} drift_ms" + "".join(f" {e:+.2e}" for e in r["relative_error"][how])
                  + "   per problem" + "".join(f" {e:.2e}" for e in r["per_problem_error"][how]))
        print(f"  (fp16 changed a target value by at most {r['fp16_target_change']:.1e} of the largest)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
