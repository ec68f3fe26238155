"""Bucketed weight broadcast over a real gloo group (threads stand in for processes)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fipo_trainer.cluster.weight_sync import (
    SyncStats,
    WeightSyncReceiver,
    WeightSyncSender,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 5, generator=g)),
        ("b.bias", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("c.big", torch.randn(64, 33, generator=g)),  # > bucket on its own
        ("d.count", torch.arange(5, dtype=torch.int64)),
        ("e.mask", torch.tensor([True, False, True])),
        ("f.half", torch.randn(2, 3, 1, generator=g).half()),
        ("g.transposed", torch.randn(4, 6, generator=g).t()),  # non-contiguous
    ]


def test_plan_buckets_respects_budget_and_order():
    weights = _weights()
    buckets = list(plan_buckets(weights, bucket_bytes=256))
    names = [n for b in buckets for n, _ in b]
    assert names == [n for n, _ in weights]
    for b in buckets:
        total = sum((t.numel() * t.element_size() + 15) // 16 * 16 for _, t in b)
        assert total <= 256 or len(b) == 1
    assert [n for n, _ in buckets[1]] == ["c.big"]  # too big: alone


def test_plan_buckets_rejects_bad_input():
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(plan_buckets(_weights(), 0))
    with pytest.raises(TypeError, match=r"x\.weight"):
        list(plan_buckets([("x.weight", [1.0, 2.0])], 64))
    with pytest.raises(ValueError, match="complex"):
        list(plan_buckets([("z", torch.zeros(2, dtype=torch.complex64))], 64))


def test_pack_unpack_roundtrip_all_dtypes():
    weights = _weights()
    metas, flat = pack_bucket(weights, torch.device("cpu"))
    assert flat.dtype == torch.uint8 and all(m.offset % 16 == 0 for m in metas)
    out = list(unpack_bucket(metas, flat))
    assert [n for n, _ in out] == [n for n, _ in weights]
    for (_, a), (_, b) in zip(weights, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _run_sync(
    world: int,
    bucket_bytes: int,
    rounds: int = 2,
    timeout_s: float = 30,
    late_s: float = 0.0,
    weights=_weights,
):
    """``late_s``: each receiver begins each receive that long after the sender's send."""
    sender = WeightSyncSender(world, host="127.0.0.1", port=0, timeout_s=timeout_s, connect=False)
    received: dict[int, list] = {r: [] for r in range(1, world)}
    receivers: dict[int, WeightSyncReceiver] = {}
    errors: list[BaseException] = []

    def receiver_main(rank: int):
        try:
            rcv = WeightSyncReceiver("127.0.0.1", sender.port, world, rank, timeout_s=timeout_s)
            receivers[rank] = rcv
            for _ in range(rounds):
                time.sleep(late_s)
                # clone: views die with their bucket buffer only when the consumer drops them
                received[rank].append([(n, t.clone()) for n, t in rcv.receive()])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=receiver_main, args=(r,)) for r in range(1, world)]
    for t in threads:
        t.start()
    sender.connect()
    stats = [sender.send(weights(), bucket_bytes=bucket_bytes) for _ in range(rounds)]
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return sender, receivers, received, stats


def test_broadcast_to_two_receivers_in_buckets():
    sender, receivers, received, stats = _run_sync(world=3, bucket_bytes=256)
    expected = _weights()
    payload = sum(t.numel() * t.element_size() for _, t in expected)
    for s in stats:
        assert isinstance(s, SyncStats)
        assert s.bytes == payload and s.tensors == len(expected) and s.buckets >= 3
        assert s.metrics()["sync/bytes"] == float(payload)
    for rank, rounds in received.items():
        assert receivers[rank].last_stats.bytes == payload
        for got in rounds:
            assert [n for n, _ in got] == [n for n, _ in expected]
            for (_, a), (_, b) in zip(expected, got):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    sender.close()
    for r in receivers.values():
        r.close()


def test_single_bucket_when_budget_is_large():
    _, _, received, stats = _run_sync(world=2, bucket_bytes=1 << 20, rounds=1)
    assert stats[0].buckets == 1
    assert len(received[1][0]) == len(_weights())


def test_the_sender_waits_for_receivers_that_begin_later_than_a_collective_may_wait():
    """one_step submits a sync while the rollout workers still finish a round: the send
    must not enter a collective (gloo's timeout: 1 s here) before every receiver begins."""
    big = [("w", torch.ones(64 << 20, dtype=torch.uint8))]  # more than a socket buffers
    start = time.monotonic()
    _, _, received, stats = _run_sync(
        world=2, bucket_bytes=1 << 30, timeout_s=1.0, late_s=1.5, weights=lambda: big
    )
    assert time.monotonic() - start >= 3.0
    assert all(len(r) == 2 and torch.equal(r[1][0][1], big[0][1])
               for r in received.values())  # fmt: skip
    assert all(s.seconds < 1.0 for s in stats)  # the transfer, not the wait


def test_receiver_without_sender_fails_with_clear_message():
    sender = WeightSyncSender(2, host="127.0.0.1", port=0, timeout_s=2, connect=False)
    with pytest.raises(RuntimeError, match="did not form within 2s"):
        WeightSyncReceiver("127.0.0.1", sender.port, 2, 1, timeout_s=2)


def test_rank_and_world_validation():
    with pytest.raises(ValueError, match="rank 0 is the sender"):
        WeightSyncReceiver("127.0.0.1", 1, 2, 0)
    with pytest.raises(ValueError, match="world_size"):
        WeightSyncReceiver("127.0.0.1", 1, 1, 1)
