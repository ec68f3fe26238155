"""The loop's pieces without Ray: grade fields, dynamic sampling, joining rounds, seeds,
step metrics, and one `train_step` driven through fake roles (the order of the verbs)."""

from __future__ import annotations

import itertools
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fipo_trainer.data.batch import Batch, to_object_array
from fipo_trainer.data.schema import ACTOR_LOG_PROB_READS, ACTOR_UPDATE_READS
from fipo_trainer.rollout.config import SamplingConfig
from fipo_trainer.trainer.loop import RLTrainer, TrainingStopped, advantages
from fipo_trainer.trainer.pipeline import BatchSource
from fipo_trainer.trainer.sampling import (
    Sampler,
    concat_rollouts,
    filter_groups,
    reward_fields,
    step_seed,
    take_groups,
)
from fipo_trainer.trainer.settling import SETTLE_TICKS_S, BatchSettling, KeptGroupTally
from fipo_trainer.trainer.step_metrics import logprob_metrics, non_finite
from fipo_trainer.trainer.summary import validation_summary

PAD = 9


def graded(accs):
    return SimpleNamespace(
        scores=[1.0 if a else -1.0 for a in accs],
        acc=list(accs),
        preds=["p"] * len(accs),
        metrics={"reward/timeouts": 0.0, "reward/errors": 0.0},
    )


def rollout(uids, accs=None, prompt_width=3, response_width=4):
    n = len(uids)
    prompts = torch.full((n, prompt_width), PAD)
    prompts[:, -2:] = 5  # two real prompt tokens, left-padded
    responses = torch.arange(n * response_width).view(n, response_width)
    lengths = torch.tensor([1 + i % response_width for i in range(n)])
    response_mask = (torch.arange(response_width)[None, :] < lengths[:, None]).float()
    b = Batch(
        {
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": torch.cat([(prompts != PAD).long(), response_mask.long()], dim=1),
            "response_mask": response_mask,
            "rollout_log_probs": -response_mask,
        },
        {
            "uid": to_object_array(uids),
            "response_text": [f"r{i}" for i in range(n)],
            "ground_truth": ["1"] * n,
            "data_source": ["arithmetic"] * n,
        },
    )
    if accs is not None:
        b |= reward_fields(graded(accs))
    return b


def test_reward_fields_are_the_grade_stage_only():
    fields = reward_fields(graded([True, False]))
    assert sorted(fields.keys()) == ["acc", "pred", "score"]
    assert list(fields["score"]) == [1.0, -1.0]


def test_filter_groups_keeps_groups_with_varying_accuracy_whole_and_in_order():
    b = rollout(["a", "a", "b", "b", "c", "c"], [True, False, False, False, True, True])
    kept, n_kept, seen = filter_groups(b, "acc")
    assert (n_kept, seen) == (1, 3)
    assert list(kept["uid"]) == ["a", "a"]
    b2 = rollout(["a", "a", "b", "b", "c", "c"], [True, False, True, False, False, True])
    kept2, n2, _ = filter_groups(b2, "acc")
    assert n2 == 3 and len(kept2) == 6
    assert list(take_groups(kept2, 2)["uid"]) == ["a", "a", "b", "b"]


