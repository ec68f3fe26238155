"""The GPU check (issue 10): every CUDA path CI cannot run, in one table.

Run it through ``scripts/gpu_check.sh`` (which installs the gpu extra first). Each check runs
in its own subprocess with its own timeout, inside one overall budget (``--budget-s``, 480 s
by default), so a hang costs that check, not the run. Checks:

* ``tiny_model`` — build the tiny Qwen2 the in-process checks share (cached).
* ``vllm_generate_reload_sleep`` — vLLM CUDA: greedy generate; reload the same weights
  (``VllmEngine.update_weights``): the greedy output is unchanged; sleep (level 1) frees
  device memory, generate is refused while asleep, after wake the output is unchanged;
  sleep level 2 (weights dropped), wake, reload: unchanged again.
* ``deepspeed_zero3_bf16`` / ``deepspeed_zero3_offload`` — one ZeRO-3 training step of the
  actor's DeepSpeed engine (torch.distributed world 1, NCCL), bf16; the second with param +
  optimizer offload (DeepSpeed's CPU Adam).
* ``flash_attn_varlen_vs_sdpa`` — log-probs of one packed batch through the actor's packed
  attention (``actor/ulysses.py``) with flash_attention_2 (varlen from position ids) vs sdpa,
  and vs each row run alone; pass if the max abs diff < 2e-2 (bf16).
* ``colocated_ipc_sync`` / ``colocated_ipc_sync_hf`` — ``tests/integration/test_colocated_sync.py
  -k "gpu_check and vllm|hf"`` on 1 GPU (CUDA IPC handles) with the vLLM / HF engine; reports
  its ``sync/peak_extra_bytes``.
* ``fipo_train_colocated_3_steps`` — ``fipo-train recipe=quickstart_gpu``: colocated on 1 GPU
  with sleep/wake, 3 steps; reports s/step (perf/step_seconds) and the worst
  rollout/actor_logprob_abs_diff, a token mean (pass < 2e-3 in bf16: rounding gives 5e-4 on
  the sync tests' 8-layer model, weights one Adam step stale 1.3e-2; tests/helpers/logprobs.py).
* ``fipo_train_colocated_hf_3_steps`` — the same run with ``rollout.engine=hf``: the
  trainer's colocated CUDA-IPC weight sync, ZeRO-3 on NCCL and sleep/wake, where vLLM is
  not installed (a machine without the gpu extra, e.g. ``--wheels``).
* Only where 2 GPUs are visible (skipped on one; their timeouts extend the budget):
  ``fipo_train_colocated_tp2_sp2_2gpu`` (one vLLM engine of TP 2 over the 2 actor ranks'
  GPUs: the external launcher and IPC of TP slices on CUDA; Ulysses SP 2 on flash-attn)
  and ``fipo_train_split_nccl_2gpu``
  (actor and engine on their own GPUs: the NCCL broadcast sync).

A row that imports a module this Python lacks (``vllm``, where the ``gpu`` extra could not be
installed) fails at once, without starting its subprocess.

Each train row also leaves ``<workdir>/<row>/timeline.json`` (``fipo-plot --timeline``).
Prints a table (check | result | value | seconds), writes ``<workdir>/gpu_check.json``,
exits 1 if any check failed or did not run, 2 at once without a CUDA device.
``--allow-cpu`` runs what can run on CPU (tests of this script); the rest is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fipo_trainer.cli import quoted_override

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "GPU_CHECK_RESULT "
SYNC_LINE = re.compile(r"GPU_CHECK sync/peak_extra_bytes=(\d+) bucket_bytes=(\d+)")
NO_CUDA = 2
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SYNC_TEST = "tests/integration/test_colocated_sync.py"
TRAIN_STEPS = 3
VLLM = ("vllm",)  # the rows that import it (the gpu extra)
BF16_LOGPROB_ATOL = 2e-3  # on a token mean: tests/helpers/logprobs.py's bf16 mean bound


@dataclass
class Row:
    check: str
    result: str
    value: str
    seconds: float


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table (paste it into the issue's closing note)."""
    header = ("check", "result", "value", "seconds")
    cells = [header] + [
        (r.check, r.result, r.value.replace("|", "\\|"), f"{r.seconds:.1f}") for r in rows
    ]
    widths = [max(len(str(c[i])) for c in cells) for i in range(4)]

    def line(c: Sequence[str]) -> str:
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(c, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(c) for c in cells[1:])])


def exit_code(rows: Sequence[Row]) -> int:
    return 0 if rows and all(r.result in (PASS, SKIP) for r in rows) else 1


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# --------------------------------------------------------------------------- parsers


