"""Ulysses sequence parallel on real DeepSpeed ranks (gloo, CPU): SP = 2 is SP = 1's math.

Each pair of actors (1 rank at SP 1; 2 ranks = 1 data-parallel group at SP 2) starts from
the same weights and sees the same rows in the same micro-batches (the SP 2 budget per rank
is half, so the packed micro-batch of the group is the same). The batch is built so that
micro-batches pack several sequences, one response spans the shard boundary with two
dual-clipped tokens on different shards (FIPO must drop it, as at SP 1), and one sequence
is shorter than k tokens.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import ray
import torch

from fipo_trainer.actor import ActorConfig, ActorGroup
from fipo_trainer.actor.micro_batch import pack_rows, plan_token_budget
from fipo_trainer.actor.sequence_parallel import shard_packed
from fipo_trainer.actor.synthetic_batch import random_rollout_batch
from fipo_trainer.actor.worker import DeepSpeedActorWorker
from fipo_trainer.algorithms.sequence_shards import row_segments
from fipo_trainer.cluster import init_ray, shutdown_ray
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.tiny_model import build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROMPT_W, RESP_W = 10, 24
BUDGET = 96  # tokens per packed micro-batch of a data-parallel group
T = 0.9
# (prompt length per prompt), (response length per row); n = 2 responses per prompt.
PROMPTS = [7, 1, 10, 4]
RESPONSES = [17, 24, 0, 9, 24, 3, 12, 20]  # row 2: a 1-token sequence (shorter than k = 2)


def base_config(model_path: Path, **kw) -> ActorConfig:
    return ActorConfig(
        model_path=str(model_path),
        zero_stage=2,
        lr=1e-3,
        lr_warmup_steps=0,
        grad_clip=0.0,
        ppo_mini_batch_size=4,  # every row in one mini-batch: one optimizer step
        ppo_max_token_len_per_gpu=BUDGET,
        loss_name="fipo",
        **kw,
    )


def sp_config(cfg: ActorConfig, sp: int) -> ActorConfig:
    return dataclasses.replace(
        cfg, ulysses_sequence_parallel_size=sp, ppo_max_token_len_per_gpu=BUDGET // sp
    )


VARIANTS = {
    "global-token-mean": {},
    "reference-seq-mean-token-mean": {
        "loss_scale": "reference",
        "policy_loss": {"loss_agg_mode": "seq-mean-token-mean"},
    },
}


@pytest.fixture(scope="module")
def model_path() -> Path:
    return build_tiny_model()


@pytest.fixture(scope="module")
def started(model_path, tmp_path_factory):
    """{variant: ((SP 1 group, checkpoint), (SP 2 group, checkpoint))} on one Ray cluster."""
    shutdown_ray()  # a Ray left by an earlier module has other resources
    init_ray(num_cpus=3)  # 2 variants x 3 ranks x 0.5 CPU (logical)
    groups: dict[str, tuple] = {}
    try:
        for name, kw in VARIANTS.items():
            cfg = base_config(model_path, **kw)
            pair = []
            for sp in (1, 2):
                group = ActorGroup(sp_config(cfg, sp), sp, name=f"sp{sp}-{name}")
                pair.append((group, group.save(str(tmp_path_factory.mktemp(name) / f"sp{sp}"))))
            groups[name] = tuple(pair)
        yield groups
    finally:
        for pair in groups.values():
            for group, _ in pair:
                group.shutdown()
        shutdown_ray()


@pytest.fixture
def pairs(started):
    """The groups, every one back at the initial weights and optimizer state."""
    for pair in started.values():
        for group, ckpt in pair:
            group.load(ckpt)
    return {name: (pair[0][0], pair[1][0]) for name, pair in started.items()}


def make_batch() -> Batch:
    return random_rollout_batch(
        num_prompts=len(PROMPTS),
        n=2,
        vocab_size=200,
        prompt_width=PROMPT_W,
        response_width=RESP_W,
        prompt_lengths=PROMPTS,
        response_lengths=RESPONSES,
        seed=3,
    )


def micro_batches(batch: Batch) -> list[list[int]]:
    lengths = batch["attention_mask"].sum(-1).tolist()
    return plan_token_budget(lengths, BUDGET)


def boundary_row(batch: Batch) -> tuple[int, int, int]:
    """(row, column on shard 0, column on shard 1) of a response cut by the SP 2 boundary."""
    for part in micro_batches(batch):
        idx = torch.tensor(part)
        packed = pack_rows(batch["input_ids"][idx], batch["attention_mask"][idx], PROMPT_W)
        shard = shard_packed(packed, 2, 0)
        starts, ends = row_segments(packed.response_lengths, shard.token_slices)
        for j, row in enumerate(part):
            if ends[0, j] > starts[0, j] and ends[1, j] > starts[1, j]:
                return row, int(ends[0, j]) - 1, int(starts[1, j])
    raise AssertionError("no response spans the shard boundary; change RESPONSES")


def off_policy(batch: Batch, old: torch.Tensor) -> Batch:
    """Old log-probs shifted by a smooth per-token amount (FIPO weights != 1), and the row
    across the boundary made negative with two dual-clipped tokens, one on each shard."""
    g = torch.Generator().manual_seed(7)
    shifted = old + 0.3 * torch.randn(old.shape, generator=g) * batch["response_mask"]
    row, left, right = boundary_row(batch)
    adv = batch["advantages"].clone()
    adv[row] = -batch["response_mask"][row]
    shifted[row, left] -= 3.0  # ratio ~ e^3 > clip_ratio_c = 10: dual-clipped
    shifted[row, right] -= 3.0
    out = batch.union(Batch({"old_log_probs": shifted}))
    out["advantages"] = adv
    return out


def capture_gradients(worker) -> None:
    """Record the full (rank-averaged) gradient x grad_scale at each optimizer step."""
    from deepspeed.utils import safe_get_full_grad

    engine = worker.engine
    original = type(engine).step
    worker.captured = []

    def step(grad_scale: float = 1.0) -> float:
        grads = {
            n: safe_get_full_grad(p).detach().double().cpu() * grad_scale
            for n, p in engine.module.named_parameters()
        }
        worker.captured.append(grads)
        return original(engine, grad_scale)

    engine.step = step


def captured(worker) -> list[dict[str, torch.Tensor]]:
    return worker.captured


def gradients_of(group: ActorGroup, batch: Batch) -> tuple[dict[str, float], dict]:
    group.worker_group.call_all(DeepSpeedActorWorker.run, capture_gradients)
    metrics = group.update(batch, temperature=T, global_step=1)
    grads = group.worker_group.call_all(DeepSpeedActorWorker.run, captured)
    return metrics, grads[0][0]


def test_old_log_probs_and_entropy_match(pairs):
    one, two = pairs["global-token-mean"]
    batch = make_batch()
    a = one.compute_log_prob(batch, temperature=T)
    b = two.compute_log_prob(batch, temperature=T)
    mask = batch["response_mask"].bool()
    assert float((a["old_log_probs"] - b["old_log_probs"]).abs().max()) <= 1e-5
    assert float((a["entropy"] - b["entropy"]).abs().max()) <= 1e-5
    assert bool((b["old_log_probs"][~mask] == 0).all())
    assert float(b["entropy"][mask].min()) > 0


def test_on_policy_ratio_is_exactly_one_at_sp2(pairs):
    _, two = pairs["global-token-mean"]
    batch = make_batch()
    batch = batch.union(two.compute_log_prob(batch, temperature=T).select("old_log_probs"))
    metrics = two.update(batch, temperature=T, global_step=1)
    assert metrics["actor/on_policy_log_ratio_abs_max"] == 0.0
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert metrics["actor/ppo_kl"] == 0.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fipo_loss_and_every_gradient_match(pairs, variant):
    one, two = pairs[variant]
    batch = make_batch()
    old = one.compute_log_prob(batch, temperature=T)["old_log_probs"]
    batch = off_policy(batch, old)
    m1, g1 = gradients_of(one, batch)
    m2, g2 = gradients_of(two, batch)
    # The boundary response is dropped at both sizes (2 dual-clipped tokens over 2 shards).
    assert m1["actor/invalid_seq_frac"] > 0
    assert m2["actor/invalid_seq_frac"] == pytest.approx(m1["actor/invalid_seq_frac"])
    assert m2["actor/pg_loss"] == pytest.approx(m1["actor/pg_loss"], rel=1e-5, abs=1e-7)
    for key in (
        "actor/influence_weights_mean",
        "actor/influence_weights_max",
        "actor/influence_weights_min",
        "actor/pg_clipfrac",
        "actor/neg_is_p75",
    ):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    assert m2["actor/tokens"] == m1["actor/tokens"]
    assert m2["actor/response_tokens"] == m1["actor/response_tokens"]
    assert g1.keys() == g2.keys()
    for name in g1:
        scale = float(g1[name].abs().max())
        diff = float((g1[name] - g2[name]).abs().max())
        assert diff <= 1e-5 * max(scale, 1e-8), f"{name}: {diff:.3g} vs max |grad| {scale:.3g}"


def fipo_terms_of(worker, batch: Batch, part: list[int]) -> dict[str, torch.Tensor]:
    """The update's first step on one micro-batch, on this rank: log-probs of its piece and
    the FIPO terms on its own tokens (what ``PolicyTrainer.update`` computes)."""
    from fipo_trainer.algorithms.policy_loss import compute_policy_terms

    trainer = worker.trainer
    idx = torch.tensor(part)
    packed = pack_rows(batch["input_ids"][idx], batch["attention_mask"][idx], PROMPT_W)
    with torch.no_grad():
        logp, _, shards = trainer.forward_rows(packed, T, RESP_W, with_entropy=False)
        mask = batch["response_mask"][idx]
        own = mask if shards is None else mask * shards.owned(RESP_W)
        terms = compute_policy_terms(
            "fipo",
            batch["old_log_probs"][idx],
            logp,
            batch["advantages"][idx],
            own,
            trainer.config.policy_loss,
            shards,
        )
    return {
        "weights": terms.token_stats["influence_weights"] * own,
        "loss_mask": terms.loss_mask,
        "own": own,
    }


def test_influence_weights_match_at_and_around_the_shard_boundary(pairs):
    one, two = pairs["global-token-mean"]
    batch = make_batch()
    batch = off_policy(batch, one.compute_log_prob(batch, temperature=T)["old_log_probs"])
    row, left, right = boundary_row(batch)
    part = next(p for p in micro_batches(batch) if row in p)
    j = part.index(row)
    run = DeepSpeedActorWorker.run
    (full,) = one.worker_group.call_all(run, fipo_terms_of, batch, part)
    pieces = two.worker_group.call_all(run, fipo_terms_of, batch, part)
    # Each token is held by exactly one SP rank; together they are the SP 1 rows.
    assert torch.equal(sum(p["own"] for p in pieces), full["own"])
    stitched = sum(p["weights"] for p in pieces)
    assert float((stitched - full["weights"]).abs().max()) <= 1e-5
    near = [c for c in (left - 1, left, right, right + 1) if 0 <= c < RESPONSES[row]]
    assert torch.allclose(stitched[j, near], full["weights"][j, near], atol=1e-5)
    assert float(full["weights"][j, : RESPONSES[row]].max()) > 1.0  # weights are not all 1
    # The response with one dual-clipped token on each shard leaves the loss on both.
    assert float(full["loss_mask"][j].sum()) == 0.0
    assert all(float(p["loss_mask"][j].sum()) == 0.0 for p in pieces)


def test_batch_has_the_shapes_the_tests_need():
    """Several sequences per micro-batch, an odd total length, a 1-token sequence."""
    batch = make_batch()
    lengths = batch["attention_mask"].sum(-1).tolist()
    plan = micro_batches(batch)
    assert max(len(p) for p in plan) >= 3
    assert any(sum(lengths[i] for i in p) % 2 for p in plan)
    assert min(lengths) == 1


def test_a_loss_without_shards_support_is_refused(pairs):
    """A policy loss registered without a ``shards`` parameter cannot run sharded."""
    _, two = pairs["global-token-mean"]

    def register(worker) -> None:
        from fipo_trainer.algorithms.policy_loss import register_policy_loss, vanilla_policy_loss

        @register_policy_loss("test_plain_loss")
        def plain(old, logp, adv, mask, config):
            return vanilla_policy_loss(old, logp, adv, mask, config)

        worker.trainer.config = dataclasses.replace(worker.config, loss_name="test_plain_loss")

    def restore(worker) -> None:
        worker.trainer.config = worker.config

    batch = make_batch()
    batch = batch.union(two.compute_log_prob(batch, temperature=T).select("old_log_probs"))
    two.worker_group.call_all(DeepSpeedActorWorker.run, register)
    try:
        with pytest.raises(Exception, match=r"actor\.ulysses_sequence_parallel_size"):
            two.update(batch, temperature=T, global_step=1)
    finally:
        two.worker_group.call_all(DeepSpeedActorWorker.run, restore)
