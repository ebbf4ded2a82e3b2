#!/usr/bin/env bash
# Second training seeds for the README's "TT beside the model-based family" table, on the comparison's own split
# (data.split_seed=0): TT seed N (the shipped model's recipe: 1M windows, ~95 min on one shared core) evaluated on
# the comparison's protocol (5 episodes, seeds 0-4, beam 32, horizon 5), and IQL seed N (300k steps, ~90 min).
# Records go to pretrained/compare/hopper-medium/seeds/ (with the shipped seed-0 model planned on the same protocol
# by this checkout: tt-seed0-plan.json). Resumable: run it again after an interruption.
#   scripts/compare_hopper_seeds.sh [N]   (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
trajformer collect --preset hopper-medium
RUN=runs/hopper-medium-seed$SEED
RESUME=(); [ -f "$RUN/checkpoint.pt" ] && RESUME=(--resume)
trajformer train configs/hopper-medium-local.toml --out "$RUN" "${RESUME[@]}" \
  --set train.max_windows=1000000 --set train.eval_every=1562 --set train.eval_windows=4096 \
  --set train.num_threads="$OMP_NUM_THREADS" --set train.seed="$SEED" --set data.split_seed=0
trajformer eval "$RUN" --episodes 5 --num-envs 5 --settings 32x5 --set plan.num_threads="$OMP_NUM_THREADS"
[ -f "runs/hopper-iql-seed$SEED/iql.json" ] || trajformer iql configs/hopper-medium-local.toml --steps 300000 \
  --hp seed="$SEED" --episodes 5 --num-envs 5 --out "runs/hopper-iql-seed$SEED" --set train.num_threads="$OMP_NUM_THREADS"
OUT=pretrained/compare/hopper-medium/seeds
mkdir -p "$OUT"
# The shipped (seed-0) model on the same protocol with this checkout's planner, for a like-for-like pair.
[ -f "$OUT/tt-seed0-plan.json" ] || trajformer plan hopper-medium --episodes 5 --num-envs 5 --set plan.beam_width=32 \
  --set plan.horizon=5 --set plan.num_threads="$OMP_NUM_THREADS" --json "$OUT/tt-seed0-plan.json"
# ... and with the comparison's IQL critic (runs/hopper-compare/iql from scripts/compare_hopper.sh).
[ -f "$OUT/tt-critic-seed0-plan.json" ] || trajformer plan hopper-medium --episodes 5 --num-envs 5 \
  --set plan.beam_width=32 --set plan.horizon=5 --set plan.objective=critic --set plan.critic=runs/hopper-compare/iql \
  --set plan.num_threads="$OMP_NUM_THREADS" --json "$OUT/tt-critic-seed0-plan.json"
cp "$RUN/eval.json" "$OUT/tt-seed$SEED-eval.json"
cp "$RUN/run.json" "$OUT/tt-seed$SEED-run.json"
cp "runs/hopper-iql-seed$SEED/iql.json" "$OUT/iql-seed$SEED.json"