def parse_result_line(output: str) -> tuple[str, str] | None:
    """(result, value) from an in-process check's last ``GPU_CHECK_RESULT {...}`` line."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX) :])
            return str(data["result"]), str(data["value"])
    return None


def parse_sync(output: str, rc: int) -> tuple[str, str]:
    match = SYNC_LINE.search(output)
    if rc == 5:
        return FAIL, f"no test in {SYNC_TEST} matched -k gpu_check"
    if rc == 4 and "not found" in output:
        return FAIL, f"{SYNC_TEST} does not exist"
    if match is None:
        return FAIL, f"pytest rc {rc}, no GPU_CHECK line"
    peak, bucket = int(match.group(1)), int(match.group(2))
    value = f"sync/peak_extra_bytes={peak} ({fmt_bytes(peak)}; bucket {fmt_bytes(bucket)})"
    return (PASS if rc == 0 else FAIL), value if rc == 0 else f"pytest rc {rc}; {value}"


def parse_train(run_dir: Path, rc: int) -> tuple[str, str]:
    metrics = run_dir / "metrics.jsonl"
    rows = []
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in rows if r.get("step", 0) >= 1}
    seconds = [steps[s].get("perf/step_seconds") for s in sorted(steps)]
    seconds = [s for s in seconds if isinstance(s, (int, float))]
    diffs = [steps[s].get("rollout/actor_logprob_abs_diff") for s in sorted(steps)]
    diffs = [d for d in diffs if isinstance(d, (int, float))]
    if not seconds:
        return FAIL, f"fipo-train rc {rc}, no step metrics in {metrics}"
    per_step = "/".join(f"{s:.1f}" for s in seconds)
    value = f"{sorted(seconds)[len(seconds) // 2]:.2f} s/step (steps {per_step})"
    if diffs:
        value += f"; max actor_logprob_abs_diff {max(diffs):.1e}"
    ok = rc == 0 and len(steps) == TRAIN_STEPS and diffs and max(diffs) < BF16_LOGPROB_ATOL
    return (PASS if ok else FAIL), (value if rc == 0 else f"rc {rc}; {value}")


# --------------------------------------------------------------------------- running


@dataclass
class Check:
    name: str
    timeout_s: float
    argv: Callable[[Path], list[str]]
    parse: Callable[[str, int, Path], tuple[str, str]]
    needs_cuda: bool = False  # True: nothing of it runs on CPU (skipped under --allow-cpu)
    min_gpus: int = 1  # > 1: skipped on smaller machines; its timeout extends the budget
    needs: tuple[str, ...] = ()  # modules it imports: where one is absent it fails at once


def _in_process(name: str) -> Callable[[Path], list[str]]:
    return lambda work: [sys.executable, str(Path(__file__)), "--run-check", name, str(work)]


def _parse_in_process(output: str, rc: int, _work: Path) -> tuple[str, str]:
    found = parse_result_line(output)
    if found is None:
        tail = output.strip().splitlines()[-1:] or [""]
        return FAIL, f"rc {rc}: {tail[0][:120]}"
    return found


COLOCATED_1GPU: tuple[str, ...] = ()  # recipe quickstart_gpu's own layout
# The paper's layout in small: one engine of TP 2 over the 2 actor ranks' GPUs, Ulysses SP 2.
COLOCATED_TP2_SP2 = (
    "resources.gpus_per_node=2",
    "resources.actor_world_size=2",
    "resources.rollout_workers=1",
    "rollout.tensor_parallel_size=2",
    "actor.ulysses_sequence_parallel_size=2",
    "resources.placement=colocated",
    "rollout.free_cache_engine=true",
)
# Split: actor on GPU 0, the engine on GPU 1, weights by NCCL broadcast.
SPLIT_NCCL = (
    "resources.gpus_per_node=2",
    "resources.actor_world_size=1",
    "resources.rollout_workers=1",
    "resources.placement=split",
    "rollout.free_cache_engine=false",
)


def _train_argv(work: Path, name: str = "fipo_train", layout: Sequence[str] = COLOCATED_1GPU):
    return [
        str(Path(sys.executable).parent / "fipo-train"),
        "recipe=quickstart_gpu",  # 1 GPU, colocated; the layouts below widen it
        *layout,
        f"trainer.total_training_steps={TRAIN_STEPS}",
        "trainer.test_freq=0",
        "trainer.val_before_train=false",
        "trainer.plot=false",
        "trainer.export_hf=false",
        "trainer.timeline_json_file=timeline.json",  # where a GPU step's time goes
        "algorithm.filter_groups.on_exhausted=proceed",
        quoted_override("trainer.run_dir", work / name),
    ]


def _train_check(
    name: str, layout: Sequence[str], timeout_s: float, min_gpus: int, needs: tuple[str, ...]
) -> Check:
    return Check(
        name,
        timeout_s,
        lambda work: _train_argv(work, name, layout),
        lambda out, rc, work: parse_train(work / name, rc),
        needs_cuda=True,
        min_gpus=min_gpus,
        needs=needs,
    )


def _sync_check(name: str, engine: str) -> Check:
    """``SYNC_TEST``'s one-device case with this rollout engine."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider"]
    return Check(
        name,
        180,
        lambda work: [*pytest, SYNC_TEST, "-k", f"gpu_check and {engine}"],
        lambda out, rc, work: parse_sync(out, rc),
        needs=VLLM if engine == "vllm" else (),
    )


