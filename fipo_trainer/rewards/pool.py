"""Process-pool grading with per-item timeouts and crash isolation.

Why a small pool of our own: ``concurrent.futures`` cannot kill one hung task, and
math-verify's ``signal.alarm`` timeouts do not work off the main thread (we run inside Ray
actors). Each worker reports every graded item, so the parent always knows which item is
running and since when. An item past ``timeout_s`` gets its worker killed; an item whose
worker dies (``os._exit``, segfault, OOM kill) is charged to that item; in both cases the item
gets the failure score, the rest of its chunk is re-queued and the worker is replaced. Workers
are fresh interpreters (spawn semantics, never fork: threads of torch / Ray in the parent cannot
deadlock them) started with ``python -m fipo_trainer.rewards._worker``, which unlike
multiprocessing's spawn does not re-run the trainer's ``__main__`` in every worker.

This module schedules items and handles deaths and timeouts; starting and killing a process
is `_process.py`'s, turning verdicts into scores and metrics `result.py`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import wait
from typing import Any

from ._process import _stop_workers, _Worker, spawn_worker
from .config import RewardConfig
from .custom import split_spec
from .dapo import TAIL_CHARS
from .result import GradeItems, Outcome, RewardResult, StreamedItems, check_scores, finish

__all__ = ["GradeItems", "RewardPool", "RewardResult"]

_MAX_STARTUP_FAILURES = 3


class RewardPool:
    """Grades batches of responses in worker processes; see the module docstring.

    Use as a context manager or call :meth:`close`. Not thread-safe: one ``grade`` at a time.
    """

    def __init__(
        self,
        config: RewardConfig | None = None,
        *,
        start: bool = True,
        graders: Iterable[str] | None = None,
    ) -> None:
        """``graders``: the graders the data will be routed to (default: every grader the
        config routes to). Workers import and warm these up before they report ready (and
        before ``reward.max_memory_mb`` caps them); another one loads on its first item.
        The trainer names its data's graders: math-verify's sympy is ~0.5 CPU-s and ~40 MiB
        per worker that a run routing everything to the DAPO rule never uses."""
        self.config = config if config is not None else RewardConfig()
        self.config.validate()
        self.expected_graders = frozenset(self.config.used_graders if graders is None else graders)
        if self.config.custom_function is not None:
            # Only the grader processes import the module: its top-level code (model loads,
            # servers, side effects) must not run in the trainer. A missing file fails here;
            # a missing function or a failing import fails at start-up, with its traceback.
            path, name = split_spec(self.config.custom_function)
            if not path.is_file():
                raise FileNotFoundError(
                    f"reward.custom_function ({self.config.custom_function!r}): file "
                    f"{str(path)!r} does not exist"
                )
            # absolute path: the workers must find the same file whatever their cwd
            self.config = dataclasses.replace(self.config, custom_function=f"{path}:{name}")
        self._workers: list[_Worker] = []
        self._closed = False
        self._startup_failures = 0
        self.totals: dict[str, int] = defaultdict(int)  # cumulative counters across batches
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        if start:
            self._fill()

    # ------------------------------------------------------------------ lifecycle
    @property
    def num_workers(self) -> int:
        return self.config.resolved_num_workers

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring; they change on replacement)."""
        return [w.proc.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        return spawn_worker(self.config, self.expected_graders)

    def _fill(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def _retire(self, w: _Worker, *, kill: bool) -> None:
        w.release(kill=kill)
        self._workers.remove(w)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker has started and warmed up (optional: grade() also waits)."""
        self._check_open()
        self._fill()
        limit = self.config.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while not all(w.ready for w in self._workers):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reward workers not ready after {limit:.0f} s")
            busy = [w for w in self._workers if not w.ready]
            wait([h for w in busy for h in w.handles], timeout=min(left, 1.0))
            for w in busy:
                self._drain(w, None)
            self._fill()

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RewardPool is closed; create a new one")

    # ------------------------------------------------------------------ grading
    def grade(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[Any],
        data_sources: Sequence[str],
        response_lengths: Sequence[int] | None = None,
        extra_infos: Sequence[Any] | None = None,
    ) -> RewardResult:
        """Grade N responses; every item gets a verdict, whatever its grader does.

        ``response_lengths`` (tokens) is needed when overlong shaping is enabled;
        ``extra_infos`` is passed to custom reward functions that accept it.
        """
        n = len(responses)
        part = GradeItems(range(n), responses, ground_truths, data_sources, response_lengths,
                          extra_infos)  # fmt: skip
        return self.grade_stream([part], n)

    def grade_stream(
        self,
        parts: Iterable[GradeItems | None],
        total: int,
        on_progress: Callable[[list[int], Sequence[bool]], None] | None = None,
    ) -> RewardResult:
        """Grade ``total`` items that arrive in parts (e.g. as the engine finishes them):
        each part's items go to the workers as soon as it arrives, so grading overlaps
        whatever produces the next part. The result is in item order, as ``grade``'s.
        A None part: nothing new yet, the verdicts in so far are collected.
        ``on_progress(indices, acc)`` after each part and each wait: the items given their
        final verdict since (maybe none) and every item's ``acc`` so far, so the caller may
        decide before the last verdict (dynamic sampling: a batch needs no more rounds)."""
        self._check_open()
        cfg = self.config
        cfg.validate()  # fields may have been edited since the pool was built
        t0 = time.perf_counter()
        items = StreamedItems(total)
        queue: deque[list[tuple]] = deque()
        out = Outcome(total)
        restarts_before = self.totals["worker_restarts"]
        rejected = 0

        def grader_of(i: int) -> str:
            return items.route[str(items.data_sources[i])]

        def verdicts_in(block: bool = True) -> None:
            nonlocal rejected
            self._wait_and_collect(out, queue, block=block)
            fresh = out.take_fresh()
            rejected += check_scores(
                out, cfg, fresh, grader_of, items.responses, items.data_sources
            )
            if on_progress is not None:
                on_progress(fresh, out.acc)

        self._fill()
        try:
            for part in parts:
                if part is not None:
                    self._validate(part.responses, part.ground_truths, part.data_sources,
                                   part.response_lengths, part.extra_infos)  # fmt: skip
                    items.add(part)
                    queue += self._chunks(part.indices, items)
                    self._dispatch(queue)
                verdicts_in(block=False)
            if items.missing:
                raise ValueError(f"grade_stream(): {items.missing} of {total} items never came")
            while out.remaining:
                self._dispatch(queue)
                verdicts_in()
        except BaseException:
            # Interrupted (Ctrl-C, start-up failure): workers may still hold this batch's
            # items, so start the next batch from fresh workers.
            _stop_workers(self._workers, graceful=False)
            raise

        graders = [items.route[str(ds)] for ds in items.data_sources]
        self.totals["errors"] += rejected
        self.totals["items"] += total
        elapsed = time.perf_counter() - t0
        lengths = items.response_lengths if cfg.overlong_buffer_enable else None
        result = finish(out, cfg, items.data_sources, lengths, elapsed, graders)
        result.metrics["reward/worker_restarts"] = float(
            self.totals["worker_restarts"] - restarts_before
        )
        return result

    def _chunks(self, indices: Sequence[int], items: StreamedItems) -> list[list[tuple]]:
        """The work units of some items: per grader, slow graders first, chunked."""
        cfg = self.config
        by_grader: dict[str, list[int]] = defaultdict(list)
        for i in indices:
            ds = str(items.data_sources[i])
            if ds not in items.route:
                items.route[ds] = cfg.grader_for(ds)
            by_grader[items.route[ds]].append(i)
        chunks = []
        inputs = (items.responses, items.ground_truths, items.data_sources, items.extra_infos)
        for grader in sorted(by_grader, key=lambda g: g == "dapo"):  # slow graders first
            idxs = by_grader[grader]
            if grader == "math_verify":  # a group's responses share a worker's parsed gold
                idxs.sort(key=lambda i: str(items.ground_truths[i]))
            size = cfg.dapo_chunk_size if grader == "dapo" else cfg.chunk_size
            for s in range(0, len(idxs), size):
                chunks.append([self._item(i, grader, *inputs) for i in idxs[s : s + size]])
        return chunks

    @staticmethod
    def _item(i, grader, responses, ground_truths, data_sources, extra_infos) -> tuple:
        response = responses[i]
        if grader == "dapo":
            response = response[-TAIL_CHARS:]  # the rule never looks further back: less IPC
        if grader == "custom":  # user functions get the ground truth and extra_info as they are
            extra = extra_infos[i] if extra_infos is not None else None
            return (i, grader, response, ground_truths[i], str(data_sources[i]), extra)
        return (i, grader, response, str(ground_truths[i]), str(data_sources[i]), None)

    def _validate(
        self, responses, ground_truths, data_sources, response_lengths, extra_infos
    ) -> None:
        n = len(responses)
        named = {"ground_truths": ground_truths, "data_sources": data_sources}
        if response_lengths is not None:
            named["response_lengths"] = response_lengths
        if extra_infos is not None:
            named["extra_infos"] = extra_infos
        for name, seq in named.items():
            if len(seq) != n:
                raise ValueError(f"grade(): {name} has {len(seq)} items but responses has {n}")
        if self.config.overlong_buffer_enable and response_lengths is None:
            raise ValueError(
                "grade(): reward.overlong_buffer_enable is set but response_lengths is None"
            )
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise ValueError(f"grade(): responses[{i}] is {type(r).__name__}, expected str")
        for i, g in enumerate(ground_truths):
            if g is None:
                raise ValueError(
                    f"grade(): ground_truths[{i}] is None (check reward_model.ground_truth)"
                )
        if self.config.custom_function is None:
            for i, g in enumerate(ground_truths):
                if isinstance(g, (list, tuple, dict, set)) or getattr(g, "ndim", 0) > 0:
                    raise ValueError(
                        f"grade(): ground_truths[{i}] is a {type(g).__name__}; the built-in "
                        "graders compare against one answer string (use reward.custom_function "
                        "for structured ground truths)"
                    )

    def _dispatch(self, queue: deque) -> None:
        for w in self._workers:
            if not queue:
                return
            if w.ready and w.task is None:
                task = queue.popleft()
                try:
                    w.conn.send(task)
                except (OSError, ValueError):  # died while idle: re-queue, the sentinel fires
                    queue.appendleft(task)
                    continue
                w.task, w.pos, w.item_started = task, 0, time.monotonic()

    def _wait_and_collect(self, out: Outcome, queue: deque, block: bool = True) -> None:
        cfg = self.config
        now = time.monotonic()
        deadlines = [w.item_started + cfg.timeout_s for w in self._workers if w.task]
        deadlines += [w.started_at + cfg.startup_timeout_s for w in self._workers if not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 5.0
        timeout = timeout if block else 0.0
        handles = [h for w in self._workers for h in w.handles]
        ready = set(wait(handles, timeout=timeout))
        for w in list(self._workers):
            if w.conn in ready or w.sentinel in ready:
                self._drain(w, out, queue)

        now = time.monotonic()
        for w in list(self._workers):
            if w.task and now - w.item_started >= cfg.timeout_s:
                if w.pos < len(w.task):  # else it hangs after its last item: nothing to charge
                    idx = w.task[w.pos][0]
                    message = f"grader exceeded reward.timeout_s={cfg.timeout_s:g} s"
                    out.fail(idx, "timeout", message)
                    self.totals["timeouts"] += 1
                    self._requeue_rest(w, queue)
                self._retire(w, kill=True)
                self.totals["worker_restarts"] += 1
            elif not w.ready and now - w.started_at >= cfg.startup_timeout_s:
                self._retire(w, kill=True)
                raise RuntimeError(
                    f"a reward worker did not start within reward.startup_timeout_s="
                    f"{cfg.startup_timeout_s:g} s (slow imports or a hanging custom module?)"
                )
        self._fill()

    def _drain(self, w: _Worker, out: Outcome | None, queue: deque | None = None) -> None:
        """Read every message a worker sent; handle its death if it is gone."""
        dead = False
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv(), out)
        except (EOFError, OSError):
            dead = True
        if w.fatal is not None:
            message = w.fatal
            self._retire(w, kill=True)
            raise RuntimeError(f"reward worker failed to start:\n{message}")
        if not dead and w.alive():
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(5)
        code = w.proc.returncode
        if w.task and w.pos < len(w.task) and out is not None and queue is not None:
            idx = w.task[w.pos][0]
            out.fail(idx, "error", f"grader process died (exit code {code})")
            self.totals["errors"] += 1
            self._requeue_rest(w, queue)
        if not w.ready:
            self._startup_failures += 1
            if self._startup_failures >= _MAX_STARTUP_FAILURES:
                self._retire(w, kill=True)
                raise RuntimeError(
                    f"reward workers keep dying at start-up (last exit code {code}); "
                    "check memory limits and that fipo_trainer imports in a fresh process"
                )
        self._retire(w, kill=True)
        self.totals["worker_restarts"] += 1

    def _handle(self, w: _Worker, msg: tuple, out: Outcome | None) -> None:
        kind = msg[0]
        if kind == "r" or kind == "e":
            assert out is not None and w.task is not None and msg[1] == w.task[w.pos][0], msg
            if kind == "r":
                out.ok(msg[1], msg[2], msg[3], msg[4])
            else:
                out.fail(msg[1], "error", msg[2])
                self.totals["errors"] += 1
            w.pos += 1
            w.item_started = time.monotonic()
        elif kind == "d":
            w.task = None
        elif kind == "ready":
            w.ready = True
            self._startup_failures = 0
        elif kind == "fatal":
            w.fatal = msg[1]

    @staticmethod
    def _requeue_rest(w: _Worker, queue: deque) -> None:
        rest = w.task[w.pos + 1 :] if w.task else []
        if rest:
            queue.appendleft(rest)
        w.task = None
