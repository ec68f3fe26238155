"""``fipo-train``'s run after its config is validated: Ray starts while torch loads.

Why: a driver imports torch (1.5-2 s on a 2-core VM) and starts Ray (≈ 2.5 s, most of it
waiting on the GCS, raylet and agents it spawns); one after the other they were the
driver's part of the quickstart's start-up. Neither needs the other: the config is
validated without torch (``algorithms.options``, ``platform``), and torch loads in a thread
while ``ray.init`` runs in the main thread (Ray must start there). The run then goes on as
``run_training``, which stops the Ray started here. Nothing in this module imports torch.

Only a run that starts afresh does so (``trainer.resume=disable``, or ``auto`` with no
checkpoints directory): one that may resume keeps the order it had, so its checkpoint is
checked, and a run found finished returns, before Ray starts (``RLTrainer.prepare_resume``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fipo_trainer.trainer.config import TrainConfig
    from fipo_trainer.trainer.summary import TrainResult


CHECKPOINTS_DIR = "checkpoints"  # trainer.checkpoint.CHECKPOINTS_DIR, whose module needs torch


def starts_afresh(cfg: TrainConfig) -> bool:
    """Whether the run has no checkpoint to resume: nothing to check before Ray starts."""
    resume = str(cfg.trainer.resume)
    if resume == "auto":
        return not (Path(cfg.trainer.run_dir) / CHECKPOINTS_DIR).exists()
    return resume == "disable"  # else a checkpoint path


def start_ray(cfg: TrainConfig) -> bool:
    """Start (or join) the run's Ray as ``resources`` say, unless this process is connected
    already; whether this call connected it (the run then stops it at its end)."""
    from fipo_trainer.cluster.ray_init import init_ray, ray_initialized

    if ray_initialized():
        return False
    res = cfg.resources
    run_dir = Path(cfg.trainer.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)  # init_ray records its session there
    init_ray(res.ray_address, res.ray_num_cpus, run_dir=run_dir, lean_head=res.ray_lean_head)
    return True


def launch(cfg: TrainConfig) -> TrainResult:
    """Run a whole training job from a validated config; one that starts afresh starts Ray
    while torch loads."""
    from fipo_trainer.cluster.ray_init import shutdown_ray
    from fipo_trainer.startup import import_in_background

    owns_ray = False
    try:
        if starts_afresh(cfg):
            importing = import_in_background("torch")
            owns_ray = start_ray(cfg)
            importing.join()
        from fipo_trainer.trainer.loop import run_training
    except BaseException:
        if owns_ray:
            shutdown_ray()
        raise
    return run_training(cfg, owns_ray=owns_ray)


def one_line_errors() -> tuple[type[Exception], tuple[type[Exception], ...]]:
    """(the error of a run stopped on purpose, every error whose message is the whole story:
    what, where, the fix), imported when one is raised."""
    from fipo_trainer.cluster.ray_init import RayUnreachable
    from fipo_trainer.data.records import DataError
    from fipo_trainer.fsutil import RunDirUnusable
    from fipo_trainer.trainer.checkpoint_manifest import CheckpointInvalid
    from fipo_trainer.trainer.sampling import TrainingStopped

    one_line = (CheckpointInvalid, DataError, RayUnreachable, RunDirUnusable, TrainingStopped)
    return TrainingStopped, one_line
