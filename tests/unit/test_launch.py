"""``fipo-train`` starts Ray while torch loads (``trainer.launch``): the driver's path from
the command line to a started Ray imports no torch, and the run owns the Ray it started."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fipo_trainer import startup
from fipo_trainer.cli import compose_config
from fipo_trainer.trainer import launch
from fipo_trainer.trainer.config import load_config
from tests.helpers.data import SHARED_DATA


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_path_to_ray_imports_no_torch(tmp_path):
    """Everything `fipo-train` does before `ray.init`: the CLI module, the config (every
    section's checks, the quickstart's recipe, the tiny model already built), the platform
    and the workers' environment, Ray's start-up module."""
    out = run_python(f"""
        import sys
        import fipo_trainer.cli, fipo_trainer.trainer.sweep, fipo_trainer.trainer.launch
        from fipo_trainer.cli import compose_config
        from fipo_trainer.trainer.config import prepare_config
        from fipo_trainer.cluster import ray_init
        from fipo_trainer.platform import ACCELERATOR_DEVICE_FILES, worker_env
        cfg = compose_config(["recipe=quickstart_cpu_async", "trainer.run_dir={tmp_path}",
                              "actor.loss_name=vanilla", "algorithm.adv_estimator=rloo",
                              "algorithm.rollout_correction.threshold='0.5_2.0'"])
        prepare_config(cfg)
        worker_env(), ray_init._driver_env_vars()
        import fipo_trainer.algorithms, fipo_trainer.rollout, fipo_trainer.cluster
        print("torch" in sys.modules)
    """)
    assert out.split()[-1] == "False"


def test_a_dry_run_reads_and_tokenizes_every_row_without_torch(tmp_path):
    """`fipo-train --dry-run` checks the config and every data row (tokenized, length-checked)
    but starts nothing, so it has no use for torch (1-2 s of its 3.4 s before)."""
    val = SHARED_DATA / "math-500.parquet"
    out = run_python(f"""
        import sys
        from fipo_trainer import cli
        rc = cli.dry_run(["trainer.run_dir={tmp_path}", "data.val_files=[{val}]",
                          "data.max_prompt_length=512", "actor.ppo_max_token_len_per_gpu=1024"])
        print(rc, "torch" in sys.modules)
    """)
    assert out.split()[-2:] == ["0", "False"]


def test_no_device_file_is_cpu_without_torch_and_one_asks_torch(tmp_path):
    probe = """
        import sys
        from fipo_trainer import platform
        platform.ACCELERATOR_DEVICE_FILES = ({path!r},)
        plat = platform.current_platform()
        print(plat.device_type, "torch" in sys.modules, plat.dtype)
    """
    absent = run_python(probe.format(path=str(tmp_path / "nvidiactl")))
    assert absent.split() == ["cpu", "False", "torch.float32"]  # torch only for the dtype
    present = run_python(probe.format(path=str(tmp_path)))
    import torch

    assert present.split()[:2] == ["cuda" if torch.cuda.is_available() else "cpu", "True"]


def test_a_background_import_loads_the_module_and_leaves_a_failure_to_the_caller():
    sys.modules.pop("colorsys", None)
    startup.import_in_background("no_such_module_here", "colorsys").join(30)
    assert "colorsys" in sys.modules


@pytest.fixture
def quickstart(tmp_path):
    return load_config(compose_config(["recipe=quickstart_cpu", f"trainer.run_dir={tmp_path}"]),
                       build_model=False)  # fmt: skip


def test_launch_starts_ray_while_torch_loads_and_hands_the_run_its_ray(quickstart, monkeypatch):
    import fipo_trainer.cluster.ray_init as ray_init
    import fipo_trainer.trainer.loop as loop

    seen: dict = {}
    monkeypatch.setattr(ray_init, "ray_initialized", lambda: False)
    monkeypatch.setattr(ray_init, "init_ray", lambda *a, **kw: seen.update(init=(a, kw)))
    monkeypatch.setattr(loop, "run_training", lambda cfg, owns_ray: seen.update(owns=owns_ray))
    launch.launch(quickstart)
    args, kwargs = seen["init"]
    assert args == (None, None) and kwargs["lean_head"] is True  # the quickstart's own Ray
    assert kwargs["run_dir"].is_dir()  # its session is recorded there
    assert seen["owns"] is True
    # the caller's Ray (a test's, a notebook's) is the caller's to stop
    monkeypatch.setattr(ray_init, "ray_initialized", lambda: True)
    launch.launch(quickstart)
    assert seen["owns"] is False


def test_a_run_that_may_resume_checks_its_checkpoint_before_ray_starts(tmp_path, monkeypatch):
    """Resuming, the checkpoint's checks (and a finished run's early return) come first,
    as before: the trainer starts Ray after them."""
    import fipo_trainer.cluster.ray_init as ray_init
    import fipo_trainer.trainer.loop as loop
    from fipo_trainer.trainer.checkpoint import CHECKPOINTS_DIR

    assert launch.CHECKPOINTS_DIR == CHECKPOINTS_DIR
    started, owned = [], []
    monkeypatch.setattr(ray_init, "ray_initialized", lambda: False)
    monkeypatch.setattr(ray_init, "init_ray", lambda *a, **kw: started.append(True))
    monkeypatch.setattr(loop, "run_training", lambda cfg, owns_ray: owned.append(owns_ray))
    cfg = load_config(compose_config(["recipe=quickstart_cpu", f"trainer.run_dir={tmp_path}",
                                      "trainer.resume=auto"]), build_model=False)  # fmt: skip
    launch.launch(cfg)  # nothing to resume yet
    (tmp_path / CHECKPOINTS_DIR).mkdir()
    launch.launch(cfg)
    cfg.trainer.resume = str(tmp_path / CHECKPOINTS_DIR / "global_step_5")
    launch.launch(cfg)
    assert started == [True] and owned == [True, False, False]


def test_a_launch_that_fails_before_the_run_stops_the_ray_it_started(quickstart, monkeypatch):
    import fipo_trainer.cluster.ray_init as ray_init

    class Interrupted:
        def join(self):
            raise KeyboardInterrupt

    stopped = []
    monkeypatch.setattr(ray_init, "ray_initialized", lambda: False)
    monkeypatch.setattr(ray_init, "init_ray", lambda *a, **kw: None)
    monkeypatch.setattr(ray_init, "shutdown_ray", lambda: stopped.append(True))
    monkeypatch.setattr(startup, "import_in_background", lambda *names: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        launch.launch(quickstart)
    assert stopped == [True]