def test_concat_rollouts_left_pads_prompt_side_of_different_rounds():
    narrow = rollout(["a", "a"], [True, False], prompt_width=3)
    wide = rollout(["b", "b"], [True, False], prompt_width=5)
    with pytest.raises(ValueError, match="trailing shapes"):
        Batch.concat([narrow, wide])
    joined = concat_rollouts([narrow, wide], pad_token_id=PAD)
    assert joined["input_ids"].shape == (4, 9)
    # the response part stays aligned at the right end and real tokens are unchanged
    assert torch.equal(joined["responses"][:2], narrow["responses"])
    assert torch.equal(joined["input_ids"][:2, -4:], narrow["responses"])
    assert torch.equal(joined["attention_mask"][:2, :2], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(joined["attention_mask"].sum(1)[:2], narrow["attention_mask"].sum(1))


def test_step_seed_depends_on_step_and_round_only():
    seeds = {
        step_seed(0, s, r, call_seeds=192, rounds=4) for s in range(1, 50) for r in range(1, 5)
    }
    assert len(seeds) == 49 * 4
    again = step_seed(3, 7, 2, call_seeds=192, rounds=4)
    assert again == step_seed(3, 7, 2, call_seeds=192, rounds=4)
    assert again != step_seed(4, 7, 2, call_seeds=192, rounds=4)


@pytest.mark.parametrize(
    ("call", "rounds", "steps"),
    [(24 * 8, 4, 250), (2048 * 16, 10, 400)],  # the quickstart; the paper's recipe
)
def test_training_calls_seed_disjoint_blocks(call, rounds, steps):
    """A call seeds `call` consecutive requests from its seed. Before, calls were spaced
    1009 seeds per step and 7919 per round: the quickstart's round 2 of step s met round 1
    of step s + 8, and the paper's consecutive steps shared most of their streams."""

    def starts(run_seed: int) -> list[int]:
        return [
            step_seed(run_seed, s, r, call_seeds=call, rounds=rounds)
            for s in range(1, steps + 1)
            for r in range(1, rounds + 1)
        ]

    def min_gap(seeds: list[int]) -> int:
        ordered = sorted(seeds)
        return min(b - a for a, b in itertools.pairwise(ordered))

    assert min_gap(starts(0)) >= call
    assert min_gap(starts(0) + starts(1)) >= call  # runs of seeds 0 and 1 share no stream


def test_finite_check_and_validation_summary():
    assert non_finite({"a": 1.0, "b": float("nan"), "c": float("inf")}, ("a", "b", "c", "d")) == [
        "b",
        "c",
    ]
    vals = [{"val/mean@4": 0.2}, {"val/mean@4": 0.5}, {"val/mean@4": 0.4}]
    assert validation_summary(vals) == ("val/mean@4", 0.2, 0.5)
    assert validation_summary([]) is None
    assert np.isclose(validation_summary(vals)[2] - validation_summary(vals)[1], 0.3)


def test_logprob_metrics_are_token_means_over_responses():
    b = rollout(["a", "a"])  # response lengths 1 and 2
    b["old_log_probs"] = b["rollout_log_probs"] + torch.tensor([[0.5], [-0.25]])
    b["entropy"] = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
    m = logprob_metrics(b)
    assert m["rollout/actor_logprob_abs_diff"] == pytest.approx((0.5 + 2 * 0.25) / 3)
    assert m["actor/entropy"] == pytest.approx(4.0 / 3)


# --------------------------------------------------------------------- fake roles


class FakeRollout:
    """Generates the same layout for any prompt batch; accuracy alternates per call."""

    def __init__(self, n, accs_per_call):
        self.n, self.accs = n, list(accs_per_call)
        self.calls: list[str] = []

    def generate_stream(self, prompts, sampling, ticks=None):
        """Two parts, the second prompt's rows first (engines finish out of order); with
        ``ticks``, None first (every call submitted), as RolloutGroup's."""
        self.calls.append("generate")
        uids = [u for u in prompts["uid"] for _ in range(self.n)]
        b = rollout(uids)
        self._next = self.accs.pop(0)
        if ticks is not None:
            yield None
        rows = np.arange(len(b))
        cut = np.concatenate([rows[self.n : 2 * self.n], rows[: self.n], rows[2 * self.n :]])
        for part in (cut[: self.n], cut[self.n :]):
            yield part, b[part], {"rollout/seconds": 1.0, "rollout/responses": float(len(part)),
                                  "rollout/response_tokens": 10.0}  # fmt: skip

    def set_weights_version(self, version):
        self.calls.append(f"version {version}")

    def sleep(self):
        self.calls.append("sleep")


class FakeGrader:
    """Reports each part's verdicts as it arrives (``reported``: other acc than the result's,
    a grader that breaks its contract)."""

    def __init__(self, rollout_role, reported=None):
        self.rollout, self.reported = rollout_role, reported
        self.log: list = []

    def grade_stream(self, parts, total, on_progress=None):
        rows = []
        for part in parts:
            if part is None:
                self.log.append(("submitted", len(self.rollout.calls), len(rows)))
            else:
                rows += list(part.indices)
                self.log.append(("part", len(self.rollout.calls), len(rows)))
            if on_progress is not None:
                fresh = [] if part is None else list(part.indices)
                on_progress(fresh, self.reported or self.rollout._next)
        assert sorted(rows) == list(range(total))
        return graded(self.rollout._next)


class FakePrompts:
    epoch = 0
    dataset = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=PAD))

    def __init__(self):
        self.drawn = 0

    def next_batch(self, size, uid_prefix):
        self.drawn += size
        return Batch(non_tensors={"uid": [f"{uid_prefix}-{i}" for i in range(size)]})

    def state_dict(self):
        return {"drawn": self.drawn}


