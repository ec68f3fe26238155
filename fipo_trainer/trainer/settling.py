"""When a batch being made needs no more generation rounds: ``one_step`` lets the weight
sync in then, not once the batch is assembled.

In ``one_step`` the sync after update k must not reach the engines before batch k+1's last
round: that round is made with the weights before. A rollout worker runs a caller's calls
in the order they were submitted, so the sync may be *submitted* as soon as the last round
is, and its load then runs right after that round's generation, while the driver still
grades and assembles the batch. A round is known to be the last:
- at once (right after its calls are submitted) when it is the last allowed
  (``algorithm.filter_groups.max_num_gen_batches``) or dynamic sampling is off;
- otherwise at the verdicts that give its whole groups ``needed`` kept ones (metric
  ``acc``: a score's overlong shaping is only known at the end of grading).
Dynamic sampling then keeps at least those groups, so no round follows (a round that did
follow would run on the new weights: ``Sampler.collect`` raises instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

#: After a part arrives, the waits for the next one after which the verdicts in so far are
#: read (a part's DAPO-rule grading takes ~2 ms), while a proof may be in those verdicts.
SETTLE_TICKS_S = (0.002, 0.003, 0.005, 0.01)


def group_varies(values: Sequence[Any]) -> bool:
    """Whether dynamic sampling keeps a group with these metric values (non-zero std)."""
    return len(values) > 1 and float(np.asarray([float(v) for v in values]).std()) > 0


class KeptGroupTally:
    """The groups of a round that dynamic sampling (metric ``acc``) keeps, counted as their
    items' final verdicts arrive (item i of a round belongs to group ``i // n``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.kept = self.whole = 0
        self._acc: dict[int, list[bool]] = {}

    def add(self, indices: Iterable[int], acc: Sequence[bool]) -> None:
        for i in indices:
            group = self._acc.setdefault(i // self.n, [])
            group.append(acc[i])
            if len(group) == self.n:
                self.whole += 1
                self.kept += group_varies(group)


class BatchSettling:
    """One batch: calls ``on_settled`` once, when a round is proven its last."""

    def __init__(self, on_settled: Callable[[], None], n: int) -> None:
        self.on_settled, self.n, self.done = on_settled, n, False

    def round(self, last: bool, needed: int, metric: str) -> RoundWatch:
        tally = None if last or metric != "acc" else KeptGroupTally(self.n)
        return RoundWatch(self, last, tally, needed)

    def settle(self) -> None:
        if not self.done:
            self.done = True
            self.on_settled()


class RoundWatch:
    """One round's view for ``Sampler.generate_and_grade``: ``progress`` takes the grader's
    verdicts (``RewardPool.grade_stream``), ``arrived`` counts the responses generated,
    ``ticks`` tells the stream when to look at the verdicts between parts: only while the
    groups generated but not graded whole could still settle the batch."""

    def __init__(
        self, batch: BatchSettling, last: bool, tally: KeptGroupTally | None, needed: int
    ) -> None:
        self.batch, self.last, self.tally, self.needed = batch, last, tally, needed
        self.arrived_groups = 0

    def progress(self, indices: list[int], acc: Sequence[bool]) -> None:
        if self.tally is not None:
            self.tally.add(indices, acc)
        if self.last or (self.tally is not None and self.tally.kept >= self.needed):
            self.batch.settle()

    def arrived(self, responses: int) -> None:
        self.arrived_groups += responses // self.batch.n

    def ticks(self) -> Sequence[float]:
        t = self.tally
        if self.batch.done or t is None or t.kept + self.arrived_groups - t.whole < self.needed:
            return ()
        return SETTLE_TICKS_S
