#!/usr/bin/env bash
# Reproduces pretrained/models/humanoid-tt: the Trajectory Transformer of the long-horizon comparison.
# Resumable: run it again after an interruption and it continues from the last checkpoint
# (configs/humanoid.toml: 4 x 4 x 128, windows of 4 transitions, batch 64; ~1-5 s per step on 2 cores).
# MAX_STEPS caps this run (default: the config's 20000); the shipped model's step count is in its metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
trajformer collect --preset humanoid-medium --steps 200000 --num-envs 8   # ~3 min once, then cached
RESUME=""; [ -f runs/humanoid/checkpoint.pt ] && RESUME="--resume"
trajformer train configs/humanoid.toml --out runs/humanoid $RESUME --set train.num_threads=1 \
  ${MAX_STEPS:+--set train.max_steps=$MAX_STEPS}
mkdir -p pretrained/models/humanoid-tt
for f in model.pt config.toml run.json discretizer.npz metrics.jsonl loss.png; do
  cp runs/humanoid/$f pretrained/models/humanoid-tt/
done
