#!/usr/bin/env bash
# The GPU check (issue 10): vLLM CUDA generate + weight reload + sleep/wake, DeepSpeed ZeRO-3
# bf16 (and with offload), flash-attn packed varlen vs sdpa, colocated CUDA-IPC weight sync,
# and a 3-step colocated fipo-train, on one GPU. Prints a table (check | result | value |
# seconds); exits 1 if any check fails, 2 at once on a machine without a CUDA device.
#   scripts/gpu_check.sh                      # set up (scripts/setup.sh: the gpu extra), check
#   scripts/gpu_check.sh --no-setup           # use the installed environment as it is
#   scripts/gpu_check.sh --only vllm_generate_reload_sleep --budget-s 300
#   PYTHON=python3 scripts/gpu_check.sh --wheels .whl   # no package index: install the
#       wheels of scripts/offline_wheels.py and this checkout into $PYTHON, offline
# The checks share one budget (--budget-s, 480 s); installing the gpu extra on a fresh
# machine comes on top (vLLM download, flash-attn wheel or build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The same test as scripts/setup.sh uses to pick the CUDA branch; nothing is installed first.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no CUDA device: nvidia-smi finds no GPU; scripts/gpu_check.sh runs on a CUDA machine" >&2
  exit 2
fi
unset FIPO_FORCE_CPU

SETUP=1
WHEELS=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-setup) SETUP=0 ;;
    --wheels)
      if [[ $# -lt 2 || -z "$2" ]]; then
        echo "gpu_check.sh --wheels needs a folder of wheels (scripts/offline_wheels.py DIR)" >&2
        exit 2
      fi
      WHEELS="$2"; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
START=$(date +%s)
if [[ -n "$WHEELS" ]] && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu_check.sh --wheels '$WHEELS': no *.whl there; fill it where pip reaches PyPI with" \
    "'python scripts/offline_wheels.py $WHEELS --slim-ray' and carry it here" >&2
  exit 2
fi
if [[ -n "$WHEELS" ]]; then
  PY="${PYTHON:-python3}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT"
elif [[ "$SETUP" == 1 ]]; then
  bash scripts/setup.sh
  PY="$ROOT/.venv/bin/python"
else
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
fi
echo "[gpu_check] set-up: $(( $(date +%s) - START )) s; $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' 2>/dev/null || echo 'torch without CUDA')"
echo "[gpu_check] packages: $("$PY" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
names = ("torch", "transformers", "deepspeed", "ray", "vllm", "flash-attn")
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"
print(", ".join(f"{n} {v(n)}" for n in names))
PY
)"
export PATH="$(dirname "$PY"):$PATH"  # fipo-train of this environment
exec "$PY" scripts/gpu_check.py "${ARGS[@]+"${ARGS[@]}"}"
