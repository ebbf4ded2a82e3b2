#!/usr/bin/env bash
# The humanoid transformer and the paper's two ablations at one budget, then 100-step predictions against the
# shipped ensemble on the same held-out starts (issue: humanoid predictions that hold):
#   scripts/humanoid_models.sh [MAX_WINDOWS]      (default 1.28M windows, the config's budget; TRAIN_DEVICE=cuda on a GPU)
# runs/humanoid-main     configs/humanoid.toml with the CPU recipe (no dropout, the window budget the cosine follows):
#                        the parent of the shipped pretrained/models/humanoid-tt (scripts/humanoid_finetune.sh fine-tunes
#                        it 64k windows more and ships that)
# runs/humanoid-markov   the same with data.sequence_length = 2: each next state sees the latest transition only
# runs/humanoid-partial  the same with data.obs_dims = "0:22": joint positions only, the 23 velocities hidden
# notebooks/figures/ablations   trajformer predict with the ensemble and both ablations (the README's table)
# Each training is resumable: run the script again after an interruption. Measured 2026-11-30, each run on one
# core of the 2-core CPU beside another training: the main run ~70 windows/s (4 transitions, 255 tokens), the
# Markovian one ~170, the partial one ~108, so 1.28M windows is ~5 + 2 + 3.3 h of a core. The shipped runs
# trained on one H200 (scripts/device_session.sh; the main run in 317 s, the ablations side by side for 16-17k of
# their 20k steps in 250 s, then resumed here on one core).
# Then scripts/humanoid_finetune.sh (the shipped model), scripts/build_notebooks.sh (the notebooks) and
# python scripts/humanoid_table.py (the README tables).
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS=${1:-1280000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
trajformer collect --preset humanoid-medium --steps 200000 --num-envs 8   # ~2 min once, then cached
train() {  # NAME, then extra --set overrides
  local out=runs/humanoid-$1; shift
  local resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)  # a finished run resumes to no steps
  trajformer train configs/humanoid.toml --out "$out" "${resume[@]}" \
    --set train.max_windows="$WINDOWS" --set train.num_threads="$OMP_NUM_THREADS" \
    --set train.device="${TRAIN_DEVICE:-cpu}" "$@"
}
train main
train markov --set data.sequence_length=2
train partial --set 'data.obs_dims="0:22"'
# the three at one budget: the main run here, not the shipped fine-tune (predict overwrites its own files there;
# sample_means.json beside them is the main run's, from scripts/humanoid_sample_means.py --run runs/humanoid-main
# --work runs/humanoid-sample-means-main --samples 832 --out notebooks/figures/ablations/sample_means.json)
trajformer predict runs/humanoid-main --dataset pretrained/data/humanoid-heldout.npz \
  --baseline pretrained/models/humanoid-ensemble --ablation markovian=runs/humanoid-markov \
  --ablation partial=runs/humanoid-partial --horizon 100 --starts 8 --samples 16 --no-render \
  --out notebooks/figures/ablations   # no filmstrip/video: the long-horizon notebook shows the main run's
