#!/usr/bin/env bash
# Issue 7, feature sets (a,b) / (a-c) at CPU scale (docs/results.md): the step-1,000 checkpoint of the raw-pixel run
# runs/cpu_mnist_floor0 continued for 60 steps with the MAE keys, as runs/cont_mae (the (a-d) run of the CPU Table 3
# section, whose config.yaml this reuses) but with fewer keys per tap. Needs those two runs; ~15 min per set on 2 cores.
set -eu
export PYTHONPATH=$PWD
for s in a,b a-c; do
  r=runs/cont_feat_$s
  mkdir -p $r/checkpoints; cp runs/cpu_mnist_floor0/checkpoints/ckpt-000001000.pt $r/checkpoints/
  python3 -m drifting train --preset runs/cont_mae/config.yaml --out $r loss.subset=$s train.steps=1060 --no-progress
  python3 - $r <<'PY'
import sys, torch
from drifting.train.checkpoint import export_weights
r = sys.argv[1]
s = torch.load(f"{r}/checkpoints/ckpt-000001060.pt", map_location="cpu", weights_only=False)
meta = torch.load("runs/cont_mae/model1060.pt", map_location="cpu", weights_only=False)["meta"]
export_weights(f"{r}/model1060.pt", s["model"], s["config"], meta=meta)
PY
  python3 -m drifting eval --evaluator mnist --data .data/mnist.npz --ema $r/model1060.pt --alphas 1,3 --num-per-class 300 --out $r/model1060_eval
done
