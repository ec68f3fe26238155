"""The one ``ray.wait`` loop: results of labelled refs, failing fast, naming who failed.

Why fail fast: the ranks of a group (or the actor and rollout ends of a weight sync) often
sit in one collective; when one of them dies the others block forever, so waiting for all
results before looking at errors turns a crash into a hang. Every waiting loop of the
driver (start-up health check, group calls, weight sync) goes through :func:`wait_labelled`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class WorkerCallError(RuntimeError):
    """A call on one rank of a group raised, or its process died."""


class WorkerStartupError(WorkerCallError):
    """A worker of a group failed or timed out while starting."""


class WorkerTimeoutError(WorkerCallError, TimeoutError):
    """Some ranks did not answer within the deadline."""


def error_summary(err: BaseException, max_lines: int = 25) -> str:
    """The useful tail of a Ray error (the worker's traceback and exception line)."""
    text = _ANSI.sub("", str(err)).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    return "\n".join(lines[-max_lines:])


def wait_labelled(
    labelled_refs: Sequence[tuple[str, Any]],
    *,
    what: str,
    timeout_s: float | None = None,
    error: type[WorkerCallError] = WorkerCallError,
    on_timeout: Callable[[list[str]], str] | None = None,
) -> list[Any]:
    """Results of ``(label, ref)`` pairs in their order.

    The first ref that fails raises ``error`` naming its label ("<label> died during
    <what>" when the process is gone, "<label> raised in <what>" otherwise) with the worker's
    traceback tail; no other result is awaited. After ``timeout_s`` a
    :class:`WorkerTimeoutError` lists the labels still pending (``on_timeout(labels)``
    writes the message instead, e.g. with what the cluster had free).
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    label = {ref: name for name, ref in labelled_refs}
    order = [ref for _, ref in labelled_refs]
    results: dict[Any, Any] = {}
    pending = list(order)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            names = [label[r] for r in pending]
            message = (
                on_timeout(names)
                if on_timeout is not None
                else f"{', '.join(names)} did not finish {what} within {timeout_s:.0f}s"
            )
            raise (WorkerStartupError if error is WorkerStartupError else WorkerTimeoutError)(
                message
            )
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except RayActorError as err:
                raise error(f"{label[ref]} died during {what}:\n{error_summary(err)}") from err
            except RayError as err:
                raise error(f"{label[ref]} raised in {what}:\n{error_summary(err)}") from err
    return [results[r] for r in order]
