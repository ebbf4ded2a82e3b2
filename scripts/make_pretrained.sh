#!/usr/bin/env bash
# Reproduces the long-horizon prediction artifacts (issue #5):
#   pretrained/models/humanoid-ensemble/  the PETS-style ensemble baseline (5 x MLP 4 x 400, the sweep's best size)
#   pretrained/data/humanoid-heldout.npz  4 validation episodes of trajformer/humanoid-medium-v0 (float32)
#   runs/humanoid-ensemble-sweep/         the size sweep behind the ensemble-size table (pretrained/README.md)
# Needs the humanoid dataset and main run of scripts/humanoid_models.sh (same episode split: configs/humanoid.toml,
# train.seed 0). One torch thread, niced, time-capped so the ensemble gets no more CPU than the transformer.
# ENSEMBLE_SECONDS caps the main ensemble (default 2400 s; patience stopped it after 13 epochs, best epoch 8),
# SWEEP_SECONDS each sweep size (default 420 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
ENSEMBLE_SECONDS=${ENSEMBLE_SECONDS:-2400}
SWEEP_SECONDS=${SWEEP_SECONDS:-420}

if [ ! -f runs/humanoid-ensemble/ensemble.json ]; then
  nice -n 10 trajformer train-ensemble configs/humanoid.toml --out runs/humanoid-ensemble \
    --members 5 --layers 4 --hidden 400 --max-seconds "$ENSEMBLE_SECONDS"
fi
mkdir -p pretrained/models/humanoid-ensemble
for f in ensemble.json model.pt metrics.jsonl loss.png; do
  cp runs/humanoid-ensemble/$f pretrained/models/humanoid-ensemble/
done

# The held-out slice: the first 4 of the transformer run's validation episodes.
python -c "from trajformer.predict import save_heldout; \
save_heldout('runs/humanoid-main', 'pretrained/data/humanoid-heldout.npz', episodes=4)"

# Size sweep (each briefly, same time cap): validation NLL and one-step error per size.
for size in "2 200" "4 200" "4 400"; do
  set -- $size
  out=runs/humanoid-ensemble-sweep/${1}x${2}
  [ -f $out/ensemble.json ] || nice -n 10 trajformer train-ensemble configs/humanoid.toml --out $out \
    --members 5 --layers "$1" --hidden "$2" --max-seconds "$SWEEP_SECONDS"
done