class FakeActor:
    def __init__(self, log):
        self.log = log

    def compute_log_prob(self, batch, *, temperature):
        self.log.append(("compute_log_prob", temperature, sorted(batch.keys())))
        return Batch(
            {"old_log_probs": batch["rollout_log_probs"] + 0.1, "entropy": batch["response_mask"]}
        )

    def update(self, batch, *, temperature, global_step):
        self.log.append(("update", temperature, global_step, sorted(batch.keys())))
        self.updated = batch
        return {"actor/pg_loss": 0.5, "actor/grad_norm": float("nan") if global_step == 9 else 1.0}


class FakeSync:
    """Logs the sync's submission (with the version the engines then hold) and its wait."""

    def __init__(self, log):
        self.log = log

    def start(self, *, version):
        self.log.append(("sync", version))
        return lambda: self.log.append(("sync_wait",)) or {"sync/seconds": 0.0}


def cfg(
    *, enable=True, max_rounds=3, on_exhausted="proceed", nan_policy="stop", rc=False, bypass=False
):
    return SimpleNamespace(
        algorithm=SimpleNamespace(
            adv_estimator="grpo",
            norm_adv_by_std_in_grpo=True,
            rollout_correction=SimpleNamespace(
                enable=rc, level="token", threshold=2.0, bypass_mode=bypass
            ),
            filter_groups=SimpleNamespace(
                enable=enable,
                metric="acc",
                max_num_gen_batches=max_rounds,
                on_exhausted=on_exhausted,
            ),
        ),
        rollout=SimpleNamespace(
            n=2,
            temperature=0.6,
            free_cache_engine=True,
            sampling=lambda: SamplingConfig(n=2, temperature=0.6),
        ),
        data=SimpleNamespace(train_batch_size=2, gen_batch_size=2, max_response_length=4),
        actor=SimpleNamespace(ppo_mini_batch_size=1),
        trainer=SimpleNamespace(seed=0, run_dir="unused", nan_policy=nan_policy),
        resources=SimpleNamespace(actor_world_size=2, placement="colocated"),
    )


def sampler(config, accs):
    roll = FakeRollout(config.rollout.n, accs)
    return Sampler(config, FakePrompts(), roll, FakeGrader(roll)), roll


def test_sampler_rounds_until_enough_groups_then_cuts_to_the_target():
    c = cfg()
    s, roll = sampler(c, [[True, True, False, False], [True, False, False, True]])
    batch, metrics = s.collect(step=1)
    assert roll.calls == ["generate", "generate"]
    assert metrics["sampling/gen_rounds"] == 2 and metrics["sampling/groups_kept"] == 2
    assert metrics["sampling/groups_generated"] == 4 and metrics["sampling/kept_frac"] == 0.5
    assert metrics["sampling/groups_trained"] == 2 and len(batch) == 4
    assert list(batch["uid"]) == ["s1r2-0", "s1r2-0", "s1r2-1", "s1r2-1"]
    assert len(s.last_rollouts) == 8  # every response of the step, kept or not


