"""A resumable index sampler: a fresh seeded permutation per epoch, exact on resume.

Why its own module: the sampler is pure index bookkeeping (no files, no tokenizer); the
loop's prompt source (:mod:`fipo_trainer.trainer.data_source`) puts it over a dataset, and
its ``(epoch, position, seed)`` state is what a checkpoint stores.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ResumableSampler"]


class ResumableSampler:
    """Infinite stream of row indices: a fresh seeded permutation per epoch.

    The state is only ``(epoch, position, seed)`` and the order is a pure function of it,
    so a sampler restored from ``state_dict()`` continues with exactly the same indices,
    also when the state was saved right at an epoch boundary.
    """

    def __init__(
        self, num_rows: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True
    ) -> None:
        if num_rows < 1:
            raise ValueError(f"sampler needs at least one row, got {num_rows}")
        self.num_rows, self.shuffle, self.seed, self.drop_last = num_rows, shuffle, seed, drop_last
        self.epoch, self.position = 0, 0
        self._perm_epoch: int | None = None
        self._perm = np.arange(num_rows)

    def order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self, size: int) -> list[int]:
        """The next ``size`` indices; starts a new epoch when the current one cannot fill them
        (``drop_last``) or is used up (otherwise, the last batch of an epoch may be short)."""
        if not 1 <= size <= self.num_rows:
            raise ValueError(f"batch size must be in 1..{self.num_rows} (dataset rows), got {size}")
        remaining = self.num_rows - self.position
        if remaining <= 0 or (self.drop_last and remaining < size):
            self.epoch += 1
            self.position = 0
        take = min(size, self.num_rows - self.position)
        out = self.order(self.epoch)[self.position : self.position + take]
        self.position += take
        return [int(i) for i in out]

    def state_dict(self) -> dict[str, int]:
        """Plain ``int`` values only (never numpy scalars), so that a checkpoint holding it
        loads with ``torch.load(weights_only=True)``."""
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "num_rows": int(self.num_rows),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_rows", self.num_rows) != self.num_rows:
            from fipo_trainer.data.records import DataError  # the CLI prints it in one line

            raise DataError(
                f"the checkpoint's sampler state is for {state['num_rows']} prompts but the "
                f"training data now has {self.num_rows}: resume with the same data.train_files "
                "and data filters, or set trainer.resume=disable to start afresh"
            )
        self.epoch, self.position, self.seed = (
            int(state["epoch"]),
            int(state["position"]),
            int(state["seed"]),
        )
        self._perm_epoch = None  # an order drawn under the old seed is not this state's
