#!/usr/bin/env bash
# Sequence length and depth for the humanoid transformer, chosen at a small budget before the long run (issue:
# humanoid predictions that hold). Three runs of configs/humanoid.toml with the CPU recipe and the same number of
# target tokens (~30.6M): windows of 4 transitions x 120k, of 8 transitions x 60k, and 4 transitions x 120k with
# 6 layers instead of 4. Each then predicts 100 steps on the shipped held-out starts (teacher-forced with the true
# actions, the ensemble beside them); the sweep table (pretrained/README.md, "The humanoid models") compares validation loss per token type and the
# step-100 error. Arms: name, transitions per window, windows, layers.
#   scripts/humanoid_sweep.sh          (resumable: run it again after an interruption)
# Measured 2026-11-30, each run on one niced core of the 2-core CPU beside other jobs: 36.6 min (4 transitions)
# and 48.6 min (8) of training, 6 layers ~45 min on a less loaded core; then ~3-5 min of prediction each.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
trajformer collect --preset humanoid-medium --steps 200000 --num-envs 8   # ~2 min once, then cached
for arm in "s4 4 120000 4" "s8 8 60000 4" "s4-l6 4 120000 6"; do
  set -- $arm
  out=runs/hsweep-$1; shift
  resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  trajformer train configs/humanoid.toml --out "$out" "${resume[@]}" \
    --set train.max_windows="$2" --set data.sequence_length="$1" \
    --set model.n_layer="$3" --set train.num_threads="$OMP_NUM_THREADS"
  trajformer predict "$out" --dataset pretrained/data/humanoid-heldout.npz \
    --baseline pretrained/models/humanoid-ensemble --horizon 100 --starts 8 --samples 4 --no-render \
    --out "$out/predict"
done