def settling_sampler(config, accs):
    """A sampler whose ``on_settled`` logs (round, responses of that round reported)."""
    s, _ = sampler(config, accs)
    s.on_settled = lambda: s.reward_pool.log.append(("settled", *s.reward_pool.log[-1][1:]))
    return s, s.reward_pool.log


@pytest.mark.parametrize(
    ("accs", "settled_at"),
    [  # n = 2, 2 prompts a round, 2 groups wanted; parts: the 2nd prompt's rows, then the 1st's
        ([[True, True, False, False], [True, False, False, True]], (2, 4)),  # both groups needed
        ([[True, False, False, False], [True, True, False, True]], (2, 2)),  # the 2nd one will do
        ([[True, False, True, False], [False] * 4], None),  # one round is enough: no proof sooner
    ],
)
def test_a_batch_settles_at_the_first_verdicts_that_prove_it_needs_no_more_rounds(accs, settled_at):
    """One_step lets the weight sync in there (trainer/pipeline.py): the rollout worker runs
    it after the round's stream, already submitted, and before the producer's next batch."""
    s, log = settling_sampler(cfg(), accs)
    s.collect(step=1)
    settled = [e[1:] for e in log if e[0] == "settled"]
    assert settled == ([settled_at] if settled_at else [(1, 4)])


@pytest.mark.parametrize("config", [cfg(enable=False), cfg(max_rounds=1)])
def test_a_last_round_settles_at_its_first_verdicts(config):
    """Right after its calls are submitted: no verdict can change that no round follows."""
    s, log = settling_sampler(config, [[True, True, False, False]])
    s.collect(step=1)
    assert log == [("submitted", 1, 0), ("settled", 1, 0), ("part", 1, 2), ("part", 1, 4)]


def test_a_round_after_a_settled_batch_is_an_error_not_a_silent_mix_of_weights():
    """A grader whose reported verdicts differ from its result's would settle a batch that
    then needs another round, which the engines would run on the next weights."""
    s, log = settling_sampler(cfg(), [[True] * 4, [True] * 4])
    s.reward_pool.reported = [True, False, True, False]
    with pytest.raises(RuntimeError, match="a round after the batch was settled"):
        s.collect(step=1)
    assert [e for e in log if e[0] == "settled"] == [("settled", 1, 4)]


def test_the_stream_looks_at_verdicts_between_parts_only_while_they_could_settle_it():
    """Each look is a Ray wait and a grader poll on the driver, beside two busy engines."""
    settled: list[int] = []
    batch = BatchSettling(lambda: settled.append(1), n=2)
    watch = batch.round(last=False, needed=2, metric="acc")
    acc = [True, False, False, False, True, False]
    assert watch.ticks() == ()  # nothing generated yet
    watch.arrived(2)
    assert watch.ticks() == ()  # one group could not give 2
    watch.arrived(2)
    assert watch.ticks() == SETTLE_TICKS_S
    watch.progress([0, 1], acc)  # kept
    assert watch.ticks() == SETTLE_TICKS_S and not settled
    watch.progress([2, 3], acc)  # not kept: the groups generated can no longer give 2
    assert watch.ticks() == () and not settled
    watch.arrived(2)
    watch.progress([4], acc)
    assert watch.ticks() == SETTLE_TICKS_S and not settled
    watch.progress([5], acc)
    assert settled == [1] and watch.ticks() == ()
    watch.progress([], acc)
    assert settled == [1]  # once a batch
    for metric, last in (("score", False), ("acc", True)):
        settled.clear()
        watch = BatchSettling(lambda: settled.append(1), n=2).round(last, 1, metric)
        watch.arrived(6)
        watch.progress([0, 1], acc)
        assert watch.ticks() == () and settled == ([1] if last else [])


