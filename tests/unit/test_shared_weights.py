"""Colocated weight sync sockets (``cluster.shared_weights``) with real sockets, one process.

Why: a rollout worker whose actor rank never connects used to block in ``accept()`` for
good and could not serve a shutdown; accept now gives up after the receiver's timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError

import pytest
import torch

from fipo_trainer.cluster.shared_weights import SharedWeightsReceiver, SharedWeightsSender
from fipo_trainer.cluster.weight_bucket import TensorMeta, aligned_nbytes
from fipo_trainer.platform import current_platform

pytestmark = pytest.mark.timeout(30)


def _bucket(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorMeta], torch.Tensor]:
    """One shareable flat buffer holding ``tensors`` (what the actor rank sends)."""
    metas, offset = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        metas.append(TensorMeta(name, str(t.dtype), tuple(t.shape), offset, nbytes))
        offset += aligned_nbytes(nbytes)
    flat = current_platform().shareable_buffer(offset, torch.device("cpu"))
    for m, t in zip(metas, tensors.values()):
        flat[m.offset : m.offset + m.nbytes].copy_(t.reshape(-1).view(torch.uint8))
    return metas, flat


def _accept_in_thread(receiver: SharedWeightsReceiver) -> tuple[threading.Thread, list]:
    """Run ``receiver.accept()`` in a thread; the list gets None or the error it raised."""
    outcome: list[BaseException | None] = []

    def accept() -> None:
        try:
            receiver.accept()
            outcome.append(None)
        except BaseException as err:  # reported to the test thread
            outcome.append(err)

    thread = threading.Thread(target=accept)
    thread.start()
    return thread, outcome


@pytest.mark.timeout(10)  # the old accept() never returned: fail fast instead of hanging
def test_accept_without_a_peer_raises_after_the_timeout():
    receiver = SharedWeightsReceiver(timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        receiver.accept()
    waited = time.monotonic() - start
    assert 0.4 <= waited < 5.0
    message = str(info.value)
    assert receiver.path in message and "actor rank" in message and "within 0.5s" in message
    assert not os.path.exists(receiver.path)  # nobody can connect to a given-up receiver
    receiver.close()  # still safe


def test_connect_send_receive_round_trip():
    receiver = SharedWeightsReceiver(timeout_s=10.0)
    waiter, accepted = _accept_in_thread(receiver)
    sender = SharedWeightsSender(*receiver.address(), timeout_s=10.0)
    waiter.join(10.0)
    assert accepted == [None]

    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int8)}
    sent: dict[str, float] = {}
    sending = threading.Thread(
        target=lambda: sent.update(sender.send([_bucket(weights)], torch.device("cpu")))
    )
    sending.start()
    got = {name: t.clone() for name, t in receiver.receive()}
    sending.join(10.0)
    assert set(got) == set(weights)
    for name, t in weights.items():
        assert torch.equal(got[name], t), name
    assert receiver.last_stats.buckets == 1 and sent["sync/buckets"] == 1.0
    sender.close()
    receiver.close()


def test_a_peer_with_the_wrong_authkey_is_refused():
    receiver = SharedWeightsReceiver(timeout_s=10.0)
    waiter, errors = _accept_in_thread(receiver)
    with pytest.raises(AuthenticationError):
        SharedWeightsSender(receiver.path, b"not the key", timeout_s=10.0)
    waiter.join(10.0)
    assert len(errors) == 1 and isinstance(errors[0], AuthenticationError)
    receiver.close()


def test_a_peer_that_connects_and_never_answers_the_challenge_times_out():
    """A process that connected and then hung (or was not the actor rank) held the rollout
    worker in the authentication handshake for good: the deadline ended with the accept."""
    import socket

    receiver = SharedWeightsReceiver(timeout_s=0.5)
    waiter, outcome = _accept_in_thread(receiver)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.connect(receiver.path)  # connects, reads nothing, answers nothing
    waiter.join(5.0)
    assert not waiter.is_alive(), "accept() still waits for the handshake"
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    message = str(outcome[0])
    assert "handshake" in message and "0.5s" in message
    mute.close()
    receiver.close()


def test_a_receiver_never_accepted_leaves_no_socket_file():
    """multiprocessing's Listener removed its socket file at exit; the plain socket that
    replaced it (for accept's timeout) left one in /tmp per worker that never synced."""
    code = (
        "from fipo_trainer.cluster.shared_weights import SharedWeightsReceiver\n"
        "r = SharedWeightsReceiver(5.0)\n"
        "print(r.path, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path and not os.path.exists(path)
