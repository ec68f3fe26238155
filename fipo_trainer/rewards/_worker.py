"""Grader worker process (``python -m fipo_trainer.rewards._worker FD``).

A fresh interpreter, not a fork: nothing of the trainer (torch, Ray threads, CUDA) is inherited,
and unlike multiprocessing's spawn/forkserver the parent's ``__main__`` is not re-imported. The
parent talks to it over a socket passed as file descriptor FD; the first message is the
:class:`RewardConfig`. It receives chunks of items and sends one message per graded item.

Per-item messages let the parent know exactly which item is running, so a hang or crash is
charged to that item alone and the rest of its chunk is re-queued elsewhere.

Protocol (worker -> parent): ("ready", pid) | ("fatal", traceback) once at start-up, then per
item ("r", idx, score, acc, pred) or ("e", idx, message), and ("d",) at the end of each chunk.
Parent -> worker: first (RewardConfig, the graders to warm up), then a list of (idx, grader, response, ground_truth, data_source, extra_info),
or None to exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .config import RewardConfig
from .custom import load_custom_function, make_caller, normalize_result

_WARM = False
_WARM_UP_ITEMS = (
    ("So the answer is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("Answer: x = 5", "5"),
    ("Answer: $(1, 2)$", "(1,2)"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("Answer: 5 dollars", "5"),
)


def warm_up() -> None:
    """Import math-verify and run it once: its first parses build grammars (~0.1-1 s)."""
    global _WARM
    if _WARM:
        return
    from . import math_verify as mv

    for response, ground_truth in _WARM_UP_ITEMS:
        mv.compute_score(response, ground_truth)
    _WARM = True


def build_graders(config: RewardConfig) -> dict[str, Callable[[str, str, str, Any], tuple]]:
    """grader name -> fn(response, ground_truth, data_source, extra_info) -> (score, acc, pred)."""
    right, wrong = config.correct_score, config.failure_score

    if config.custom_function is not None:
        caller = make_caller(load_custom_function(config.custom_function))
        return {"custom": lambda r, g, ds, extra: normalize_result(caller(r, g, ds, extra))}

    from . import dapo

    def grade_dapo(response, ground_truth, data_source, extra_info):
        out = dapo.compute_score(response, ground_truth, boxed_fallback=config.dapo_boxed_fallback)
        return (right if out["acc"] else wrong), out["acc"], out["pred"]

    def grade_math_verify(response, ground_truth, data_source, extra_info):
        from . import math_verify as mv  # sympy: imported by warm_up, or here on first use

        out = mv.compute_score(response, ground_truth, score_format=config.score_format)
        return out["score"], out["acc"], out["pred"]

    return {"dapo": grade_dapo, "math_verify": grade_math_verify}


def limit_memory(max_memory_mb: int | None) -> None:
    """Cap this process's address space, so a runaway grader gets MemoryError (its item
    fails) rather than the machine's OOM killer taking something else down."""
    if max_memory_mb is None:
        return
    import resource

    limit = int(max_memory_mb) * 2**20
    with open("/proc/self/status") as f:
        size = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
    if size >= limit:
        raise MemoryError(
            f"reward.max_memory_mb={max_memory_mb} is below what a grader process already "
            f"uses after start-up ({size / 2**20:.0f} MiB of address space); raise it"
        )
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker hung in a grader never reads EOF; leave if the trainer process is gone.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def _describe(exc: BaseException, max_memory_mb: int | None = None) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # an exception whose __str__ fails
        text = type(exc).__name__
    if isinstance(exc, MemoryError) and max_memory_mb is not None:
        text += f" (grader memory is capped by reward.max_memory_mb={max_memory_mb})"
    return text[:2000]


def worker_main(conn: Connection) -> None:
    """Serve grading tasks on ``conn`` until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts us down
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        config: RewardConfig
        config, expected = conn.recv()  # expected: the graders this run's data routes to
        graders = build_graders(config)
        if "math_verify" in expected:
            warm_up()
        # after start-up: the cap is for grading, and a cap below the start-up size is
        # reported once, here, instead of failing every item
        limit_memory(config.max_memory_mb)
    except BaseException:
        conn.send(("fatal", traceback.format_exc(limit=20)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # parent went away
            return
        if task is None:
            return
        for idx, grader, response, ground_truth, data_source, extra_info in task:
            try:
                score, acc, pred = graders[grader](response, ground_truth, data_source, extra_info)
                message = ("r", idx, float(score), bool(acc), str(pred))
            except BaseException as exc:  # a grader must never take the worker down
                message = ("e", idx, _describe(exc, config.max_memory_mb))
            conn.send(message)
        conn.send(("d",))


if __name__ == "__main__":
    worker_main(Connection(int(sys.argv[1])))
