"""How far apart the generators of two training runs are: the check that N processes make the same update as one.

    drifting train --preset gen/debug --out runs/one train.steps=5 train.checkpoint_every=1
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=4 -m drifting train --preset gen/debug --out runs/four \
        train.steps=5 train.checkpoint_every=1
    python benchmarks/compare_runs.py runs/one runs/four

The trainer splits each step's classes over the processes and all-reduces the drifting loss's global statistics, so
the update does not depend on the number of processes up to the order of floating-point sums (tests/test_train_gen.py
checks this with gloo on a CPU). On GPUs with NCCL the sums are ordered differently, so the report gives, per
parameter tensor, the largest difference between the two runs' last checkpoints relative to the largest change of that
tensor in the last step of run a (its two newest checkpoints: run with train.checkpoint_every=1). Exit status 1 when
the worst tensor exceeds --rtol.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from drifting.train.checkpoint import list_checkpoints, load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="run directory (its checkpoints/ is read)")
    p.add_argument("b", help="run directory to compare with a")
    p.add_argument("--rtol", type=float, default=1e-3, help="largest accepted relative difference")
    args = p.parse_args()
    found = list_checkpoints(f"{args.a}/checkpoints")
    if len(found) < 2:
        sys.exit(f"a: {args.a}/checkpoints holds {len(found)} checkpoint(s); run it with train.checkpoint_every=1")
    a, before = load_checkpoint(found[-1][1]), load_checkpoint(found[-2][1])["model"]
    b = load_checkpoint(f"{args.b}/checkpoints")
    if a["step"] != b["step"]:
        sys.exit(f"the runs stopped at different steps: {a['step']} and {b['step']}")
    worst, worst_name, rows = 0.0, "", {}
    for name, pa in a["model"].items():
        pb = b["model"][name].float()
        pa = pa.float()
        denom = (pa - before[name].float()).abs().max().item()
        if denom == 0:
            continue  # a tensor the last step did not change
        rel = (pa - pb).abs().max().item() / denom
        rows[name] = rel
        if rel > worst:
            worst, worst_name = rel, name
    print(json.dumps({"step": a["step"], "tensors": len(rows), "worst_relative_difference": worst,
                      "worst_tensor": worst_name, "against": f"the change of step {a['step']} in {args.a}"},
                     indent=1))
    sys.exit(0 if worst <= args.rtol else 1)


if __name__ == "__main__":
    main()
