"""Wheels for a GPU machine that cannot reach a package index (``gpu_check.sh --wheels DIR``).

Such a machine (an air-gapped node, a lent benchmark box) usually has CUDA PyTorch and the
common scientific stack but not Ray, DeepSpeed, Hydra or math-verify. This script, run where
pip reaches PyPI, fills DIR with wheels for the target's Python (default 3.12, manylinux
x86-64) at the versions this checkout's environment runs, so the GPU check tests what CI
tests. Packages PyPI ships only as source (DeepSpeed, antlr4 4.9.3) are built here into
pure-Python wheels. ``--slim-ray`` drops the parts of Ray's 79 MB wheel the trainer never
imports (Java jars, RLlib, Tune, Train, Data, Serve, LLM, the dashboard's web client): 37 MB,
for transfers with a size cap.

    .venv/bin/python scripts/offline_wheels.py .whl --slim-ray
    # on the GPU machine:  PYTHON=python3 scripts/gpu_check.sh --wheels .whl
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

# Runtime needs of the trainer that a CUDA PyTorch image typically lacks (with their own
# needs that such images also lack). torch, transformers, numpy, pandas, pyarrow, aiohttp,
# grpcio, protobuf, ... are taken from the image.
BINARY = [
    "ray",
    "hydra-core",
    "omegaconf",
    "math-verify",
    "latex2sympy2_extended",
    "hjson",
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
]
SOURCE_ONLY = ["deepspeed", "antlr4-python3-runtime"]
RAY_UNUSED = (
    "ray/jars/",
    "ray/rllib/",
    "ray/tune/",
    "ray/train/",
    "ray/data/",
    "ray/serve/",
    "ray/llm/",
    "ray/dashboard/client/",
)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def pins(names: list[str]) -> list[str]:
    """name==version as installed here: the versions this checkout is tested with."""
    return [f"{name}=={version(name)}" for name in names]


def slim_ray(wheel: Path) -> Path:
    """Rewrite Ray's wheel without RAY_UNUSED (and their RECORD lines), in place."""
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, 9) as out:
        for info in src.infolist():
            if info.filename.startswith(RAY_UNUSED):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "\n".join(x for x in lines if not x.startswith(RAY_UNUSED)).encode()
            out.writestr(info, data, zipfile.ZIP_DEFLATED, 9)
    tmp.replace(wheel)
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the wheels")
    parser.add_argument("--python-version", default="3.12", help="the target's Python")
    parser.add_argument("--slim-ray", action="store_true", help="drop Ray's unused parts")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the source builds run in a scratch folder
    args.out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    tag = args.python_version.replace(".", "")
    target = ["--python-version", args.python_version, "--implementation", "cp", "--abi", f"cp{tag}"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    download = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *target]
    subprocess.run([*download, "-d", args.out, *pins(BINARY)], check=True)
    with tempfile.TemporaryDirectory() as build:  # sdists: built with this torch, pure Python
        build_wheel = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation"]
        subprocess.run([*build_wheel, "-w", args.out, *pins(SOURCE_ONLY)], check=True, cwd=build)
    if args.slim_ray:
        for wheel in args.out.glob("ray-*.whl"):
            slim_ray(wheel)
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