CHECKS = [
    Check("tiny_model", 120, _in_process("tiny_model"), _parse_in_process),
    Check("vllm_generate_reload_sleep", 180, _in_process("vllm"), _parse_in_process, needs=VLLM),
    Check("deepspeed_zero3_bf16", 120, _in_process("zero3"), _parse_in_process),
    Check("flash_attn_varlen_vs_sdpa", 90, _in_process("flash"), _parse_in_process),
    _sync_check("colocated_ipc_sync", "vllm"),
    _sync_check("colocated_ipc_sync_hf", "hf"),
    _train_check("fipo_train_colocated_3_steps", COLOCATED_1GPU, 240, 1, VLLM),
    _train_check(
        "fipo_train_colocated_hf_3_steps", (*COLOCATED_1GPU, "rollout.engine=hf"), 240, 1, ()
    ),
    Check(
        "deepspeed_zero3_offload",
        180,
        _in_process("zero3_offload"),
        _parse_in_process,
        needs_cuda=True,
    ),
    # Only where 2 GPUs are visible: vLLM TP > 1 on CUDA (external_launcher, IPC of TP
    # slices), Ulysses SP 2 on flash-attn, and the split placement's NCCL broadcast.
    _train_check("fipo_train_colocated_tp2_sp2_2gpu", COLOCATED_TP2_SP2, 240, 2, VLLM),
    _train_check("fipo_train_split_nccl_2gpu", SPLIT_NCCL, 240, 2, VLLM),
]


def _stop(proc: subprocess.Popen) -> None:
    """Interrupt the check's process group (fipo-train stops its workers on Ctrl-C), then
    kill what is left of it. Only this check's own group is signalled."""
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_check(check: Check, work: Path, timeout_s: float, env: dict[str, str]) -> Row:
    log = work / "logs" / f"{check.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            check.argv(work),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Started from a background job, SIGINT comes ignored, and `_stop`'s Ctrl-C would
            # then wait out its 20 s grace: the check gets Python's default handling back.
            preexec_fn=_default_sigint,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return Row(
                check.name,
                FAIL,
                f"timeout after {timeout_s:.0f} s (log {log})",
                time.perf_counter() - start,
            )
    result, value = check.parse(log.read_text(errors="replace"), rc, work)
    if result == FAIL:
        value += f" (log {log})"
    return Row(check.name, result, value, time.perf_counter() - start)


def missing_modules(check: Check) -> list[str]:
    """The modules ``check`` needs that this Python cannot import."""
    return [name for name in check.needs if importlib.util.find_spec(name) is None]


def not_installed(check: Check, missing: Sequence[str]) -> Row:
    """A failed row, at once: a subprocess would spend its start-up learning the same."""
    value = (
        f"not installed: {', '.join(missing)} (the gpu extra: scripts/setup.sh on a CUDA "
        "machine, or its wheels beside --wheels)"
    )
    return Row(check.name, FAIL, value, 0.0)


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="all checks together")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--only", nargs="*", default=None, help="run these checks only")
    parser.add_argument("--allow-cpu", action="store_true", help="tests: run on CPU, skip CUDA")
    parser.add_argument("--run-check", nargs=2, metavar=("NAME", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_check:
        from gpu_check_cases import run_case  # this directory: sys.path[0]

        return run_case(*args.run_check)

    env = {k: v for k, v in os.environ.items() if k != "FIPO_FORCE_CPU"}
    gpus = cuda_devices()
    on_cuda = gpus > 0
    if not on_cuda and not args.allow_cpu:
        print("no CUDA device: torch sees no GPU (scripts/gpu_check.sh needs one)", file=sys.stderr)
        return NO_CUDA
    env["GPU_CHECK_ALLOW_CPU"] = "0" if on_cuda else "1"
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checks = [c for c in CHECKS if args.only is None or c.name in args.only]
    if args.only is not None and len(checks) != len(set(args.only)):
        parser.error(f"--only: known checks are {[c.name for c in CHECKS]}")
    extra = sum(c.timeout_s for c in checks if 1 < c.min_gpus <= gpus)
    deadline = time.monotonic() + args.budget_s + extra
    rows: list[Row] = []
    for check in checks:
        left = deadline - time.monotonic()
        if check.needs_cuda and not on_cuda:
            rows.append(Row(check.name, SKIP, "needs CUDA", 0.0))
        elif check.min_gpus > max(gpus, 1):  # (under --allow-cpu: the 1-GPU checks run)
            rows.append(Row(check.name, SKIP, f"needs {check.min_gpus} GPUs, {gpus} visible", 0.0))
        elif missing := missing_modules(check):
            rows.append(not_installed(check, missing))
        elif left < 5:
            rows.append(
                Row(check.name, FAIL, f"not run: --budget-s {args.budget_s:.0f} spent", 0.0)
            )
        else:
            rows.append(run_check(check, work, min(check.timeout_s, left), env))
        r = rows[-1]
        print(f"[gpu_check] {r.check}: {r.result} {r.value} ({r.seconds:.1f} s)", flush=True)
    table = format_table(rows)
    print(table)
    (work / "gpu_check.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
