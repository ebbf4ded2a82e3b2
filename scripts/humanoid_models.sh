#!/usr/bin/env bash
# The humanoid transformer and the paper's two ablations at one budget, then 100-step predictions against the
# shipped ensemble on the same held-out starts (issue: humanoid predictions that hold):
#   scripts/humanoid_models.sh [MAX_WINDOWS]      (default 1M windows; TRAIN_DEVICE=cuda on a GPU)
# runs/humanoid-main     configs/humanoid.toml with the CPU recipe (no dropout, the window budget the cosine follows)
# runs/humanoid-markov   the same with data.sequence_length = 2: each next state sees the latest transition only
# runs/humanoid-partial  the same with data.obs_dims = "0:22": joint positions only, the 23 velocities hidden
# runs/humanoid-predict  trajformer predict with --baseline pretrained/models/humanoid-ensemble and both ablations
# Each training is resumable: run the script again after an interruption. On one CPU core a humanoid window
# (4 transitions, 255 tokens) trains at ~60-80 windows/s, so 1M windows is ~4 h per model; a GPU takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS=${1:-1000000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
trajformer collect --preset humanoid-medium --steps 200000 --num-envs 8   # ~2 min once, then cached
train() {  # NAME, then extra --set overrides
  local out=runs/humanoid-$1; shift
  local resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)  # a finished run resumes to no steps
  trajformer train configs/humanoid.toml --out "$out" "${resume[@]}" --set model.dropout=0.0 \
    --set train.max_steps=0 --set train.max_windows="$WINDOWS" --set train.num_threads="$OMP_NUM_THREADS" \
    --set train.device="${TRAIN_DEVICE:-cpu}" "$@"
}
train main
train markov --set data.sequence_length=2
train partial --set 'data.obs_dims="0:22"'
rm -rf runs/humanoid-predict
trajformer predict runs/humanoid-main --dataset pretrained/data/humanoid-heldout.npz \
  --baseline pretrained/models/humanoid-ensemble --ablation markovian=runs/humanoid-markov \
  --ablation partial=runs/humanoid-partial --out runs/humanoid-predict
