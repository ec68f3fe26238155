#!/usr/bin/env bash
# Print the pins of pyproject.toml's `gpu` extra, the one place they are written:
#   scripts/gpu_pins.sh            -> vllm==0.32.0 flash-attn==2.8.3.post2
#   scripts/gpu_pins.sh vllm       -> vllm==0.32.0
# Used by scripts/setup.sh (CUDA branch); docker/Dockerfile's ARGs must match
# (tests/unit/test_gpu_pins.py, and a check in the image build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRA="$(sed -n 's/^gpu *= *\[\(.*\)\].*$/\1/p' "$ROOT/pyproject.toml")"
if [[ -z "$EXTRA" ]]; then
  echo "gpu_pins.sh: no one-line 'gpu = [...]' extra in $ROOT/pyproject.toml" >&2
  exit 1
fi
PINS=()
IFS=',' read -r -a ITEMS <<< "$EXTRA"
for item in "${ITEMS[@]}"; do
  item="$(echo "$item" | tr -d '" ')"
  [[ -n "$item" ]] || continue
  if [[ "$item" != *==* ]]; then
    echo "gpu_pins.sh: $item in the gpu extra is not pinned (name==version)" >&2
    exit 1
  fi
  if [[ $# -eq 0 || "${item%%==*}" == "$1" ]]; then
    PINS+=("$item")
  fi
done
if [[ ${#PINS[@]} -eq 0 ]]; then
  echo "gpu_pins.sh: no pin for '${1:-}' in the gpu extra ($EXTRA)" >&2
  exit 1
fi
echo "${PINS[*]}"