def test_kept_group_tally_counts_what_filter_groups_keeps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, groups = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        accs = [bool(a) for a in rng.integers(0, 2, n * groups)]
        tally = KeptGroupTally(n)
        for i in rng.permutation(n * groups):
            tally.add([int(i)], accs)
        uids = [f"g{i // n}" for i in range(n * groups)]
        assert tally.kept == filter_groups(rollout(uids, accs), "acc")[1]


def test_sampler_exhausted_proceeds_or_stops():
    c = cfg(max_rounds=2)
    s, _ = sampler(c, [[True] * 4, [False] * 4])
    batch, metrics = s.collect(step=1)
    assert batch is None and metrics["sampling/groups_kept"] == 0
    s, _ = sampler(cfg(max_rounds=1, on_exhausted="error"), [[True] * 4])
    with pytest.raises(TrainingStopped, match="max_num_gen_batches"):
        s.collect(step=1)


def trainer_with_fakes(tmp_path, config, accs):
    config.trainer.run_dir = str(tmp_path)
    t = RLTrainer(config)
    log: list = []
    t.sampler, t.rollout = sampler(config, accs)
    t.actor, t.weight_sync = FakeActor(log), FakeSync(log)
    t.batches = BatchSource(t.sampler)  # async_mode=off: made when the step asks
    return t, log


def test_train_step_runs_the_verbs_in_order_with_typed_settings(tmp_path):
    t, log = trainer_with_fakes(tmp_path, cfg(), [[True, False, False, True]])
    metrics = t.train_step(3)
    assert t.rollout.calls == ["generate", "sleep"]  # the sync numbers the weights
    assert [entry[0] for entry in log] == ["compute_log_prob", "update", "sync", "sync_wait"]
    assert log[2] == ("sync", 3)
    assert log[0][1] == 0.6 and log[1][1:3] == (0.6, 3)  # training temperature, 1-based step
    assert set(ACTOR_LOG_PROB_READS) <= set(log[0][2])
    assert set(ACTOR_UPDATE_READS) <= set(log[1][3])
    assert metrics["rollout/actor_logprob_abs_diff"] == pytest.approx(0.1)
    assert metrics["actor/entropy"] == 1.0 and metrics["actor/pg_loss"] == 0.5
    for key in ("timing_s/gen", "timing_s/reward_exposed", "timing_s/update", "sync/seconds"):
        assert key in metrics
    # rollout correction off: the mismatch metrics are logged, the update gets no weights
    assert metrics["rollout_corr/kl_k1"] == pytest.approx(-0.1)
    assert metrics["rollout_corr/ratio_max"] == pytest.approx(math.exp(0.1))
    assert "rollout_is_weights" not in log[1][3]


def test_a_step_a_validation_follows_keeps_the_engines_for_it(tmp_path):
    """The producer, waiting for the new weights, must not take the engines between the
    step's sync and the validation: the validation would wait for a whole batch."""
    t, _ = trainer_with_fakes(tmp_path, cfg(), [[True, False, False, True]])
    t.train_step(3, validate_next=True)
    order: list[str] = []

    def produce() -> None:
        with t.batches.turn.producer():
            order.append("producer")

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.1)
    assert order == []
    with t.batches.engines():
        order.append("validation")
    producer.join(2)
    assert order == ["validation", "producer"]


def test_a_checkpoint_takes_the_prompt_state_the_batch_source_paused_at(tmp_path, monkeypatch):
    """The prompts' state comes from the paused producer's boundary, not read beforehand
    while it may be drawing a batch's next round."""
    from fipo_trainer.trainer import loop

    monkeypatch.setattr(loop, "dataclasses", SimpleNamespace(asdict=vars))  # a plain config
    t, _ = trainer_with_fakes(tmp_path, cfg(), [])
    saved: dict = {}
    t.ckpt = SimpleNamespace(save=lambda step, save_actor, state: saved.update(state))
    t.batches = SimpleNamespace(
        state_dict=lambda: {"ahead": [], "version": 3, "prompts": {"position": 16}},
        resume=lambda: None,
    )
    t.save_checkpoint(3)
    assert saved["sampler"] == {"position": 16}
    assert saved["pipeline"] == {"ahead": [], "version": 3}
    assert saved["metrics_row"] is None
    # The step's row rides along as plain floats: a weights-only load refuses numpy scalars.
    t.save_checkpoint(3, {"a": np.float32(0.5), "b": torch.tensor(2.0), "c": "text"})
    assert saved["metrics_row"] == {"a": 0.5, "b": 2.0}
    assert all(type(v) is float for v in saved["metrics_row"].values())


