#!/usr/bin/env bash
# Set-up + the main job on the built-in CPU default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
exec python scripts/bench_future_kl.py "$@"
