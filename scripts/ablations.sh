#!/usr/bin/env bash
# Issue 7, part 2: the trends of the paper's ablations, as short runs of equal budget (same steps, same generated
# batch) on one small dataset. Each ablation changes one setting of configs/gen/$PRESET.yaml; every run is scored at
# alpha = 1, 1.5 and 3 (ALPHAS) in the evaluator's features. Each run resumes when the script is run again.
#
#   ENCODER=runs/small_scale/mnist/mae/encoder.pt bash scripts/ablations.sh            # all of them, MNIST
#   ENCODER=... bash scripts/ablations.sh antisymmetry normalization                  # some of them
#   PRESET=cifar10 DATASET=cifar10 DATA=../shared/data/cifar10_jpeg.npz ENC=mae_cifar ENCODER=... bash ...
#   ENCODER=none PRESET=mnist_cpu STEPS=1000 bash scripts/ablations.sh temperatures   # raw pixels only, CPU scale
#   GPUS=4 ENCODER=... bash scripts/ablations.sh normalization temperatures            # 4 runs at a time, one per GPU
#   LANES="0 0 0 1 1 1" ENCODER=none bash scripts/ablations.sh seeds allocation        # 3 runs at a time on each GPU
#     (gen/mnist: 4-5 runs share an H200 of 140 GiB at 0.5-0.8 s/step each against 0.25 s alone; 9 ran out of memory)
#
# The preset's own run is trained once and shared by the ablations that compare against it: "base" (raw pixels) or,
# with an encoder, "base_mae"; `seeds` trains it again with seeds 1 and 2, the noise that differences must exceed.
set -euo pipefail
preset=${PRESET:-mnist}; dataset=${DATASET:-mnist}; data=${DATA:-../shared/data/mnist.npz}
enc=${ENC:-mae_mnist}; encoder=${ENCODER:?ENCODER=<the encoder.pt of drifting train-mae>, or none for raw pixels}
steps=${STEPS:-1500}; runs=${RUNS:-runs/ablations/$preset}
base=(data.path="$data" train.steps=$steps train.sample_every=0 train.checkpoint_every=${CKPT_EVERY:-500})
# the raw key alone for the first ENCODER_START steps (the small-scale collapse at the zero-output start, results.md)
with_encoder=(loss.encoder=$enc loss.encoder_weights="$encoder" loss.encoder_start_step=${ENCODER_START:-300})
[ "$encoder" = none ] && with_encoder=()

train_and_score() {  # NAME OVERRIDES...: train (or resume), then score unless scored already
  local name=$1; shift
  [ -f "$runs/$name/eval/sweep.json" ] && return 0
  drifting train --preset "gen/$preset" --out "$runs/$name" --no-progress "${base[@]}" "$@"
  drifting eval --evaluator $dataset --data "$data" --ema "$runs/$name/ema.pt" --alphas "${ALPHAS:-1,1.5,3}" \
      --num-per-class 500 --out "$runs/$name/eval"
}
# LANES="g0 g1 ...": queue the runs and train them one lane at a time per entry, the lane on that GPU (run i in lane
# i mod #lanes, each lane's runs in order, logs in $runs/<name>.log); small models leave a GPU idle between kernel
# launches, so several lanes may share one. GPUS=N is LANES="0 1 ... N-1". Neither: one run after another.
lanes=(${LANES:-}); [ ${#lanes[@]} -gt 0 ] || [ "${GPUS:-0}" -eq 0 ] || lanes=($(seq 0 $((GPUS - 1))))
queue=()
declare -A seen
run() {  # NAME OVERRIDES...: each name once, however many ablations ask for it
  [ -n "${seen[$1]:-}" ] && return 0
  seen[$1]=1
  if [ ${#lanes[@]} -gt 0 ]; then queue+=("$(printf '%q ' "$@")"); else train_and_score "$@"; fi
}
base_name=base; [ "$encoder" = none ] || base_name=base_mae
preset_run() { run $base_name "${with_encoder[@]}"; }

seeds() {  # the preset again with two more seeds: how far one run's score moves by chance
  preset_run
  for s in 1 2; do run ${base_name}_seed$s "${with_encoder[@]}" train.seed=$s; done
}

antisymmetry() {  # Table 1: V+ - V- against scaled attraction or repulsion, and attraction only
  preset_run
  run as_att1.5 "${with_encoder[@]}" loss.attraction=1.5
  run as_rep1.5 "${with_encoder[@]}" loss.repulsion=1.5
  run as_att2 "${with_encoder[@]}" loss.attraction=2.0
  run as_rep2 "${with_encoder[@]}" loss.repulsion=2.0
  run as_att_only "${with_encoder[@]}" loss.repulsion=0.0
}
allocation() {  # Table 2: N_pos per class, then N_c against N_neg = C_g at a fixed generated batch N_c * C_g = 640
  preset_run  # 64 positives, 10 classes x 64 generated
  for p in 1 16 32; do run pos$p "${with_encoder[@]}" train.pos_per_class=$p; done
  run alloc_c5_g128 "${with_encoder[@]}" train.classes=5 train.gen_per_class=128
  run alloc_c2_g320 "${with_encoder[@]}" train.classes=2 train.gen_per_class=320
}
encoder() {  # Table 3: no feature encoder (raw pixels only), the small MAE, a wider MAE (ENCODER_WIDE: its encoder.pt,
           # e.g. of drifting train-mae --preset mae/mnist model.width=64; the width is read from the file)
  run base  # raw pixels only
  [ "$encoder" = none ] || preset_run  # + the small MAE
  if [ -n "${ENCODER_WIDE:-}" ]; then
    run enc_wide loss.encoder=${ENC_WIDE:-$enc} loss.encoder_weights="$ENCODER_WIDE" \
        loss.encoder_start_step=${ENCODER_START:-300}
  fi
}
normalization() {  # Table 11: kernel normalisation over both axes, over targets only, none
  preset_run  # softmax over both axes
  for n in y none; do run norm_$n "${with_encoder[@]}" loss.normalize=$n; done
}
temperatures() {  # one temperature against the three
  preset_run  # 0.02, 0.05, 0.2
  for t in 0.02 0.05 0.2; do run tau_$t "${with_encoder[@]}" "loss.temperatures=[$t]"; done
}
features() {  # feature sets (a,b) / (a-c) / (a-d)
  for s in a,b a-c; do run feat_$s "${with_encoder[@]}" loss.subset=$s; done
  preset_run  # a-d
}

todo=("$@"); [ ${#todo[@]} -gt 0 ] || todo=(seeds antisymmetry allocation encoder normalization temperatures features)
for a in "${todo[@]}"; do "$a"; done
if [ ${#lanes[@]} -gt 0 ]; then
  mkdir -p "$runs"
  for ((l = 0; l < ${#lanes[@]}; l++)); do
    (for ((i = l; i < ${#queue[@]}; i += ${#lanes[@]})); do
       eval "set -- ${queue[i]}"
       CUDA_VISIBLE_DEVICES=${lanes[l]} train_and_score "$@" >> "$runs/$1.log" 2>&1 || echo "run $1 failed: $runs/$1.log" >&2
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
