"""A run's timeline: Ray's task events and the driver's stages in one Chrome trace file.

``trainer.timeline_json_file=timeline.json`` (verl's ``ray_kwargs.timeline_json_file``; a
relative path lands in the run directory) writes it when the run ends, also when it fails,
and ``timeline.png`` beside it (``fipo-plot --timeline``). Open the JSON in Perfetto or
``chrome://tracing``.

Why: ``timing_s/*`` says how long each stage took, not what ran at the same time. Whether
the engines wait for a weight sync while the actor updates, or the actor waits for a batch
(the async modes), shows only on one time axis: every worker's remote calls (one lane per
actor rank and rollout worker) under the driver's stages (``step_metrics.timed``).
Ray keeps the last 100k task events by default, so a long run's file covers its end.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fipo_trainer.fsutil import atomic_file

logger = logging.getLogger(__name__)
T = TypeVar("T")

TIMELINE_FILE = "timeline.json"  # the name the docs suggest for trainer.timeline_json_file
TIMELINE_PNG = "timeline.png"
DRIVER = "driver"  # the trace's process name for the driver's stages
STAGE_CATEGORY = "stage"
RAY_EVENTS_TIMEOUT_S = 20.0  # ray.timeline() takes ~1 s (it waits 1 s for events in flight)


class StageSpans:
    """The driver's stages, (name, start in epoch seconds, seconds, thread), while on.

    One per process (``STAGE_SPANS``), since ``timed`` is called from the loop and the batch
    producer's thread alike; off, ``add`` costs one attribute read.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float, str]] | None = None

    def start(self) -> None:
        self.spans = []

    def stop(self) -> list[tuple[str, float, float, str]]:
        spans, self.spans = self.spans or [], None
        return spans

    def add(self, name: str, start: float, seconds: float) -> None:
        if self.spans is not None:  # list.append is atomic: no lock across threads
            self.spans.append((name, start, seconds, threading.current_thread().name))


STAGE_SPANS = StageSpans()


def now() -> float:
    """The clock of the spans: epoch seconds, the clock of Ray's task events."""
    return time.time()


def driver_events(spans: list[tuple[str, float, float, str]]) -> list[dict[str, Any]]:
    """The stages as Chrome-trace complete events (microseconds), one lane per thread."""
    return [
        {"cat": STAGE_CATEGORY, "name": name, "pid": DRIVER, "tid": thread,
         "ts": start * 1e6, "dur": seconds * 1e6, "ph": "X"}
        for name, start, seconds, thread in spans
    ]  # fmt: skip


def own_job(events: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """The events of the workers that ran this job's calls: on a shared cluster
    ``ray.timeline()`` lists every job's (a task id ends with its job's id)."""
    tids = {e.get("tid") for e in events if str(e.get("cat", "")).startswith("task::")
            and str((e.get("args") or {}).get("task_id", "")).endswith(job_id)}  # fmt: skip
    return [e for e in events if e.get("tid") in tids]


def call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()`` in a daemon thread: its result or its error, or TimeoutError after
    ``timeout_s``. A call that never returns is left behind; as a daemon it never keeps the
    process from exiting (a thread pool's workers would: they are joined at exit)."""
    found: list[Any] = []

    def call() -> None:
        try:
            found.append(fn())
        except BaseException as err:  # raised in the caller's thread below
            found.append(err)

    thread = threading.Thread(target=call, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not found:
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
    if isinstance(found[0], BaseException):
        raise found[0]
    return found[0]


def ray_events(timeout_s: float) -> list[dict[str, Any]]:
    """This job's task events (none without Ray), with a deadline: a run stopped by Ctrl-C
    or a failure writes its trace first, and an unresponsive GCS must not keep it from
    stopping its workers."""
    import ray

    if not ray.is_initialized():
        return []
    job = ray.get_runtime_context().get_job_id()
    return own_job(list(call_with_deadline(ray.timeline, timeout_s, "ray.timeline()")), job)


class RunTimeline:
    """``trainer.timeline_json_file`` for one run: records from construction, ``write()``
    while Ray is still up, ``plot()`` after."""

    def __init__(self, trainer_cfg: Any, run_dir: Path) -> None:
        name = getattr(trainer_cfg, "timeline_json_file", None)
        self.path: Path | None = None
        if name:
            path = Path(str(name)).expanduser()
            self.path = path if path.is_absolute() else Path(run_dir) / path
            STAGE_SPANS.start()
        else:
            STAGE_SPANS.stop()

    def write(self) -> Path | None:
        """Ray's task events + the driver's stages to the file; a failure only warns (the
        run's own outcome matters more than its trace)."""
        if self.path is None:
            return None
        spans = STAGE_SPANS.stop()
        try:
            events = ray_events(RAY_EVENTS_TIMEOUT_S)
            with atomic_file(self.path) as f:
                json.dump(events + driver_events(spans), f)
        except Exception as err:  # a trace must never fail the run
            logger.warning("could not write the timeline %s: %s", self.path, err)
            return None
        logger.info("timeline: %s (Perfetto / chrome://tracing)", self.path)
        return self.path

    def plot(self) -> Path | None:
        """``timeline.png`` beside the file, when it was written."""
        if self.path is None or not self.path.is_file():
            return None
        from fipo_trainer.trainer.timeline_plot import plot_timeline

        try:
            return plot_timeline(self.path, self.path.with_name(TIMELINE_PNG))
        except ValueError as err:  # e.g. a run that ended before any remote call
            logger.warning("no timeline plot: %s", err)
            return None
