"""The one ``ray.wait`` loop: results of labelled refs, failing fast, naming who failed.

Why fail fast: the ranks of a group (or the actor and rollout ends of a weight sync) often
sit in one collective; when one of them dies the others block forever, so waiting for all
results before looking at errors turns a crash into a hang. Every waiting loop of the
driver (start-up health check, group calls, weight sync) goes through :func:`wait_labelled`.

Why deadlines and short slices: a worker that stops answering without dying (SIGSTOP, a
deadlock, a hung collective) is invisible to Ray for minutes. Each wait therefore has a
deadline (:class:`Deadline`, from config, naming the key to raise), logs a progress line
every :data:`PROGRESS_EVERY_S` while it waits, and polls in slices of at most
:data:`POLL_S` so that Ctrl-C reaches the driver within a second.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: Longest single ``ray.wait``: Ctrl-C (a Python signal handler) runs between slices.
POLL_S = 1.0
#: Interval of the "still waiting" progress line.
PROGRESS_EVERY_S = 30.0


class WorkerCallError(RuntimeError):
    """A call on one rank of a group raised, or its process died."""


class WorkerStartupError(WorkerCallError):
    """A worker of a group failed or timed out while starting."""


class WorkerTimeoutError(WorkerCallError, TimeoutError):
    """Some ranks did not answer within the deadline."""


class CallTimeoutError(WorkerTimeoutError):
    """A call passed its deadline: no result, no error, no death reported (a stalled worker).

    ``role``/``ranks`` are the group and ranks still pending (None/[] for labels that are not
    a group's ranks), ``method`` the call, ``key`` the config key that sets the deadline.
    """

    def __init__(
        self,
        message: str,
        *,
        role: str | None = None,
        ranks: Sequence[int] = (),
        method: str = "",
        elapsed_s: float = 0.0,
        timeout_s: float | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.role, self.ranks, self.method = role, list(ranks), method
        self.elapsed_s, self.timeout_s, self.key = elapsed_s, timeout_s, key


class WaitInterrupted(KeyboardInterrupt):
    """Ctrl-C while the driver waited for workers; the message says for whom."""


@dataclass(frozen=True)
class Deadline:
    """How long one remote call may take, and what the user should raise when it is short.

    ``seconds=None``: no deadline (progress lines only). ``key`` is the config key that sets
    it; ``note`` how the value came about (e.g. derived from the batch size).
    """

    seconds: float | None = None
    key: str | None = None
    note: str = ""


class RankLabel(str):
    """``"worker group 'rollout': rank 0"`` that also knows its group and rank."""

    role: str
    rank: int

    def __new__(cls, role: str, rank: int) -> RankLabel:
        label = super().__new__(cls, f"worker group {role!r}: rank {rank}")
        label.role, label.rank = role, rank
        return label


def describe(labels: Sequence[str]) -> str:
    """Pending labels in a few words: ranks of one group are merged ("ranks 0, 1")."""
    by_role: dict[str, list[int]] = {}
    plain: list[str] = []
    for name in labels:
        if isinstance(name, RankLabel):
            by_role.setdefault(name.role, []).append(name.rank)
        else:
            plain.append(str(name))
    parts = [
        f"worker group {role!r}: rank{'s' if len(ranks) > 1 else ''} "
        + ", ".join(map(str, sorted(ranks)))
        for role, ranks in by_role.items()
    ]
    return ", ".join(parts + plain)


@contextlib.contextmanager
def interrupts_deferred(message: str) -> Iterator[None]:
    """While cleanup that must finish runs (killing the workers after Ctrl-C), a further
    Ctrl-C only logs ``message``; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def deferred(signum: int, frame: Any) -> None:
        logger.warning("Ctrl-C again: %s", message)

    previous = signal.signal(signal.SIGINT, deferred)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def error_summary(err: BaseException, max_lines: int = 25) -> str:
    """The useful tail of a Ray error (the worker's traceback and exception line)."""
    text = _ANSI.sub("", str(err)).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    return "\n".join(lines[-max_lines:])


def timeout_error(
    names: Sequence[str],
    what: str,
    *,
    elapsed_s: float,
    timeout_s: float,
    key: str | None = None,
    note: str = "",
) -> CallTimeoutError:
    """The error of an expired deadline: who, which call, how long, and which key to raise."""
    fix = f"raise {key}" if key else f"give {what} a longer timeout"
    message = (
        f"{describe(names)} did not finish {what} within {timeout_s:.0f}s (waited "
        f"{elapsed_s:.0f}s; no error and no process death were reported, so the worker is "
        f"stopped, deadlocked or slower than its deadline). If it is only slow, {fix}"
        f"{f' ({note})' if note else ''}."
    )
    ranked = [n for n in names if isinstance(n, RankLabel)]
    role = ranked[0].role if ranked else None
    return CallTimeoutError(
        message,
        role=role,
        ranks=[n.rank for n in ranked if n.role == role],
        method=what,
        elapsed_s=elapsed_s,
        timeout_s=timeout_s,
        key=key,
    )


def wait_labelled(
    labelled_refs: Sequence[tuple[str, Any]],
    *,
    what: str,
    timeout_s: float | None = None,
    error: type[WorkerCallError] = WorkerCallError,
    on_timeout: Callable[[list[str]], str] | None = None,
    timeout_key: str | None = None,
    timeout_note: str = "",
    progress_every_s: float | None = None,
) -> list[Any]:
    """Results of ``(label, ref)`` pairs in their order.

    The first ref that fails raises ``error`` naming its label ("<label> died during
    <what>" when the process is gone, "<label> raised in <what>" otherwise) with the worker's
    traceback tail; no other result is awaited. After ``timeout_s`` a
    :class:`CallTimeoutError` names the labels still pending, the elapsed time and
    ``timeout_key`` (``on_timeout(labels)`` writes the message instead, e.g. with what the
    cluster had free). Every ``progress_every_s`` (default :data:`PROGRESS_EVERY_S`) a
    "still waiting" line is logged; Ctrl-C raises :class:`WaitInterrupted` naming what was
    awaited.
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    label = {ref: name for name, ref in labelled_refs}
    order = [ref for _, ref in labelled_refs]
    results: dict[Any, Any] = {}
    pending = list(order)
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    every = PROGRESS_EVERY_S if progress_every_s is None else progress_every_s
    next_log = start + every
    try:
        while pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, pending = ray.wait(
                pending, num_returns=1, timeout=POLL_S if left is None else min(POLL_S, left)
            )
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except RayActorError as err:
                    raise error(f"{label[ref]} died during {what}:\n{error_summary(err)}") from err
                except RayError as err:
                    raise error(f"{label[ref]} raised in {what}:\n{error_summary(err)}") from err
            now = time.monotonic()
            if ready or not pending:
                continue
            names = [label[r] for r in pending]
            if deadline is not None and now >= deadline:
                assert timeout_s is not None
                expired = timeout_error(
                    names,
                    what,
                    elapsed_s=now - start,
                    timeout_s=timeout_s,
                    key=timeout_key,
                    note=timeout_note,
                )
                if on_timeout is None and error is not WorkerStartupError:
                    raise expired
                message = on_timeout(names) if on_timeout is not None else str(expired)
                raise (WorkerStartupError if error is WorkerStartupError else WorkerTimeoutError)(
                    message
                )
            if now >= next_log:
                next_log = now + every
                limit = "no deadline" if timeout_s is None else f"deadline {timeout_s:.0f}s"
                logger.info(
                    "still waiting for %s in %s (%.0fs, %s; %d of %d answered)",
                    describe(names),
                    what,
                    now - start,
                    limit,
                    len(order) - len(pending),
                    len(order),
                )
    except KeyboardInterrupt:
        names = [label[r] for r in pending]
        raise WaitInterrupted(
            f"while waiting {time.monotonic() - start:.0f}s for {describe(names)} in {what}"
        ) from None
    return [results[r] for r in order]


def next_ready_stream(
    streams: dict[Any, str],
    others: list[tuple[str, Any]],
    start: float,
    deadline: Deadline,
    wait_s: float | None = None,
) -> Any:
    """The first of ``streams`` ({generator: label}) with a part (or its end) ready; polled,
    so Ctrl-C and the deadline are seen within a second; both name the engines still
    generating. ``others`` (label, ref) are the TP ranks > 0 of those engines: one that
    fails is raised at once, naming it (rank 0 would wait in the engine's collectives until
    the deadline, then be blamed); one that ends is dropped from the list. ``wait_s``: None
    once that long passed with none ready (the caller has something else to look at)."""
    import ray

    names = list(streams.values())
    until = None if wait_s is None else time.monotonic() + wait_s
    try:
        while True:
            if others:  # before each part too: rank 0 may go on streaming for a while
                refs = [ref for _, ref in others]
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                ended = [pair for pair in others if pair[1] in done]
                wait_labelled(ended, what="generate_batch")  # raises if one of them failed
                others[:] = [pair for pair in others if pair[1] not in done]
            poll_s = POLL_S if until is None else max(0.0, min(POLL_S, until - time.monotonic()))
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=poll_s)
            if ready:
                return ready[0]
            if until is not None and time.monotonic() >= until:
                return None
            elapsed = time.monotonic() - start
            if deadline.seconds is not None and elapsed >= deadline.seconds:
                raise timeout_error(names, "generate_stream", elapsed_s=elapsed,
                                    timeout_s=float(deadline.seconds), key=deadline.key,
                                    note=deadline.note)  # fmt: skip
    except KeyboardInterrupt:
        raise WaitInterrupted(
            f"while waiting {time.monotonic() - start:.0f}s for {describe(names)} in "
            "generate_stream"
        ) from None
