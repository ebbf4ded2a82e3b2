#!/usr/bin/env bash
# The shipped humanoid transformer, and more data against more steps (pretrained/README.md, "The humanoid models"): two
# fine-tunes of PARENT (default runs/humanoid-main, the 1.28M-window run of scripts/humanoid_models.sh) at one budget,
# each from its weights and discretizer (train.init_from), learning rate 2e-4 with the config's warmup and cosine,
# then 100-step predictions on the shipped held-out starts.
#   PARENT=DIR scripts/humanoid_finetune.sh [MAX_WINDOWS]    (default 64000 windows, ~55 min of one core each here)
# runs/humanoid-ft-same   the parent's own data and split (trajformer/humanoid-medium-v0, 200 episodes): shipped as
#                         pretrained/models/humanoid-tt (the run directory without its resume checkpoint)
# runs/humanoid-ft-more   1M new steps of the same behaviour policy on other seeds (collected into
#                         runs/minari-more under the same dataset id, ~40 min of one core; no held-out episode in it)
# runs/predict-ft-*       trajformer predict against the shipped ensemble (16 samples per start)
# runs/sm-ft-*.json       the teacher-forced mean of 64 sampled rollouts per start (scripts/humanoid_sample_means.py)
# scripts/compare_models.py then scores all three on the parent's validation episodes (none of them trained on
# those). Each training resumes after an interruption: run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS=${1:-64000}
PARENT=${PARENT:-runs/humanoid-main}
[ -f "$PARENT/model.pt" ] || { echo "no parent run $PARENT/model.pt: run scripts/humanoid_models.sh or set PARENT" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
MORE=$PWD/runs/minari-more
trajformer collect --preset humanoid-medium --steps 200000 --num-envs 8
MINARI_DATASETS_PATH=$MORE trajformer collect --preset humanoid-medium --steps 1000000 --num-envs 8 --seed 1000
finetune() {  # NAME
  local out=runs/humanoid-ft-$1
  local resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  trajformer train configs/humanoid.toml --out "$out" "${resume[@]}" \
    --set "train.init_from=\"$PARENT\"" --set train.learning_rate=2e-4 \
    --set train.max_windows="$WINDOWS" --set train.num_threads="$OMP_NUM_THREADS" \
    --set train.eval_every=250 --set train.checkpoint_every=250
}
finetune same
mkdir -p pretrained/models/humanoid-tt
for f in model.pt config.toml run.json discretizer.npz metrics.jsonl loss.png; do
  cp runs/humanoid-ft-same/$f pretrained/models/humanoid-tt/
done
MINARI_DATASETS_PATH=$MORE finetune more
for name in same more; do
  trajformer predict runs/humanoid-ft-$name --dataset pretrained/data/humanoid-heldout.npz \
    --baseline pretrained/models/humanoid-ensemble --horizon 100 --starts 8 --samples 16 --no-render \
    --out runs/predict-ft-$name
  python scripts/humanoid_sample_means.py --run runs/humanoid-ft-$name --samples 64 --work runs/sm-ft-$name \
    --out runs/sm-ft-$name.json
done
python scripts/compare_models.py "$PARENT" runs/humanoid-ft-same runs/humanoid-ft-more \
  --sequence-length 4 --windows 4096
