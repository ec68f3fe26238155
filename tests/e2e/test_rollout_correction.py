"""A short run with rollout correction on (token-level truncated IS) trains and logs the
mismatch metrics every step (issue 11 item 4)."""

from __future__ import annotations

import math

import pytest

from tests.e2e.test_train import SHORT_RUN, read_metrics, train

pytestmark = pytest.mark.e2e

RC_KEYS = ("kl_k1", "kl_k3", "ratio_max", "clipped_frac", "ess")


def test_token_tis_run_trains_and_logs_rollout_corr_metrics(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        "algorithm.rollout_correction.enable=true",
        "algorithm.rollout_correction.level=token",
        "algorithm.rollout_correction.threshold=2.0",
        *SHORT_RUN,
    )
    assert result.steps == 2
    rows = read_metrics(run_dir)
    for step in (1, 2):
        row = rows[step]
        assert math.isfinite(row["actor/pg_loss"]) and math.isfinite(row["actor/grad_norm"])
        for key in RC_KEYS:
            assert math.isfinite(row[f"rollout_corr/{key}"]), (step, key)
        # The engine sampled from the distribution the actor recomputes (same weights, fp32):
        # the weights are ~1, nothing is truncated.
        assert row["rollout_corr/ratio_max"] == pytest.approx(1.0, abs=1e-2)
        assert row["rollout_corr/clipped_frac"] == 0.0
        assert row["rollout_corr/ess"] == pytest.approx(1.0, abs=1e-3)
        assert abs(row["rollout_corr/kl_k1"]) < 1e-3
