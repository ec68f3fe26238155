"""Per-token values of a few sampled responses, taken from the loss during the update.

Why: FIPO acts token by token (Future-KL, influence weights, dual clip, dropped
responses) and the step's metrics average all of that away. On rollout-dump steps the
driver names a handful of rows; while the update runs, each micro-batch that holds one of
them hands its loss's ``PolicyLossTerms.token_stats`` here, and a later mini-batch (or
epoch) that sees the row again overwrites it, so what is kept is the last update that saw
each token. Nothing runs for micro-batches without a named row.

Under sequence parallel a rank's statistics are valid on its own columns only; the
values are zeroed elsewhere and summed over the group (one all-gather per micro-batch that
holds a named row), so every rank of the group ends with the whole rows' values, equal to
the unsharded ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fipo_trainer.algorithms.sequence_shards import SequenceShards

# token_stats key of a loss -> name in the record. A loss without a key records null.
FLOAT_FIELDS = {"ratio": "ratio", "future_kl": "future_kl", "influence_weights": "influence_weight"}
FLAG_FIELDS = {"clipped": "clipped", "dual_clipped": "dual_clipped"}
ROW_FLAGS = {"dropped": "dropped"}  # one value per response (FIPO's sequence invalidation)
RECORD_FIELDS = (*FLOAT_FIELDS.values(), *FLAG_FIELDS.values(), *ROW_FLAGS.values())


class TokenRecorder:
    """Collects the per-token values of the local rows ``rows`` during one update."""

    def __init__(self, rows: Iterable[int] = ()) -> None:
        self.rows = {int(r) for r in rows}
        self._records: dict[int, dict[str, Any]] = {}

    def observe(
        self,
        idx: torch.Tensor,
        step: int,
        stats: Mapping[str, torch.Tensor],
        response_mask: torch.Tensor,
        shards: SequenceShards | None = None,
    ) -> None:
        """Record the named rows among ``idx`` (this micro-batch's local rows, in order).

        ``stats``: the loss's ``token_stats`` [m, L]; ``response_mask``: the rows' whole
        response mask [m, L] (not restricted to a shard); ``step``: the optimizer step
        (mini-batch) of this update, 0-based across epochs."""
        if not self.rows:
            return
        hit = [j for j, row in enumerate(idx.tolist()) if row in self.rows]
        if not hit:  # the same on every rank of a sequence-parallel group (same rows)
            return
        pick = torch.tensor(hit, dtype=torch.long, device=response_mask.device)
        keys = [k for k in (*FLOAT_FIELDS, *FLAG_FIELDS, *ROW_FLAGS) if k in stats]
        width = response_mask.shape[1]
        values = torch.zeros(0, len(hit), width, dtype=torch.float64, device=pick.device)
        if keys:
            values = torch.stack([stats[k].detach()[pick].double() for k in keys])
            if shards is not None:
                owned = shards.owned(width)[pick]
                values = shards.sum(torch.where(owned, values, torch.zeros_like(values)))
        values = values.cpu()
        mask = response_mask.detach()[pick].bool().cpu()
        rows = idx.tolist()
        for n, j in enumerate(hit):
            tokens = values[:, n][:, mask[n]]
            record: dict[str, Any] = {"mini_batch": int(step), **dict.fromkeys(RECORD_FIELDS)}
            for key, column in zip(keys, tokens):
                if key in FLOAT_FIELDS:
                    record[FLOAT_FIELDS[key]] = column.tolist()
                elif key in FLAG_FIELDS:
                    record[FLAG_FIELDS[key]] = (column != 0).tolist()
                else:
                    record[ROW_FLAGS[key]] = bool((column != 0).any())
            self._records[int(rows[j])] = record

    def records(self) -> dict[int, dict[str, Any]]:
        """``{local row: {"mini_batch", "ratio", "future_kl", "influence_weight", "clipped",
        "dual_clipped", "dropped"}}``: lists over the row's response tokens, null where the
        loss gave no such value."""
        return dict(self._records)
