"""How many of a rollout worker's forked engines a training batch is generated on: the count
whose recent batches came fastest, measured (``rollout.engine_spread=auto``).

Why measured, not fixed: on a 2-core machine a second engine shortens generation only while
the actor's rank leaves a core free. When the rank bounds the step (one generation round per
update, as in the like-for-like bench) the second engine adds a process on the rank's cores:
generation is no faster and the update slows, 0.34 s a step against 0.25 s on one engine.
With several dynamic-sampling rounds per step, generation bounds it and two engines win
(0.43 s against 0.56 s). Which case a run is in depends on its data, model and cores, so the
chooser tries each count for a few batches, keeps the fastest, and tries again now and then.

The measure is the time from one batch's end to the next's (the pipeline's period, waits
included): what a step costs with that count. A run's batches change as it learns (a sharper
policy needs more dynamic-sampling rounds: a step on one engine went from 0.55 to 1.05 s
between steps 200 and 240 of a quickstart run), so when the chosen count's recent batches
grow slower than another count was measured, that count is tried again at once. The first batch of each block is dropped (it
still pays for the block before it). Pure Python: the sampler owns one and calls
:meth:`choose` before a batch and :meth:`record` after it. It is not checkpointed: a seeded
call samples the same tokens on any number of engines, so the choice changes how fast a run
goes, never what it trains on, and a resumed run simply measures again.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence


class EngineSpread:
    """A schedule of blocks of batches: first ``warmup`` on the largest count (unmeasured:
    the first steps compile, allocate and validate), then ``trial`` batches on each count,
    then the fastest count for ``revisit`` batches, then every other count again, and so on.
    Each trial that keeps the same count doubles the wait before the next (up to
    ``max_revisit``): a settled run spends ever fewer batches on the slower count. When the
    chosen count's median grows more than ``drift`` (a fraction) above another count's, the
    others are tried at once and the wait starts again from ``revisit``.
    """

    def __init__(
        self,
        counts: Sequence[int],
        *,
        trial: int = 4,
        revisit: int = 50,
        max_revisit: int = 400,
        warmup: int = 2,
        drift: float = 0.2,
    ) -> None:
        if not counts or min(counts) < 1:
            raise ValueError(f"engine counts must be >= 1, got {list(counts)}")
        if trial < 2 or revisit < 1 or warmup < 0:
            raise ValueError("trial must be >= 2 (its first batch is dropped), revisit >= 1")
        if drift <= 0:
            raise ValueError(f"drift must be > 0, got {drift}")
        self.drift = drift
        self.counts = tuple(sorted(set(counts), reverse=True))
        self.trial, self.revisit = trial, revisit
        self._base_revisit, self._max_revisit = revisit, max(revisit, max_revisit)
        self.samples = {c: deque(maxlen=trial - 1) for c in self.counts}
        self.best = self.counts[0]
        self.switches = 0  # times the chosen count changed after a trial
        self._exploited = 0  # batches on the chosen count since the last trial
        self._tried_before = False  # the first pick sets no wait
        # (count, measured) per batch to come; after a block on a count its first is dropped
        self._plan: deque[tuple[int, bool]] = deque([(self.best, False)] * warmup)
        self._plan += self._trials(self.counts)

    def _trials(self, counts: Sequence[int]) -> list[tuple[int, bool]]:
        plan: list[tuple[int, bool]] = []
        for count in counts:
            plan += [(count, False)] + [(count, True)] * (self.trial - 1)
        return plan

    def choose(self) -> int:
        """The engine count for the next batch."""
        return self._plan[0][0] if self._plan else self.best

    def record(self, count: int, seconds: float | None) -> None:
        """The batch made on ``count`` engines took ``seconds`` since the previous one
        (None: there was no previous one)."""
        if self._plan:
            planned, measured = self._plan.popleft()
            if planned != count:
                raise ValueError(f"recorded a batch on {count} engines; {planned} were planned")
            if measured and seconds is not None:
                self.samples[count].append(seconds)
            if not self._plan:
                self._pick()
            return
        if seconds is not None:  # the chosen count's figure stays current
            self.samples[count].append(seconds)
        self._exploited += 1
        if self._drifted():
            self.revisit = self._base_revisit
        elif self._exploited < self.revisit:
            return
        self._plan += self._trials([c for c in self.counts if c != self.best])

    def _drifted(self) -> bool:
        """The chosen count's batches since the last pick are slower than another count's."""
        mine = self.samples[self.best]
        if self._exploited < mine.maxlen:  # its median still holds batches from before
            return False
        others = [statistics.median(s) for c, s in self.samples.items() if s and c != self.best]
        return bool(others) and statistics.median(mine) > (1 + self.drift) * min(others)

    def _pick(self) -> None:
        timed = {c: statistics.median(s) for c, s in self.samples.items() if s}
        best = min(timed, key=lambda c: (timed[c], -c)) if timed else self.best
        if best != self.best:
            self.switches += 1
            self.revisit = self._base_revisit
        elif self._tried_before:
            self.revisit = min(2 * self.revisit, self._max_revisit)
        self._tried_before = True
        self.best = best
        self._exploited = 0

    def metrics(self) -> dict[str, float]:
        """``rollout/engine_spread_*``: the count chosen and each count's median seconds."""
        out = {"rollout/engine_spread_best": float(self.best)}
        for count, s in self.samples.items():
            if s:
                out[f"rollout/engine_spread_s_{count}"] = statistics.median(s)
        return out
