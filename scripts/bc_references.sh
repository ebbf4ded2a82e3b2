#!/usr/bin/env bash
# The BC reference of a shipped locomotion model's eval.json: behaviour cloning (MLP 2x256, 20k steps) trained with
# seeds 0, 1 and 2 on the model's dataset, each evaluated on the protocol's 10 episodes, and attached as their mean
# with `trajformer eval --bc` (the model's evaluated settings are kept, not planned again). One BC's return varies
# with its training seed more than its standard error says (walker2d: 2324 to 2683), hence three.
# About 3 min per env on one core.   ENV=hopper scripts/bc_references.sh   (hopper, walker2d or halfcheetah)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
ENV=${ENV:-hopper}
SETTINGS=${SETTINGS:-official,32x5}  # the settings eval.json holds (an evaluation under way: SETTINGS=32x5)
trajformer collect --preset "$ENV-medium"
DIRS=()
for seed in 0 1 2; do
  out=runs/$ENV-medium-bc10-seed$seed
  [ -f "$out/bc.json" ] || trajformer bc "configs/$ENV-medium-local.toml" --episodes 10 --num-envs 10 \
    --hp seed=$seed --out "$out"
  DIRS+=("$out")
done
trajformer eval "pretrained/models/$ENV-medium" --episodes 10 --settings "$SETTINGS" --bc "${DIRS[@]}"
