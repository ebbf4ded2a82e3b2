#!/usr/bin/env bash
# Reproduces pretrained/models/hopper-medium: the Hopper model the quickstart plans with.
# The CPU recipe (README "Training budget") on the 1M-transition preset: 4 x 4 x 128, windows of 5 transitions,
# no dropout, batch 64, bf16 where the CPU has it, 1M sampled windows (about 90 min on one shared core of a
# 2-core CPU). It is runs/curves/drop0-1m of scripts/learning_curves.sh, with the cheap planner setting recorded.
# Resumable: run it again after an interruption and it continues from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
trajformer collect --preset hopper-medium   # 1M transitions, cached after the first run (~4 min)
RESUME=(); [ -f runs/hopper-medium/checkpoint.pt ] && RESUME=(--resume)
trajformer train configs/hopper-medium-local.toml --out runs/hopper-medium "${RESUME[@]}" \
  --set train.max_windows=1000000 --set train.eval_every=1562 --set train.eval_windows=4096 \
  --set train.num_threads=1 --set plan.beam_width=32 --set plan.horizon=5
trajformer plan runs/hopper-medium --episodes 5 --num-envs 5 --set plan.num_threads=1 --json runs/hopper-medium/plan-32x5.json
mkdir -p pretrained/models/hopper-medium
for f in model.pt config.toml run.json discretizer.npz metrics.jsonl loss.png plan-32x5.json; do
  cp runs/hopper-medium/$f pretrained/models/hopper-medium/
done
