#!/usr/bin/env bash
# The HMoE paper's comparison (MoE vs HMoE, Top-K vs Top-P, equal total parameters) at small scale:
# set up (idempotent), then train and evaluate every arm and write the table and plots.
# Under an hour on 2 CPU cores at the default size; see run/experiments/README.md.
#
#   run/experiments/paper_comparison.sh                                  # outputs/paper_comparison
#   run/experiments/paper_comparison.sh --out outputs/pc2 --arms all     # every arm (adds dense + hybrid)
#   run/experiments/paper_comparison.sh --scale 4 --num-ranks 8          # GPUs: bigger model, batch, steps
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
./run/setup.sh
source run/env.sh
exec .venv/bin/python run/experiments/paper_comparison.py "$@"