def test_split_engines_stay_awake_whatever_free_cache_engine_says(tmp_path):
    """Split placement: asleep, an engine would refuse the producer's next call in the async
    modes (the rules warn that the key has no use there)."""
    c = cfg()
    c.resources.placement = "split"
    t, _ = trainer_with_fakes(tmp_path, c, [[True, False, False, True]])
    t.train_step(1)
    assert "sleep" not in t.rollout.calls


def test_train_step_with_rollout_correction_hands_the_weights_to_the_update(tmp_path):
    t, log = trainer_with_fakes(tmp_path, cfg(rc=True), [[True, False, False, True]])
    t.train_step(1)
    assert "rollout_is_weights" in log[1][3]


def test_train_step_in_bypass_mode_trains_on_the_engines_log_probs(tmp_path):
    """verl's bypass: no old-log-prob pass; π_old is the engine's log-probs, so there is no
    mismatch to log (the fake actor's pass would have added 0.1 to every log-prob)."""
    t, log = trainer_with_fakes(tmp_path, cfg(bypass=True), [[True, False, False, True]])
    metrics = t.train_step(2)
    assert [entry[0] for entry in log] == ["update", "sync", "sync_wait"]
    updated = t.actor.updated
    assert updated["old_log_probs"] is updated["rollout_log_probs"]
    keys = set(updated.keys())
    assert set(ACTOR_UPDATE_READS) <= keys and "entropy" not in keys
    assert not [k for k in metrics if k.startswith(("rollout_corr/", "timing_s/old_log_prob"))]
    assert "rollout/actor_logprob_abs_diff" not in metrics and "actor/entropy" not in metrics


def test_train_step_non_finite_update_stops_or_is_counted(tmp_path):
    t, _ = trainer_with_fakes(tmp_path, cfg(), [[True, False, False, True]])
    with pytest.raises(TrainingStopped, match=r"non-finite actor/grad_norm.*nan_policy"):
        t.train_step(9)
    t, log = trainer_with_fakes(tmp_path, cfg(nan_policy="skip"), [[True, False, False, True]])
    assert t.train_step(9)["actor/nan_skipped"] == 1.0 and log[-2:] == [("sync", 9), ("sync_wait",)]


def test_the_producer_is_told_of_new_weights_before_the_driver_waits_for_their_load(tmp_path):
    """Its next round is then submitted while the load runs and waits on the rollout worker,
    which runs calls in submission order (tests/integration/test_weight_sync_actor.py)."""
    t, log = trainer_with_fakes(tmp_path, cfg(), [[True, False, False, True]])
    told = t.batches.weights_synced
    t.batches.weights_synced = lambda version: log.append(("told", version)) or told(version)
    t.train_step(3)
    assert log[-3:] == [("sync", 3), ("told", 3), ("sync_wait",)]
    assert t.batches.version == 3 and t.rollout.calls == ["generate", "sleep"]
    t._engines_at(4)  # no new weights (a skipped update): the rollout numbers them itself
    assert t.rollout.calls[-1] == "version 4" and log[-1] == ("told", 4)


def test_advantages_stage_adds_only_its_field():
    b = rollout(["a", "a", "b", "b"], [True, False, True, True])
    adv = advantages(b, cfg().algorithm)
    assert adv.keys() == ["advantages"] and adv["advantages"].shape == b["response_mask"].shape
    assert float(adv["advantages"][2:].abs().sum()) == 0.0  # a group with equal scores
    with pytest.raises(ValueError, match="already exist"):
        b |= rollout(["a", "a", "b", "b"])
