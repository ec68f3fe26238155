"""The actor worker's half of the colocated weight sync (``cluster.shared_weight_sync``).

A mixin of ``DeepSpeedActorWorker``: every rank packs the full weights, a bucket at a time
(``actor.weight_stream.packed_full_weights``), and hands each bucket to the rollout engine
rank on its own device as a shareable handle.
"""

from __future__ import annotations

from typing import Any

from fipo_trainer.actor.weight_stream import DEFAULT_BUCKET_BYTES, packed_full_weights
from fipo_trainer.cluster.shared_weight_sync import SharedWeightsSource
from fipo_trainer.cluster.shared_weights import SharedWeightsSender


class SharedWeightsSourceMixin(SharedWeightsSource):
    """Needs ``self.engine`` (``actor.engine.DeepSpeedEngine``)."""

    engine: Any
    _shared_sender: SharedWeightsSender | None = None
    _shared_paired = False

    def connect_shared_weights(
        self, address: tuple[str, bytes] | None, timeout_s: float = 300.0
    ) -> None:
        if self._shared_sender is not None:
            self._shared_sender.close()
        self._shared_sender = None if address is None else SharedWeightsSender(*address, timeout_s)
        self._shared_paired = True

    def send_shared_weights(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, float]:
        """Every rank must call it (ZeRO-3 gathers); a rank with no engine rank returns {}."""
        if not self._shared_paired:
            raise RuntimeError("send_shared_weights() before connect_shared_weights()")
        sender = self._shared_sender
        buckets = packed_full_weights(self.engine, bucket_bytes, keep=sender is not None)
        if sender is None:
            for _ in buckets:
                pass
            return {}
        return sender.send(buckets, self.engine.device)
