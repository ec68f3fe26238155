"""scripts/gpu_check.sh / gpu_check.py: what can be checked without a GPU — the no-CUDA exit
(at once, nothing installed), the table, the parsers, timeouts, the fipo-train overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


gc = load_script("gpu_check")


def _fake_bin(tmp_path: Path, marker: Path, nvidia_smi_rc: int | None) -> Path:
    """A PATH dir whose installers only leave a marker (and a failing nvidia-smi)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    names = ["pip", "pip3", "python", "python3", "uv"]
    for name in names:
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {marker}\nexit 1\n")
    if nvidia_smi_rc is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nexit {nvidia_smi_rc}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("nvidia_smi", ["fails", "absent"])
def test_without_cuda_the_script_exits_2_at_once_and_installs_nothing(tmp_path, nvidia_smi):
    if nvidia_smi == "absent" and any(Path(d, "nvidia-smi").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("this machine has nvidia-smi in /usr/bin")
    marker = tmp_path / "installed"
    bin_dir = _fake_bin(tmp_path, marker, 9 if nvidia_smi == "fails" else None)
    stamp = REPO / ".venv" / ".fipo-installed"
    stamp_before = stamp.stat().st_mtime if stamp.exists() else None
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    start = time.monotonic()
    res = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30
    )
    assert res.returncode == 2, res.stderr
    assert "no CUDA device" in res.stderr
    assert time.monotonic() - start < 5
    assert not marker.exists()  # no pip / python ran
    assert (stamp.stat().st_mtime if stamp.exists() else None) == stamp_before


def test_wheels_install_offline_into_python_then_run_the_checks(tmp_path):
    """--wheels DIR (a GPU machine without a package index): pip installs DIR's wheels and
    the checkout with --no-index into $PYTHON, runs no setup.sh, then the driver.

    The script runs from a copy in a scratch checkout without setup.sh: with the fake GPU
    below, a script that ignored --wheels would otherwise install the gpu extra here."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    script = checkout / "scripts" / "gpu_check.sh"
    script.write_text(SCRIPT.read_text())
    log = tmp_path / "calls"
    bin_dir = _fake_bin(tmp_path, tmp_path / "other", nvidia_smi_rc=0)
    python = tmp_path / "py"
    python.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    python.chmod(0o755)
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "a-1-py3-none-any.whl").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(python)}
    res = subprocess.run(
        ["bash", str(script), "--wheels", str(wheels), "--only", "tiny_model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m pip install") and "--no-index" in calls[0]
    assert calls[0].endswith(f"{wheels}/a-1-py3-none-any.whl")
    assert "--no-index" in calls[1] and calls[1].endswith(f"-e {checkout}")
    assert calls[-1] == "scripts/gpu_check.py --only tiny_model"  # (run from the checkout)
    assert not (tmp_path / "other").exists()  # no other pip / python / uv ran


@pytest.mark.parametrize("args", [["--wheels"], ["--wheels", ""], ["--wheels", "EMPTY"]])
def test_wheels_without_wheels_is_refused_with_the_fix(tmp_path, args):
    """--wheels with no folder, or a folder without wheels: exit 2 naming offline_wheels.py,
    before anything is installed (the script runs from a scratch checkout's copy)."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    script = checkout / "scripts" / "gpu_check.sh"
    script.write_text(SCRIPT.read_text())
    (tmp_path / "EMPTY").mkdir()
    marker = tmp_path / "installed"
    bin_dir = _fake_bin(tmp_path, marker, nvidia_smi_rc=0)
    args = [str(tmp_path / a) if a == "EMPTY" else a for a in args]
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "python")}
    res = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=30
    )
    assert res.returncode == 2, res.stderr
    assert "offline_wheels.py" in res.stderr
    assert not marker.exists()


def test_the_driver_exits_2_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--workdir", "/nonexistent"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2 and "no CUDA device" in res.stderr


def test_table():
    rows = [
        gc.Row("vllm_generate_reload_sleep", gc.PASS, "greedy equal", 61.25),
        gc.Row("flash", gc.FAIL, "max |d| 3e-2", 3.0),
    ]
    lines = gc.format_table(rows).splitlines()
    assert lines[0].split("|")[1:-1] == [
        " check                      ",
        " result ",
        " value          ",
        " seconds ",
    ]
    assert set(lines[1]) == {"|", "-"}
    assert lines[2].startswith("| vllm_generate_reload_sleep | PASS   | greedy equal")
    assert "61.2" in lines[2] or "61.3" in lines[2]
    assert r"max \|d\| 3e-2" in lines[3]  # a pipe in a value does not break the row
    assert len({len(line) for line in lines}) == 1  # aligned


