#!/usr/bin/env bash
# Issue 7, part 2: the trends of the paper's ablations, as short runs of equal budget (same steps, same generated
# batch) on one small dataset. Each ablation changes one setting of configs/gen/$PRESET.yaml; every run is scored at
# alpha = 1 and 1.5 in the evaluator's features. One GPU; each run resumes when the script is run again.
#
#   ENCODER=runs/small_scale/mnist/mae/encoder.pt bash scripts/ablations.sh            # all of them, MNIST
#   ENCODER=... bash scripts/ablations.sh antisymmetry normalization                  # some of them
#   PRESET=cifar10 DATASET=cifar10 DATA=../shared/data/cifar10_jpeg.npz ENC=mae_cifar ENCODER=... bash ...
#   ENCODER=none PRESET=mnist_cpu STEPS=1000 bash scripts/ablations.sh temperatures   # raw pixels only, CPU scale
#   GPUS=4 ENCODER=... bash scripts/ablations.sh normalization temperatures            # 4 runs at a time, one per GPU
set -euo pipefail
preset=${PRESET:-mnist}; dataset=${DATASET:-mnist}; data=${DATA:-../shared/data/mnist.npz}
enc=${ENC:-mae_mnist}; encoder=${ENCODER:?ENCODER=<the encoder.pt of drifting train-mae>, or none for raw pixels}
steps=${STEPS:-1500}; runs=${RUNS:-runs/ablations/$preset}
base=(data.path="$data" train.steps=$steps train.sample_every=0 train.checkpoint_every=500)
# the raw key alone for the first ENCODER_START steps (the small-scale collapse at the zero-output start, results.md)
with_encoder=(loss.encoder=$enc loss.encoder_weights="$encoder" loss.encoder_start_step=${ENCODER_START:-300})
[ "$encoder" = none ] && with_encoder=()

train_and_score() {  # NAME OVERRIDES...: train, then score alpha 1 and 1.5
  local name=$1; shift
  drifting train --preset "gen/$preset" --out "$runs/$name" --no-progress "${base[@]}" "$@"
  drifting eval --evaluator $dataset --data "$data" --ema "$runs/$name/ema.pt" --alphas 1,1.5 \
      --num-per-class 500 --out "$runs/$name/eval"
}
# GPUS=N: queue the runs and train them N at a time, one per GPU (run i on GPU i mod N, each GPU's runs in order,
# logs in $runs/<name>.log); otherwise one after another on the default device.
gpus=${GPUS:-0}
queue=()
run() {
  if [ "$gpus" -gt 0 ]; then queue+=("$(printf '%q ' "$@")"); else train_and_score "$@"; fi
}

antisymmetry() {  # Table 1: V+ - V- against scaled attraction or repulsion, and attraction only
  run as_base "${with_encoder[@]}"
  run as_att1.5 "${with_encoder[@]}" loss.attraction=1.5
  run as_rep1.5 "${with_encoder[@]}" loss.repulsion=1.5
  run as_att2 "${with_encoder[@]}" loss.attraction=2.0
  run as_rep2 "${with_encoder[@]}" loss.repulsion=2.0
  run as_att_only "${with_encoder[@]}" loss.repulsion=0.0
}
allocation() {  # Table 2: N_pos per class, then N_c against N_neg = C_g at a fixed generated batch N_c * C_g = 640
  for p in 1 16 32 64; do run pos$p "${with_encoder[@]}" train.pos_per_class=$p; done
  run alloc_c10_g64 "${with_encoder[@]}" train.classes=10 train.gen_per_class=64  # the preset
  run alloc_c5_g128 "${with_encoder[@]}" train.classes=5 train.gen_per_class=128
  run alloc_c2_g320 "${with_encoder[@]}" train.classes=2 train.gen_per_class=320
}
encoder() {  # Table 3: no feature encoder (raw pixels only), the small MAE, a wider MAE (ENCODER_WIDE: its encoder.pt,
           # e.g. of drifting train-mae --preset mae/mnist model.width=64; the width is read from the file)
  run enc_none
  [ "$encoder" = none ] || run enc_small "${with_encoder[@]}"
  if [ -n "${ENCODER_WIDE:-}" ]; then
    run enc_wide loss.encoder=${ENC_WIDE:-$enc} loss.encoder_weights="$ENCODER_WIDE" \
        loss.encoder_start_step=${ENCODER_START:-300}
  fi
}
normalization() {  # Table 11: kernel normalisation over both axes, over targets only, none
  for n in xy y none; do run norm_$n "${with_encoder[@]}" loss.normalize=$n; done
}
temperatures() {  # one temperature against the three
  run tau_multi "${with_encoder[@]}"
  for t in 0.02 0.05 0.2; do run tau_$t "${with_encoder[@]}" "loss.temperatures=[$t]"; done
}
features() {  # feature sets (a,b) / (a-c) / (a-d)
  for s in a,b a-c a-d; do run feat_$s "${with_encoder[@]}" loss.subset=$s; done
}

todo=("$@"); [ ${#todo[@]} -gt 0 ] || todo=(antisymmetry allocation encoder normalization temperatures features)
for a in "${todo[@]}"; do "$a"; done
if [ "$gpus" -gt 0 ]; then
  mkdir -p "$runs"
  for ((g = 0; g < gpus; g++)); do
    (for ((i = g; i < ${#queue[@]}; i += gpus)); do
       eval "set -- ${queue[i]}"
       CUDA_VISIBLE_DEVICES=$g train_and_score "$@" > "$runs/$1.log" 2>&1 || echo "run $1 failed: $runs/$1.log" >&2
     done) &
  done
  wait
fi
python - "$runs" <<'PY'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/eval/sweep.json")):
    for r in json.loads(f.read_text()):
        rows.append((f.parts[-3], r["alpha"], {k: r[k] for k in ("fd", "accuracy", "precision", "recall", "is")}))
for name, alpha, m in rows:
    print(f"{name:<16} alpha {alpha:<4} " + "  ".join(f"{k} {v:.4g}" for k, v in m.items()))
PY
