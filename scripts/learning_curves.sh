#!/usr/bin/env bash
# Learning curves of the CPU recipe on trajformer/ENV-medium-v0 (1M transitions), README "Training budget".
# Each run is resumable: run the script again after an interruption. Runs: NAME WINDOWS [--set ...].
# ENV=hopper (default; runs under runs/curves) or walker2d / halfcheetah (runs under runs/curves-ENV).
#   dtype:   bf16 vs fp32 at 50k windows (official dropout 0.1)
#   dropout: 0.1 vs 0.0 at 250k windows
#   budget:  the chosen recipe at 250k, 1M (and 4M where the compute exists) windows
#   model:   the window model (rotary positions, a band of 5 transitions) on windows of 10 transitions, at the
#            target tokens of drop0-250k (125k windows of 159 targets ~ 250k windows of 79); window-125k-b32
#            also at its optimizer steps (32 windows a step: equal tokens and steps, the fair comparison);
#            drop0-62k and window-31k-b32 (and their -seed1 twins) make the same pair at a quarter of the budget;
#            drop0-250k-seed1 and window-125k-b32-seed1 are the full-budget pair's seed-1 twins
# After training, a hopper run plans 5 episodes (seeds 0-4, beam 32, horizon 5) into NAME/plan-32x5.json; other
# envs' runs take the evaluation protocol at 32/5 over EPISODES (default 10, seeds 0..N-1, batched, resumable)
# into NAME/eval.json, as their shipped models' eval.json.
# Usage: [ENV=walker2d] scripts/learning_curves.sh [RUN_NAME ...]   (default: the dtype, dropout and budget runs
# up to drop0-1m, in ORDER below; name the others; ~1 h per 1M Hopper windows on one core). TRAIN_DEVICE=cuda trains and plans on a GPU (scripts/device_session.sh);
# CURVES_ROOT puts the runs elsewhere; WINDOWS replaces every run's budget (a quick trial).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
ENV=${ENV:-hopper}
ROOT=runs/curves; [ "$ENV" = hopper ] || ROOT=runs/curves-$ENV
ROOT=${CURVES_ROOT:-$ROOT}
DEVICE=${TRAIN_DEVICE:-cpu}
trajformer collect --preset "$ENV-medium" >/dev/null   # cached after the first run
declare -A RUNS=(
  [bf16-50k]="50000 train.dtype=bfloat16 model.dropout=0.1"
  [fp32-50k]="50000 train.dtype=float32 model.dropout=0.1"
  [drop01-250k]="250000 model.dropout=0.1"
  [drop0-250k]="250000 model.dropout=0.0"
  [drop0-1m]="1000000 model.dropout=0.0"
  [drop0-4m]="4000000 model.dropout=0.0"
  [window-125k]="125000 model.dropout=0.0 model.attention=window data.sequence_length=10"
  [window-125k-b32]="125000 model.dropout=0.0 model.attention=window data.sequence_length=10 train.batch_size=32"
  [drop0-62k]="62500 model.dropout=0.0"
  [window-31k-b32]="31250 model.dropout=0.0 model.attention=window data.sequence_length=10 train.batch_size=32"
  [drop0-62k-seed1]="62500 model.dropout=0.0 train.seed=1 data.split_seed=0"
  [window-31k-b32-seed1]="31250 model.dropout=0.0 model.attention=window data.sequence_length=10 train.batch_size=32 train.seed=1 data.split_seed=0"
  [drop0-250k-seed1]="250000 model.dropout=0.0 train.seed=1 data.split_seed=0"
  [window-125k-b32-seed1]="125000 model.dropout=0.0 model.attention=window data.sequence_length=10 train.batch_size=32 train.seed=1 data.split_seed=0"
)
ORDER=(bf16-50k fp32-50k drop01-250k drop0-250k drop0-1m)
for name in "${@:-${ORDER[@]}}"; do
  read -r windows rest <<<"${RUNS[$name]}"
  windows=${WINDOWS:-$windows}  # a tiny trial of the script (scripts/device_session.sh with LOCAL=1)
  sets=(); for kv in $rest; do sets+=(--set "$kv"); done
  out=$ROOT/$name
  resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  batch=64; [[ $rest =~ train.batch_size=([0-9]+) ]] && batch=${BASH_REMATCH[1]}
  eval_every=$(( windows / batch / 10 ))  # ten validations a run
  trajformer train "configs/$ENV-medium-local.toml" --out "$out" "${resume[@]}" \
    --set data.sequence_length=5 --set train.batch_size=64 --set train.max_steps=0 \
    --set train.max_windows="$windows" --set train.eval_every="$eval_every" --set train.eval_windows=4096 \
    --set train.checkpoint_every=500 --set train.num_threads=1 --set train.device="$DEVICE" \
    "${sets[@]}"  # run-specific sets come last
  if [ "$ENV" = hopper ]; then
    [ -f "$out/plan-32x5.json" ] || trajformer plan "$out" --episodes 5 --num-envs 5 --set plan.beam_width=32 \
      --set plan.horizon=5 --set plan.num_threads=1 --set plan.device="$DEVICE" --json "$out/plan-32x5.json"
  else
    [ -f "$out/eval.json" ] || trajformer eval "$out" --episodes "${EPISODES:-10}" --settings 32x5 \
      --set plan.num_threads=1 --set plan.device="$DEVICE"
  fi
done