def test_exit_code():
    ok, skip, bad = (gc.Row("a", r, "", 0) for r in (gc.PASS, gc.SKIP, gc.FAIL))
    assert gc.exit_code([ok, skip]) == 0
    assert gc.exit_code([ok, bad]) == 1
    assert gc.exit_code([]) == 1


def test_parse_result_line():
    out = 'noise\nGPU_CHECK_RESULT {"result": "PASS", "value": "v1"}\nmore noise\n'
    assert gc.parse_result_line(out) == ("PASS", "v1")
    assert gc.parse_result_line("Traceback ...\n") is None
    result, value = gc._parse_in_process("boom\nRuntimeError: CUDA error\n", 1, Path())
    assert result == gc.FAIL and "rc 1" in value and "CUDA error" in value


def test_parse_sync():
    line = "GPU_CHECK sync/peak_extra_bytes=1572864 bucket_bytes=1048576"
    result, value = gc.parse_sync(f"..\n{line}\n1 passed\n", 0)
    assert result == gc.PASS
    assert "sync/peak_extra_bytes=1572864" in value and "1.50 MiB" in value
    assert gc.parse_sync(f"{line}\n1 failed", 1)[0] == gc.FAIL
    assert "matched -k gpu_check" in gc.parse_sync("no tests ran", 5)[1]
    assert "does not exist" in gc.parse_sync("ERROR: file or directory not found: t", 4)[1]
    assert gc.parse_sync("1 passed", 0) == (gc.FAIL, "pytest rc 0, no GPU_CHECK line")


