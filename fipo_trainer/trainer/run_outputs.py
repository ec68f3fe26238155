"""What a training run writes into its run directory, and keeping an earlier run's outputs
when a new run starts afresh there.

Why: a run that starts afresh (``trainer.resume=disable``, which the CPU quickstart sets, or
``auto`` finding no checkpoint) in a directory an earlier run used would truncate that
run's ``metrics.jsonl`` and, saving under ``trainer.max_ckpt_to_keep``, delete its
checkpoints, even ones of later steps. Mixed in with the new run's, they could also be
picked by a later ``trainer.resume=auto``. So the earlier outputs move, whole, to
``earlier_runs/<time>/`` first: nothing finished is lost, and each run's files stay
together. What the new run has already written (Hydra's ``.hydra/``, the log, the
synthetic data, the lock) stays.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EARLIER_RUNS_DIR = "earlier_runs"
# Everything a run writes at or after its first step, by name (tracking.METRICS_FILE,
# checkpoint.CHECKPOINTS_DIR, plot.DEFAULT_PNG, token_plot.POSITIONS_PNG,
# tracking_backends.RUN_ID_FILE, loop's HF export, the rollout dumps and tracker logs,
# timeline.TIMELINE_FILE / TIMELINE_PNG):
# tests/unit/test_run_outputs.py keeps this list in step with those modules.
RUN_OUTPUTS = (
    "metrics.jsonl",
    "checkpoints",
    "hf_model",
    "rollouts",
    "tensorboard",
    "swanlab",
    "curves.png",
    "tokens_by_position.png",
    "tracker_run_id.txt",
    "timeline.json",  # trainer.timeline_json_file's suggested name (another name stays)
    "timeline.png",
)
# Their presence means an earlier run trained here (a plot or an export alone does not).
_EVIDENCE = ("metrics.jsonl", "checkpoints")


def _now_stamp() -> str:
    """The local time, as Hydra names its sweep directories."""
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def set_aside_earlier_run(
    run_dir: str | Path, resume: str, elsewhere: str | Path | None = None
) -> Path | None:
    """Move an earlier run's outputs in ``run_dir`` to ``run_dir/earlier_runs/<time>``;
    returns that directory (None: there were none). Call it only when this run starts
    afresh (``resume``: its ``trainer.resume``), or resumes from ``elsewhere``, another
    run's checkpoint: a run resumed from its own checkpoint continues the files it finds."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).exists() for name in _EVIDENCE):
        return None
    stamp = _now_stamp()
    target = run_dir / EARLIER_RUNS_DIR / stamp
    n = 1
    while target.exists():  # two fresh starts within a second
        n += 1
        target = run_dir / EARLIER_RUNS_DIR / f"{stamp}_{n}"
    target.mkdir(parents=True)
    moved = []
    for name in RUN_OUTPUTS:
        if (run_dir / name).exists():
            (run_dir / name).rename(target / name)  # one file system: a rename, no copy
            moved.append(name)
    why = (
        f"continues another run's checkpoint ({elsewhere})"
        if elsewhere is not None
        else "found no checkpoint to resume"
        if resume == "auto"
        else "starts afresh (trainer.resume=auto would continue it)"
    )
    logger.warning(
        "%s holds an earlier run's outputs and trainer.resume=%s %s: moved %s to %s "
        "(delete it when no longer needed)",
        run_dir,
        resume,
        why,
        ", ".join(moved),
        target,
    )
    return target
