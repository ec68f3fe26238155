#!/usr/bin/env bash
# Set-up + the whole test suite (lint, unit, integration, end-to-end). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
exec python -m pytest "$@"
