#!/usr/bin/env bash
# Regenerates notebooks/*.ipynb with their outputs (full mode: the shipped models), so the figures are never stale.
# Usage: scripts/build_notebooks.sh [NAME ...] [--tiny] [--no-run]   (see scripts/build_notebooks.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MUJOCO_GL=${MUJOCO_GL:-egl}
exec python scripts/build_notebooks.py "$@"
