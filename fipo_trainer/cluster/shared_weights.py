"""Same-device weight sync (colocated placement): handles, never a second copy of the model.

Actor rank i and the rollout TP rank on the same device (bundle i) talk over a Unix-domain
socket on their node (``multiprocessing.connection`` with a random authkey; nothing listens
on the network). For each bucket the actor packs the full weights into one flat buffer on
its device and sends the buffer's *handle* — torch's multiprocessing reduction: a CUDA IPC
handle on GPU, a shared-memory file on CPU (``Platform.shareable_buffer``), one code path for
both. The rollout worker maps the same memory, hands views of it to its engine's weight
loading (each TP rank copies only its own slice into its parameters) and acknowledges; only
then does the actor build the next bucket. So at most one bucket exists besides the model.

Use: ``SharedWeightsReceiver()`` listens and publishes ``address()`` (path, authkey); then
``accept()`` and the sender's ``SharedWeightsSender(path, authkey)`` run concurrently, each
giving up after its ``timeout_s``; per sync the sender calls ``send(buckets)`` while the
receiver iterates ``receive()``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge

import torch
import torch.multiprocessing  # registers the tensor reductions Connection.send uses

from fipo_trainer.cluster.weight_bucket import SyncStats, TensorMeta, unpack_bucket
from fipo_trainer.platform import current_platform

_BUCKET, _END = "bucket", "end"
_ACK = "ack"


class PeakMemory:
    """Peak extra memory of this process while the block runs (what a sync costs).

    CUDA: the caching allocator's peak minus the start. CPU: resident memory sampled every
    0.2 ms by a thread, minus the start (shared-memory pages this process wrote count).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_extra = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        plat = current_platform()
        if plat.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._base = plat.memory_in_use(self.device)
        self._peak = self._base
        if not plat.is_cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        plat = current_platform()
        while not self._stop.is_set():
            self._peak = max(self._peak, plat.memory_in_use(self.device))
            time.sleep(0.0002)

    def __exit__(self, *exc: object) -> None:
        plat = current_platform()
        if plat.is_cuda:
            torch.cuda.synchronize(self.device)
            self._peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
        self.peak_extra = max(0, self._peak - self._base)


def _remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _socket_path() -> str:
    # AF_UNIX paths are limited to ~107 bytes: a short name in the temp dir.
    return os.path.join(tempfile.gettempdir(), f"fipo-w-{secrets.token_hex(6)}.sock")


class SharedWeightsReceiver:
    """The rollout side (one per rollout TP rank with a colocated actor rank)."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self.authkey = secrets.token_bytes(16)
        self.path = _socket_path()
        # A plain socket, not multiprocessing's Listener: its accept() takes no timeout.
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        # As multiprocessing's Listener did: the socket file goes at exit even if never accepted.
        weakref.finalize(self, _remove_file, self.path)
        self._conn: Connection | None = None
        self.last_stats = SyncStats()

    def address(self) -> tuple[str, bytes]:
        return self.path, self.authkey

    def accept(self) -> None:
        """Wait up to ``timeout_s`` for the colocated actor rank (it connects concurrently).

        Why a deadline: an actor rank that never connects (it failed, or sits on another
        node) would otherwise block this worker for good, deaf to a graceful shutdown.
        """
        self._listener.settimeout(self.timeout_s)
        try:
            sock, _ = self._listener.accept()
        except TimeoutError as err:
            raise TimeoutError(
                f"colocated weight sync: no actor rank connected to {self.path} within "
                f"{self.timeout_s:g}s; check that the actor rank on this rollout worker's device "
                "(same placement bundle) started and called connect_shared_weights with this "
                "address: its log names what stopped it"
            ) from err
        finally:
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        sock.setblocking(True)
        # The handshake's reads end at the deadline too (the kernel's SO_RCVTIMEO: a read
        # fails with EAGAIN), so a peer that connects and never answers cannot hold this
        # worker; receive() polls with its own deadline, so it is lifted afterwards.
        _set_read_timeout(sock, self.timeout_s)
        conn = Connection(sock.detach())
        try:  # the handshake multiprocessing's Listener.accept() does
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except BlockingIOError as err:
            conn.close()
            raise TimeoutError(
                f"colocated weight sync: a peer connected to {self.path} but did not finish the "
                f"authentication handshake within {self.timeout_s:g}s (a stalled actor rank, or "
                "another process)"
            ) from err
        except BaseException:
            conn.close()
            raise
        with socket.socket(fileno=os.dup(conn.fileno())) as view:
            view.setblocking(True)
            _set_read_timeout(view, 0.0)
        self._conn = conn

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Views of each bucket the actor sends, until its end marker; ``last_stats`` final
        once exhausted. A bucket is acknowledged when the consumer asks past its tensors."""
        if self._conn is None:
            raise RuntimeError("SharedWeightsReceiver.receive() before accept()")
        stats = SyncStats()
        start = time.perf_counter()
        while True:
            if not self._conn.poll(self.timeout_s):
                raise TimeoutError(
                    f"no weight bucket from the colocated actor rank within {self.timeout_s:.0f}s"
                )
            kind, metas, flat = self._conn.recv()
            if kind == _END:
                break
            stats.buckets += 1
            stats.tensors += len(metas)
            stats.bytes += sum(m.nbytes for m in metas)
            yield from unpack_bucket(metas, flat)
            del flat
            self._conn.send(_ACK)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _set_read_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking reads on ``sock``'s descriptor fail after ``seconds`` (0: never)."""
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, micro))


class SharedWeightsSender:
    """The actor side: connects to the receiver on the same node (same device)."""

    def __init__(self, path: str, authkey: bytes, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._conn = Client(path, family="AF_UNIX", authkey=authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"colocated weight sync: no rollout worker listens at {path} after "
                        f"{timeout_s:.0f}s ({err}); actor rank and rollout worker must share a node"
                    ) from err
                time.sleep(0.05)

    def send(
        self, buckets: Iterable[tuple[list[TensorMeta], torch.Tensor]], device: torch.device
    ) -> dict[str, float]:
        """Send each (metas, shareable flat buffer) and wait for its acknowledgement."""
        stats = SyncStats()
        start = time.perf_counter()
        with PeakMemory(device) as peak:
            for metas, flat in buckets:
                if flat.device.type == "cuda":
                    torch.cuda.synchronize(flat.device)  # the receiver reads it on its stream
                self._conn.send((_BUCKET, metas, flat))
                if not self._conn.poll(self.timeout_s):
                    raise TimeoutError(
                        f"the colocated rollout worker did not load a bucket in {self.timeout_s:.0f}s"
                    )
                if self._conn.recv() != _ACK:
                    raise RuntimeError("colocated weight sync: unexpected reply from the engine")
                stats.buckets += 1
                stats.tensors += len(metas)
                stats.bytes += sum(m.nbytes for m in metas)
                del flat
            self._conn.send((_END, [], None))
        stats.seconds = time.perf_counter() - start
        return {**stats.metrics(), "sync/peak_extra_bytes": float(peak.peak_extra)}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()
