#!/usr/bin/env bash
# Reproduces pretrained/models/humanoid-tt: the Trajectory Transformer of the long-horizon comparison.
# Resumable: run it again after an interruption and it continues from the last checkpoint
# (configs/humanoid.toml: 4 x 4 x 128, windows of 4 transitions, batch 64; ~1-5 s per step on 2 cores).
# The shipped model: batch 32, 1500 steps (~48k windows, a quarter of an epoch): what one session's spare core
# could give it. MAX_STEPS=20000 with the config's batch 64 is the run to make with more compute.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
trajformer collect --preset humanoid-medium --steps 200000 --num-envs 8   # ~3 min once, then cached
RESUME=""; [ -f runs/humanoid/checkpoint.pt ] && RESUME="--resume"
trajformer train configs/humanoid.toml --out runs/humanoid $RESUME --set train.num_threads=1 \
  --set train.batch_size=32 --set train.max_steps=${MAX_STEPS:-1500}
mkdir -p pretrained/models/humanoid-tt
for f in model.pt config.toml run.json discretizer.npz metrics.jsonl loss.png; do
  cp runs/humanoid/$f pretrained/models/humanoid-tt/
done