def _metrics(run_dir: Path, diffs: list[float]) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "val/x": 1}] + [
        {"step": s, "perf/step_seconds": 2.0 + s, "rollout/actor_logprob_abs_diff": d}
        for s, d in enumerate(diffs, start=1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_parse_train(tmp_path):
    _metrics(tmp_path / "ok", [1e-3, 1.5e-3, 1e-3])
    result, value = gc.parse_train(tmp_path / "ok", 0)
    assert result == gc.PASS
    assert value.startswith("4.00 s/step (steps 3.0/4.0/5.0)") and "1.5e-03" in value
    # weights one Adam step stale: the token mean measured in bf16 (tests/helpers/logprobs.py)
    _metrics(tmp_path / "stale", [1e-3, 1.3e-2, 1e-3])
    assert gc.parse_train(tmp_path / "stale", 0)[0] == gc.FAIL
    _metrics(tmp_path / "short", [1e-3])
    assert gc.parse_train(tmp_path / "short", 0)[0] == gc.FAIL
    assert gc.parse_train(tmp_path / "ok", 1)[0] == gc.FAIL
    result, value = gc.parse_train(tmp_path / "missing", 1)
    assert result == gc.FAIL and "no step metrics" in value


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_a_hanging_check_costs_its_timeout_only(tmp_path, sigint_ignored):
    """Also when launched from a background job (SIGINT ignored, as `cmd &` leaves it): the
    check inherited the ignored Ctrl-C, and its stop waited out the 20 s grace."""
    hang = gc.Check(
        "hang",
        1,
        lambda work: [sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"],
        gc._parse_in_process,
    )
    start = time.monotonic()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else signal.SIG_DFL)
    try:
        row = gc.run_check(hang, tmp_path, 1.0, dict(os.environ))
    finally:
        signal.signal(signal.SIGINT, before)
    assert row.result == gc.FAIL and "timeout after 1 s" in row.value
    assert time.monotonic() - start < 20
    assert (tmp_path / "logs" / "hang.log").read_text().startswith("x")


def test_every_check_has_a_timeout_within_the_budget():
    names = [c.name for c in gc.CHECKS]
    assert len(names) == len(set(names))
    assert all(0 < c.timeout_s <= 480 for c in gc.CHECKS)
    assert {
        "vllm_generate_reload_sleep",
        "colocated_ipc_sync",
        "deepspeed_zero3_bf16",
        "flash_attn_varlen_vs_sdpa",
        "fipo_train_colocated_3_steps",
    } <= set(names)


def test_each_sync_row_selects_its_engines_one_device_case(tmp_path):
    """colocated_ipc_sync (vLLM) and colocated_ipc_sync_hf each run exactly one test."""
    for name, engine in (("colocated_ipc_sync", "vllm"), ("colocated_ipc_sync_hf", "hf")):
        (check,) = [c for c in gc.CHECKS if c.name == name]
        argv = check.argv(tmp_path)
        res = subprocess.run(
            [*argv, "--collect-only"], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        ids = [line for line in res.stdout.splitlines() if "::" in line]
        assert ids == [f"{gc.SYNC_TEST}::test_gpu_check_one_device_holds_actor_and_engine[{engine}]"]


@pytest.mark.parametrize(
    "name",
    [
        "fipo_train_colocated_3_steps",
        "fipo_train_colocated_hf_3_steps",
        "fipo_train_colocated_tp2_sp2_2gpu",
        "fipo_train_split_nccl_2gpu",
    ],
)
def test_the_training_checks_are_valid_configs(tmp_path, name, monkeypatch):
    from fipo_trainer import platform
    from fipo_trainer.cli import compose_config
    from fipo_trainer.trainer.config import load_config, validate_config

    (check,) = [c for c in gc.CHECKS if c.name == name]
    argv = check.argv(tmp_path)
    assert Path(argv[0]).name == "fipo-train"
    assert argv[1] == "recipe=quickstart_gpu"  # the recipe a GPU user is told to run
    cfg = load_config(compose_config(argv[1:]), build_model=False)
    res = cfg.resources
    assert res.gpus_per_node == check.min_gpus
    assert res.rollout_workers == 1 and cfg.trainer.total_training_steps == gc.TRAIN_STEPS
    assert cfg.trainer.run_dir == str(tmp_path / name)
    assert cfg.trainer.timeline_json_file == "timeline.json"  # lands in the row's run dir
    assert cfg.rollout.engine == ("hf" if "_hf_" in name else "vllm")
    if res.placement == "colocated":
        assert cfg.rollout.free_cache_engine
        assert res.actor_world_size == cfg.rollout.tensor_parallel_size == check.min_gpus
    else:
        assert res.actor_world_size + cfg.rollout.tensor_parallel_size == check.min_gpus
    assert validate_config(cfg, check_files=False, check_platform=False) == []
    # and the rules a CUDA machine applies (forked engines, CPU runs) pass it
    cuda = platform.Platform("cuda", "nccl", "bfloat16", "sdpa", "cuda")
    monkeypatch.setattr(platform, "current_platform", lambda: cuda)
    assert validate_config(cfg, check_files=False) == []


def _quick(name: str, result: str = "PASS", **kwargs) -> object:
    line = gc.RESULT_PREFIX + json.dumps({"result": result, "value": name})
    return gc.Check(
        name,
        30,
        lambda work: [sys.executable, "-c", f"print({line!r})"],
        gc._parse_in_process,
        **kwargs,
    )


def test_main_skips_what_the_machine_lacks_and_fails_what_the_budget_misses(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(gc, "cuda_devices", lambda: 1)
    monkeypatch.setattr(gc, "CHECKS", [_quick("a"), _quick("two_gpus", min_gpus=2)])
    assert gc.main(["--workdir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["check"], r["result"]) for r in rows] == [("a", "PASS"), ("two_gpus", "SKIP")]
    assert rows[1]["value"] == "needs 2 GPUs, 1 visible"
    assert "| a " in capsys.readouterr().out
    assert gc.main(["--workdir", str(tmp_path), "--budget-s", "0"]) == 1
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rows[0]["result"] == "FAIL" and "not run" in rows[0]["value"]
    monkeypatch.setattr(gc, "CHECKS", [_quick("a"), _quick("b", result="FAIL")])
    assert gc.main(["--workdir", str(tmp_path)]) == 1
    with pytest.raises(SystemExit):
        gc.main(["--workdir", str(tmp_path), "--only", "nope"])


def test_a_check_whose_module_is_absent_fails_at_once_without_running(tmp_path, monkeypatch):
    ran = tmp_path / "ran"
    absent = gc.Check(
        "needs_absent",
        60,
        lambda work: [sys.executable, "-c", f"open({str(ran)!r}, 'w')"],
        gc._parse_in_process,
        needs=("fipo_no_such_module",),
    )
    monkeypatch.setattr(gc, "cuda_devices", lambda: 1)
    monkeypatch.setattr(gc, "CHECKS", [absent, _quick("a")])
    assert gc.main(["--workdir", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["check"], r["result"]) for r in rows] == [("needs_absent", "FAIL"), ("a", "PASS")]
    assert rows[0]["value"].startswith("not installed: fipo_no_such_module (the gpu extra")
    assert rows[0]["seconds"] == 0.0 and not ran.exists()


def test_the_rows_that_import_vllm_say_so():
    needs = {c.name: c.needs for c in gc.CHECKS}
    assert {name for name, n in needs.items() if "vllm" in n} == {
        "vllm_generate_reload_sleep",
        "colocated_ipc_sync",
        "fipo_train_colocated_3_steps",
        "fipo_train_colocated_tp2_sp2_2gpu",
        "fipo_train_split_nccl_2gpu",
    }
