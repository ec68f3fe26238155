"""``EngineTurn``: the engines and the grader between the training loop and the batch
producer thread that runs beside it (``trainer/pipeline.py``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class EngineTurn:
    """Who drives the engines and the grader now: the producer between its calls, or the
    trainer (sync, validation), which goes first whenever it waits. A producer whose batch
    is settled (``settle``: every call it still needs is submitted) lets a sync in beside
    it: a rollout worker runs the sync's load after those calls."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._producer = self._trainer = self._settled = False
        self._trainer_waiting = 0
        self._kept = 0  # places kept by ``trainer(keep_place=True)``, counted as waiting

    def trainer(
        self, keep_place: bool = False, *, sync: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """The trainer's turn; ``keep_place``: its next turn, too, comes before the producer's
        (a validation right after a sync); ``sync``: a weight sync, which a settled producer
        lets in."""
        free = lambda: not self._producer or (sync and self._settled)  # noqa: E731
        return self._holding(free, trainer=True, keep_place=keep_place)

    def producer(self) -> contextlib.AbstractContextManager[None]:
        return self._holding(lambda: not self._producer and not self._trainer_waiting)

    def settle(self) -> None:
        """The producer's batch needs no more engine calls than those it submitted."""
        with self._cond:
            self._settled = self._producer
            self._cond.notify_all()

    def wait_unsettled(self) -> None:
        """Until a producer that let a sync in has made its batch (the sync's calls run
        after that batch's on the rollout workers)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._settled)

    def give_up_kept_places(self) -> None:
        """The run ends (or failed) between a kept place and its turn: let the producer go."""
        with self._cond:
            self._trainer_waiting -= self._kept
            self._kept = 0
            self._cond.notify_all()

    @contextlib.contextmanager
    def _holding(
        self, free: Any, trainer: bool = False, keep_place: bool = False
    ) -> Iterator[None]:
        with self._cond:
            kept = trainer and self._kept > 0  # already counted as waiting
            self._kept -= kept
            self._trainer_waiting += trainer and not kept
            self._cond.wait_for(lambda: not self._trainer and free())
            self._trainer_waiting -= trainer
            self._trainer |= trainer
            self._producer |= not trainer
        try:
            yield
        finally:
            with self._cond:
                if trainer:
                    self._trainer = False
                else:
                    self._producer = self._settled = False
                self._kept += keep_place
                self._trainer_waiting += keep_place
                self._cond.notify_all()
