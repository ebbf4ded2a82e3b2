#!/usr/bin/env bash
# One call of a lent GPU machine (the `device` tool: one H200, 15 minutes a session), prepared here:
#   1. the CUDA tests (tests skip them without a card): the search on the card gives the CPU's plans;
#   2. benchmarks/plan_speed.py --device cuda (the whole search on the card since 2026-12-01);
#   3. the shipped walker2d-medium at its official 128/15 (bf16, the protocol's 10 episodes) on the card for
#      SECONDS_LEFT seconds, resuming the pretrained/models/walker2d-medium/eval.partial.json the CPU evaluation left
#      (stop that evaluation here first: two processes would go on from the same state). Its eval.partial.json
#      (or eval.json when every episode has ended) comes back under walker2d-medium/: copy it into the model
#      directory and run `trajformer eval pretrained/models/walker2d-medium --episodes 10 --settings official
#      --set plan.dtype=bfloat16` here, which goes on from it (or only writes eval.json).
#      Since 2026-12-07 the CPU has finished it (eval.json holds 128/15), so this step only prints the kept row;
#      it resumes whatever a retrained model's eval.partial.json holds.
# Everything comes back as $OUT/results.tgz.part-* (<= 15 MB each) and $OUT/summary.log.
# Here, before the call: download the wheels of minari, gymnasium, farama-notifications, mujoco, mujoco-core,
# glfw into .whl/ (README of the device tool) and carry .whl; the humanoid modes below also need
# `python scripts/device_pack.py pack trajformer/humanoid-medium-v0 .devdata/humanoid.npz` and .devdata carried.
# LOCAL=1 runs the same steps on this CPU, tiny.
# `scripts/device_session.sh humanoid` trains the humanoid model at configs/humanoid.toml's budget instead, and
# `scripts/device_session.sh ablations` the humanoid ablations (runs/humanoid-markov and runs/humanoid-partial
# of scripts/humanoid_models.sh) at the same 1.28M windows, both at once, for SECONDS_LEFT seconds; an unfinished
# run comes back with its checkpoint, to resume here with --resume.
set -u
OUT=${OUT:-/tmp/device_out}
SECONDS_LEFT=${SECONDS_LEFT:-400}  # wall clock for step 3: with the rest, inside one call's 600 s
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MUJOCO_GL=egl
mkdir -p "$OUT" /tmp/work
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.log"; }
tidy() {  # RUN_DIR EXIT_CODE: a finished run (0) keeps its weights, an unfinished one its resume checkpoint
  rm -f "$1/last.pt"
  if [ "$2" = 0 ]; then rm -f "$1/checkpoint.pt"; else rm -f "$1/model.pt"; fi
  log "$(basename "$1"): exit code $2, $(tail -n 1 "$1/metrics.jsonl" | cut -c1-160)"
}
ship() {  # everything under /tmp/work comes back in parts the device tool accepts
  tar czf /tmp/results.tgz -C /tmp/work . && split -b 15M /tmp/results.tgz "$OUT/results.tgz.part-"
  log "done: $(du -sh /tmp/results.tgz)"
}
if [ "${LOCAL:-0}" = 1 ]; then
  PY=python; DEV=cpu; HUM=(--set train.max_windows=640 --set train.eval_every=5 --set train.checkpoint_every=5)
  SPEED=(--steps 1 --uncached-steps 0); EVAL=(--set plan.num_threads=1)
else
  PY=python3; DEV=cuda; HUM=(); SPEED=(--steps 2); EVAL=()
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.log"
fi
if [ -n "${1:-}" ]; then  # the humanoid trainings need the dataset
  $PY scripts/device_pack.py unpack .devdata/humanoid.npz /tmp/minari && export MINARI_DATASETS_PATH=/tmp/minari
fi
log "torch $($PY -c 'import torch; print(torch.__version__)')"

if [ "${1:-}" = ablations ]; then
  pids=()
  for arm in "markov --set data.sequence_length=2" "partial --set data.obs_dims=\"0:22\""; do
    name=${arm%% *}; extra=${arm#* }
    # shellcheck disable=SC2086
    timeout -s INT "$SECONDS_LEFT" $PY -m trajformer train configs/humanoid.toml --out /tmp/work/humanoid-$name \
      --set train.device=$DEV --set train.checkpoint_every=1000 \
      "${HUM[@]}" $extra >/tmp/work/$name.log 2>&1 &
    pids+=($!)
  done
  wait "${pids[0]}"; tidy /tmp/work/humanoid-markov $?
  wait "${pids[1]}"; tidy /tmp/work/humanoid-partial $?
  ship
  exit 0
fi

if [ "${1:-}" = humanoid ]; then
  timeout -s INT "$SECONDS_LEFT" $PY -m trajformer train configs/humanoid.toml --out /tmp/work/humanoid-gpu \
    --set train.device=$DEV "${HUM[@]}" >/tmp/work/humanoid.log 2>&1
  tidy /tmp/work/humanoid-gpu $?
  ship
  exit 0
fi

log "1. cuda tests"
$PY -m pytest -q -p no:warnings -p no:cacheprovider tests/test_train_step.py tests/test_planner.py -k "cuda or reads" \
  >/tmp/work/tests.log 2>&1; tail -2 /tmp/work/tests.log >>"$OUT/summary.log"

log "2. plan_speed on the card"
timeout 150 $PY benchmarks/plan_speed.py --device $DEV "${SPEED[@]}" 2>&1 | tee /tmp/work/plan_speed.log \
  | tail -4 >>"$OUT/summary.log"

log "3. walker2d-medium at 128/15 on the card, ${SECONDS_LEFT}s"
cp -r pretrained/models/walker2d-medium /tmp/work/walker2d-medium
timeout -s INT "$SECONDS_LEFT" $PY -m trajformer eval /tmp/work/walker2d-medium --episodes 10 --settings official \
  --set plan.dtype=bfloat16 --set plan.device=$DEV "${EVAL[@]}" >/tmp/work/walker.log 2>&1
log "walker: exit code $?, $(tail -c 400 /tmp/work/walker.log | tr '\r' '\n' | tail -n 2)"
rm -f /tmp/work/walker2d-medium/model.pt  # the weights are in the checkout already
ship
