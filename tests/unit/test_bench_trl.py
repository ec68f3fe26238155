"""scripts/bench_trl.py's pure parts: optimizer-step clock -> s/step -> SUMMARY."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.helpers.scripts import load_script

bt = load_script("bench_trl")


def test_step_times_group_optimizer_steps_into_rollout_steps():
    # 3 rollout steps of 4 optimizer steps; the first ends at 4.0, then 1.0 s and 2.0 s later
    ends = [1.0, 2.0, 3.0, 4.0, 4.2, 4.4, 4.6, 5.0, 5.5, 6.0, 6.5, 7.0]
    assert bt.step_times(ends, 4) == pytest.approx([1.0, 2.0])
    assert bt.step_times(ends[:3], 4) == []


def test_median_after_warmup_keeps_everything_when_too_short():
    assert bt.median_after_warmup([9.0, 9.0, 9.0, 1.0, 2.0, 3.0]) == 2.0
    assert bt.median_after_warmup([5.0, 7.0]) == 6.0
    assert bt.median_after_warmup([]) is None


def test_summary_ratio_and_missing_sides():
    out = bt.summary({"s_per_step": 0.3, "startup_s": 6.0}, {"s_per_step": 0.6, "startup_s": 9.0})
    assert out["ratio_ours_vs_trl"] == 2.0 and out["trl_startup_s"] == 6.0
    assert out["startup_ratio_ours_vs_trl"] == 1.5
    assert bt.summary({"startup_s": 6.0}, {})["startup_ratio_ours_vs_trl"] is None
    assert bt.summary({}, {"s_per_step": 0.6})["ratio_ours_vs_trl"] is None
    json.dumps(out)


def test_our_side_runs_the_like_for_like_recipe():
    """DAPO loss, no dynamic sampling: what TRL's GRPOTrainer with loss_type=dapo does."""
    from fipo_trainer.cli import compose_config
    from fipo_trainer.trainer.config import prepare_config

    cfg = prepare_config(compose_config([*bt.OURS, "trainer.total_training_steps=3"]))
    assert cfg.algorithm.filter_groups.enable is False
    assert cfg.actor.loss_name == "vanilla" and cfg.actor.policy_loss.loss_agg_mode == "token-mean"
    assert cfg.data.gen_batch_size == cfg.data.train_batch_size == 16  # nothing generated twice


def test_extra_overrides_reach_our_run_and_name_the_side(tmp_path, monkeypatch):
    seen = []

    def run_one(overrides, run_dir, timeout_s):
        seen.append(list(overrides))
        run_dir.mkdir(parents=True)
        rows = [{"step": s, "perf/step_seconds": 0.5, "reward/score_mean": 0.1} for s in (1, 2)]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return {"status": "ok", "startup_s": 1.0, "wall_s": 2.0}

    monkeypatch.setattr(bt, "_bench_pipeline", lambda: SimpleNamespace(run_one=run_one))
    bypass = "algorithm.rollout_correction.bypass_mode=true"
    ours = bt.run_ours(2, tmp_path, 60.0, [bypass])
    assert seen[0][: len(bt.OURS)] == bt.OURS and seen[0][-1] == bypass
    assert ours["side"].endswith(bypass) and ours["s_per_step"] == 0.5


def test_a_failed_run_of_ours_stops_the_benchmark_not_reads_old_steps(tmp_path, monkeypatch):
    """The earlier run's rows stay where they were (``run_one`` never reads them as this
    run's: tests/unit/test_bench_pipeline.py)."""
    old = tmp_path / "ours" / "metrics.jsonl"  # a previous run's steps, left in the dir
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"step": 1, "perf/step_seconds": 0.4}) + "\n")

    def run_one(overrides, run_dir, timeout_s):
        return {"status": "failed", "error": "invalid training config: ..."}

    monkeypatch.setattr(bt, "_bench_pipeline", lambda: SimpleNamespace(run_one=run_one))
    with pytest.raises(SystemExit, match=r"our run failed .*invalid training config"):
        bt.run_ours(2, tmp_path, 60.0)
    assert old.exists()


def test_pairs_alternate_who_goes_first_and_report_medians(tmp_path, monkeypatch):
    order = []

    def ours(steps, out_dir, timeout_s, extra=()):
        order.append(("ours", out_dir.name))
        return {"side": "ours", "s_per_step": 0.6 + 0.1 * len(order), "startup_s": 20.0}

    def trl(steps, out_dir, threads):
        order.append(("trl", out_dir.name))
        return {"side": "TRL", "s_per_step": 0.4, "startup_s": 10.0}

    monkeypatch.setattr(bt, "run_ours", ours)
    monkeypatch.setattr(bt, "_trl_in_a_subprocess", trl)
    pairs = bt.run_pairs(3, 40, tmp_path, 60.0, [], 2)
    assert order == [("ours", "pair1"), ("trl", "pair1"), ("trl", "pair2"), ("ours", "pair2"),
                     ("ours", "pair3"), ("trl", "pair3")]  # fmt: skip
    assert [o["side"] for _, o in pairs] == [f"ours (pair {i})" for i in (1, 2, 3)]
    out = bt.pairs_summary(pairs)  # ours: 0.7, 1.0, 1.1 against 0.4
    assert out["pairs"] == 3 and out["pair_ratios"] == [1.75, 2.5, 2.75]
    assert out["ratio_ours_vs_trl"] == 2.5 and out["ours_s_per_step"] == 1.0
    assert bt.pairs_summary(pairs[:1]) == bt.summary(*pairs[0])
    one = bt.run_pairs(1, 40, tmp_path, 60.0, [], 2)  # one pair: straight into --out
    assert order[-2:] == [("ours", tmp_path.name), ("trl", tmp_path.name)]
    assert one[0][1]["side"] == "ours"


def test_the_table_prints_both_sides(capsys):
    trl = {"side": "TRL GRPOTrainer", "steps": 40, "s_per_step": 0.265, "startup_s": 7.2}
    ours = {"side": "fipo-train", "steps": 40, "s_per_step": 0.339, "score_last": -0.7}
    bt.print_table([trl, ours])
    out = capsys.readouterr().out
    assert "0.265" in out and "0.339" in out and "-0.700" in out


def test_trl_trains_as_ours_does_not_with_its_own_defaults(tmp_path):
    """TRL's GRPOConfig defaults to bf16 autocast and gradient checkpointing; ours trains the
    quickstart in fp32 without checkpointing, so TRL must too (else the ratio flatters us)."""
    from fipo_trainer.cli import compose_config
    from fipo_trainer.trainer.config import prepare_config

    cfg = prepare_config(compose_config([*bt.OURS, "trainer.total_training_steps=3"]))
    args = bt.trl_args(cfg, 40, tmp_path)
    assert args["bf16"] is False and cfg.actor.gradient_checkpointing is False
    assert args["gradient_checkpointing"] is False
    assert args["max_steps"] == 40 * bt.OPTIMIZER_STEPS_PER_STEP
    assert args["per_device_train_batch_size"] == cfg.actor.ppo_mini_batch_size * cfg.rollout.n
    assert args["learning_rate"] == cfg.actor.lr and args["loss_type"] == "dapo"
    assert args["max_completion_length"] == cfg.data.max_response_length
