#!/usr/bin/env bash
# Reproduces pretrained/models/hopper-medium: the Hopper model the quickstart plans with.
# Resumable: run it again after an interruption and it continues from the last checkpoint.
# About 40 min on one core of a 2-core CPU (2000 steps of 64 windows of 5 transitions).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
trajformer collect --preset hopper-medium --steps 100000   # cached after the first run
RESUME=""; [ -f runs/hopper-medium/checkpoint.pt ] && RESUME="--resume"
trajformer train configs/hopper-medium-local.toml --out runs/hopper-medium $RESUME \
  --set data.sequence_length=5 --set train.batch_size=64 --set train.max_steps=2000 \
  --set train.eval_every=250 --set train.eval_windows=1024 --set train.checkpoint_every=250 \
  --set train.num_threads=1 --set plan.beam_width=32 --set plan.horizon=5
mkdir -p pretrained/models/hopper-medium
for f in model.pt config.toml run.json discretizer.npz metrics.jsonl loss.png; do
  cp runs/hopper-medium/$f pretrained/models/hopper-medium/
done
