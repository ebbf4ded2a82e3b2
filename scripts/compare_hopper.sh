#!/usr/bin/env bash
# Reproduces the README's "TT beside the model-based family" table on trajformer/hopper-medium-v0: BC, IQL, MOPO,
# MOReL and COMBO trained here on the same split (configs/hopper-medium-local.toml: the papers' Hopper settings,
# CPU budgets), TT = the shipped model (its training: pretrained/README.md), TT + IQL critic = the shipped model
# planning with this comparison's IQL critic. 5 episodes each, seeds 0-4, beam 32 / horizon 5 for TT.
# About 3.5 h on one core of a 2-core CPU (IQL's 300k steps ~1 h, COMBO ~45 min, each TT evaluation ~25 min).
# Writes the records into pretrained/compare/hopper-medium/ at the end.
# Resumable: run it again (a directory there is resumed, so a trained part put there first, e.g. an IQL
# directory trained on the same data and split with the same settings, is reused; compare refuses other ones).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
trajformer collect --preset hopper-medium
RESUME=(); [ -d runs/hopper-compare ] && RESUME=(--resume)
trajformer compare configs/hopper-medium-local.toml --out runs/hopper-compare "${RESUME[@]}" \
  --methods bc,iql,mopo,morel,combo,tt,tt-critic --set compare.tt_run=pretrained/models/hopper-medium \
  --set plan.beam_width=32 --set plan.horizon=5 --set plan.num_threads="$OMP_NUM_THREADS"
# The table's extra row: MOPO with the ensemble-std penalty, on the same ensemble.
[ -f runs/hopper-mopo-std/mopo.json ] || trajformer mopo configs/hopper-medium-local.toml \
  --ensemble runs/hopper-compare/ensemble --set model_based.mopo_uncertainty=ensemble_std --episodes 5 \
  --num-envs 5 --out runs/hopper-mopo-std
# The records the README's table cites.
mkdir -p pretrained/compare/hopper-medium
cp runs/hopper-compare/compare.{json,md,png} pretrained/compare/hopper-medium/
cp runs/hopper-mopo-std/mopo.json pretrained/compare/hopper-medium/mopo-ensemble-std.json
