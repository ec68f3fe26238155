#!/usr/bin/env bash
# Small-scale FIPO vs DAPO on CPU: one Hydra sweep, FIPO and DAPO x 3 seeds, in the regime
# where they differ (4 optimizer steps per rollout batch: 16 prompts / mini-batch 4), then
# the comparison picture. recipe=ablations/fipo_vs_dapo: the quickstart (tiny Qwen2,
# arithmetic task, dynamic sampling) shortened to 100 steps, validation mean@4 every 20.
# About 1.3 min per job on 2 cores, ~8 min in all (2026-12-07).
#   scripts/ablate_fipo_vs_dapo.sh [SWEEP_DIR] [extra overrides ...]
# Writes SWEEP_DIR/<algorithm=...,trainer.seed=...>/ (one run dir per job),
# SWEEP_DIR/sweep_summary.csv and SWEEP_DIR/compare.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
SWEEP_DIR="${1:-outputs/fipo/ablation_fipo_vs_dapo/sweep}"
shift || true
fipo-train --multirun recipe=ablations/fipo_vs_dapo "hydra.sweep.dir=$SWEEP_DIR" "$@"
# Training curves smoothed over 10 steps; validation points as they are.
fipo-plot --compare "$SWEEP_DIR"/*/ --smooth 10 -o "$SWEEP_DIR/compare.png"
echo "summary: $SWEEP_DIR/sweep_summary.csv  picture: $SWEEP_DIR/compare.png"
