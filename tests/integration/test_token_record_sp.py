"""Token records on real DeepSpeed ranks (gloo, CPU): sequence parallel 2 records what 2
data-parallel ranks at SP 1 record, row for row, token for token.

The batch is ``test_sequence_parallel.py``'s: packed micro-batches, a response cut by the
shard boundary with a dual-clipped token on each side (FIPO drops it), a response with no
tokens. One mini-batch, so every row is updated from the same weights in both layouts.
"""

from __future__ import annotations

import sys

import pytest
import ray

from fipo_trainer.actor import ActorGroup
from fipo_trainer.cluster import init_ray, shutdown_ray
from tests.integration.test_sequence_parallel import (
    RESPONSES,
    T,
    base_config,
    boundary_row,
    make_batch,
    model_path,  # noqa: F401  (fixture)
    off_policy,
    sp_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def groups(model_path):  # noqa: F811
    """(2 ranks at SP 1 = 2 data-parallel groups, 2 ranks at SP 2 = 1 group)."""
    shutdown_ray()
    init_ray(num_cpus=2)
    started = []
    try:
        cfg = base_config(model_path)
        for sp in (1, 2):
            started.append(ActorGroup(sp_config(cfg, sp), 2, name=f"tokens-sp{sp}"))
        yield tuple(started)
    finally:
        for group in started:
            group.shutdown()
        shutdown_ray()


def test_sp2_records_equal_dp2_records(groups):
    dp, sp = groups
    batch = make_batch()
    batch = off_policy(batch, dp.compute_log_prob(batch, temperature=T)["old_log_probs"])
    rows = list(range(len(batch)))
    records = []
    for group in (dp, sp):
        group.update(batch, temperature=T, global_step=1, record_rows=rows)
        records.append(group.token_records)
        group.update(batch, temperature=T, global_step=2)  # no rows asked: none kept
        assert group.token_records == {}
    one, two = records
    assert sorted(one) == sorted(two) == rows
    cut, _, _ = boundary_row(batch)
    assert one[cut]["dropped"] is True and two[cut]["dropped"] is True
    assert sum(two[cut]["dual_clipped"]) == 2
    for row in rows:
        a, b = one[row], two[row]
        assert len(b["ratio"]) == RESPONSES[row] and b["mini_batch"] == a["mini_batch"] == 0
        for field in ("ratio", "future_kl", "influence_weight"):
            assert b[field] == pytest.approx(a[field], rel=1e-5, abs=1e-6), (row, field)
        for field in ("clipped", "dual_clipped", "dropped"):
            assert b[field] == a[field], (row, field)
    assert any(w != 1.0 for r in two.values() for w in r["influence_weight"])
