"""Benchmark: blocked O(B·L) `future_kl` vs the published O(B·L²) chunked reference.

Prints time, peak extra memory, speed-up and max abs difference for B = 8 and
L in {1024, 4096, 16384, 20480} (float32). Each measurement runs in a fresh child process so
peak memory (ru_maxrss on CPU, max_memory_allocated on CUDA) belongs to that call alone.
Usage: python scripts/bench_future_kl.py [--device cpu|cuda] [--lengths 1024 4096 ...]
(default: the CPU table, then the GPU table when CUDA is available)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from fipo_trainer.algorithms.future_kl import future_kl, future_kl_reference, gamma_from_half_life

BATCH = 8
GAMMA = gamma_from_half_life(32.0)


def _inputs(length: int, device: str):
    gen = torch.Generator().manual_seed(length)
    log_ratio = (torch.randn(BATCH, length, generator=gen) * 0.05).to(device)
    lengths = torch.randint(length // 2, length + 1, (BATCH,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(device)
    return log_ratio, mask


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(impl: str, length: int, device: str, repeats: int) -> dict:
    """Runs in a child process: one implementation at one length."""
    fn = future_kl if impl == "ours" else future_kl_reference
    small = _inputs(256, device)
    fn(*small, GAMMA)  # load kernels/thread pools before the memory baseline
    log_ratio, mask = _inputs(length, device)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = fn(log_ratio, mask, GAMMA)  # first call: also the memory measurement
    _sync(device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(log_ratio, mask, GAMMA)
        _sync(device)
        times.append(time.perf_counter() - start)
    torch.save(out.cpu(), f"/tmp/fkl_{impl}_{length}_{device}.pt")
    return {"seconds": min(times), "peak_bytes": max(peak, 0)}


def run_child(impl: str, length: int, device: str, repeats: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        str(length),
        "--device",
        device,
        "--repeats",
        str(repeats),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 20480])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "LENGTH"))
    args = parser.parse_args()
    if args.worker:
        device = args.device or "cpu"
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), device, args.repeats)))
        return

    console = Console(width=140)
    devices = (
        [args.device] if args.device else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    )
    for device in devices:
        console.print(_table(device, args.lengths, args.repeats, console))


def _table(device: str, lengths: list[int], repeats: int, console: Console) -> Table:
    table = Table(
        title=f"future_kl vs future_kl_reference (B={BATCH}, float32, {device}, half-life 32)"
    )
    for col in (
        "L",
        "ours s",
        "ref s",
        "speed-up",
        "ours peak MiB",
        "ref peak MiB",
        "B·L·4 MiB",
        "max |diff|",
    ):
        table.add_column(col, justify="right")
    for length in lengths:
        with console.status(f"{device} L = {length}"):
            ours = run_child("ours", length, device, repeats)
            ref = run_child("ref", length, device, 1 if length > 4096 else repeats)
        a = torch.load(f"/tmp/fkl_ours_{length}_{device}.pt")
        b = torch.load(f"/tmp/fkl_ref_{length}_{device}.pt")
        mib = 1024**2
        table.add_row(
            str(length),
            f"{ours['seconds']:.4f}",
            f"{ref['seconds']:.3f}",
            f"{ref['seconds'] / ours['seconds']:.0f}x",
            f"{ours['peak_bytes'] / mib:.1f}",
            f"{ref['peak_bytes'] / mib:.1f}",
            f"{BATCH * length * 4 / mib:.2f}",
            f"{(a - b).abs().max().item():.2e}",
        )
    return table


if __name__ == "__main__":
    main()
