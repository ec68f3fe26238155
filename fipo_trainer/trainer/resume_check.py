"""What a resumed run must keep from the run it continues: checked before anything starts.

Why: a checkpoint stores the prompt order's position and the batches made ahead, not the
settings that made them. Resumed with another ``data.shuffle`` or ``data.seed``, the run
went on silently in another order (prompts repeated, others skipped; the checkpoint's seed
won over the one given); with another ``trainer.async_mode`` or ``max_staleness``, the
batches made ahead failed the staleness bound at the first step, after Ray, DeepSpeed and
vLLM had started, in a message that named neither the checkpoint nor the setting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fipo_trainer.trainer.checkpoint_manifest import CheckpointInvalid

logger = logging.getLogger(__name__)

#: Where a run's final Hugging Face export goes (``trainer.export_hf``).
EXPORT_DIR = "hf_model"

#: Settings the prompt order was drawn with (every checkpoint).
DATA_ORDER_KEYS = (("data", "shuffle"), ("data", "seed"))
#: Settings the batches made ahead were made under (checkpoints that hold some).
AHEAD_KEYS = (("trainer", "async_mode"), ("trainer", "max_staleness"))


def _value(config: Any, section: str, key: str) -> Any:
    part = config.get(section, {}) if isinstance(config, Mapping) else getattr(config, section)
    return part.get(key) if isinstance(part, Mapping) else getattr(part, key, None)


def resume_mismatches(state: Mapping[str, Any], cfg: Any) -> list[tuple[str, Any, Any]]:
    """``(key, saved, now)`` for each setting this run must keep but changed; a checkpoint
    saved without its config (an older release's) is not checked."""
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        return []
    keys = list(DATA_ORDER_KEYS)
    if state.get("pipeline", {}).get("ahead"):
        keys += AHEAD_KEYS
    out = []
    for section, key in keys:
        before, now = _value(saved, section, key), _value(cfg, section, key)
        if before is not None and before != now:
            out.append((f"{section}.{key}", before, now))
    return out


def check_resume_config(path: str | Path, state: Mapping[str, Any], cfg: Any) -> None:
    """Raise :class:`CheckpointInvalid` naming each changed setting, both values and the fix."""
    changed = resume_mismatches(state, cfg)
    if not changed:
        return
    ahead = len(state.get("pipeline", {}).get("ahead") or [])
    lines = []
    for key, before, now in changed:
        why = (
            f"its {ahead} batch(es) made ahead were made under it"
            if (tuple(key.split(".")) in AHEAD_KEYS)
            else "the prompt order was drawn with it"
        )
        lines.append(f"  {key}: {before!r} in the checkpoint, {now!r} now ({why})")
    keep = " ".join(f"{key}={before}" for key, before, _ in changed)
    raise CheckpointInvalid(
        f"checkpoint {path} cannot be resumed with this config:\n" + "\n".join(lines) + "\n"
        f"Resume with {keep}, or set trainer.resume=disable (or a new trainer.run_dir) to "
        "start afresh"
    )


def load_checked(path: str | Path | None, ckpt: Any, cfg: Any) -> tuple[Any, dict] | None:
    """``(path, trainer state)`` of the checkpoint to resume (``ckpt``: its
    ``CheckpointManager``), checked against ``cfg``; None when there is none."""
    if path is None:
        return None
    state = ckpt.load_trainer_state(path)
    check_resume_config(path, state, cfg)
    return path, state


def export_missing(cfg: Any, run_dir: str | Path, checkpoint: str | Path) -> bool:
    """``trainer.export_hf`` is on but ``run_dir/hf_model`` is missing or older than the last
    checkpoint: the run was stopped during its export (the full-weights gather, where a big
    model runs out of memory). Then a finished run is not done: it starts the roles again
    only to export (an export is written whole or not at all, so its age is the step's)."""
    if not getattr(cfg.trainer, "export_hf", False):
        return False
    export = Path(run_dir) / EXPORT_DIR
    if export.is_dir() and export.stat().st_mtime_ns >= Path(checkpoint).stat().st_mtime_ns:
        return False
    logger.warning(
        "%s is the run's last step but %s %s: starting the roles to export it",
        checkpoint,
        export,
        "is older than it" if export.is_dir() else "is missing",
    )
    return True
