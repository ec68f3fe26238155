"""The DeepSpeed actor on a real local Ray cluster: 2 ranks, ZeRO-2 and ZeRO-3, gloo, CPU.

The reference for "correct" is a plain single-process PyTorch update written independently
of the actor's code path: a padded HF forward, ``log_softmax``, the full mini-batch loss
from ``compute_policy_loss``, ``clip_grad_norm_`` and ``torch.optim.AdamW``. The ZeRO-3
group also runs with gradient checkpointing on.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fipo_trainer.actor import ActorConfig, ActorGroup
from fipo_trainer.actor.engine import WarmupConstant, train_step_warmup_factor
from fipo_trainer.actor.group import plan_rows
from fipo_trainer.actor.micro_batch import plan_token_budget
from fipo_trainer.actor.synthetic_batch import random_rollout_batch
from fipo_trainer.actor.worker import DeepSpeedActorWorker
from fipo_trainer.algorithms.policy_loss import compute_policy_loss
from fipo_trainer.cluster import WorkerCallError, init_ray, shutdown_ray
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.tiny_model import build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STAGES = (2, 3)
PROMPT_W, RESP_W = 12, 20
T = 1.0  # log-prob temperature


def make_config(model_path: Path, stage: int) -> ActorConfig:
    return ActorConfig(
        model_path=str(model_path),
        zero_stage=stage,
        lr=2e-3,
        lr_warmup_steps=3,
        eps=1e-6,
        weight_decay=0.1,
        grad_clip=0.5,
        ppo_mini_batch_size=4,  # prompts -> 8 rows per optimizer step with n=2
        ppo_max_token_len_per_gpu=64,
        loss_name="fipo",
        gradient_checkpointing=stage == 3,  # covered once, with ZeRO-3
    )


REFERENCE = "reference"  # the verl 0.5 normaliser + per-training-step warm-up, ZeRO-2


def reference_config(model_path: Path) -> ActorConfig:
    return dataclasses.replace(
        make_config(model_path, 2),
        loss_scale="reference",
        lr_warmup_unit="train_step",
        ppo_max_token_len_per_gpu=40,  # several micro-batches per rank
    )


def make_batch(num_prompts: int = 8, seed: int = 0) -> Batch:
    return random_rollout_batch(
        num_prompts=num_prompts,
        n=2,
        vocab_size=200,
        prompt_width=PROMPT_W,
        response_width=RESP_W,
        seed=seed,
    )


@pytest.fixture(scope="module")
def model_path() -> Path:
    return build_tiny_model()


@pytest.fixture(scope="module")
def actors(model_path, tmp_path_factory):
    """{stage: (ActorGroup, initial checkpoint dir)} on one local Ray cluster."""
    shutdown_ray()  # a Ray left by an earlier test module has other resources
    init_ray(num_cpus=3)  # 3 groups x 2 ranks x 0.5 CPU (logical)
    groups = {}
    try:
        for stage in STAGES:
            group = ActorGroup(make_config(model_path, stage), 2, name=f"actor-z{stage}")
            ckpt = group.save(str(tmp_path_factory.mktemp(f"z{stage}") / "init"))
            groups[stage] = (group, ckpt)
        group = ActorGroup(reference_config(model_path), 2, name="actor-reference")
        groups[REFERENCE] = (group, group.save(str(tmp_path_factory.mktemp("ref") / "init")))
        yield groups
    finally:
        for group, _ in groups.values():
            group.shutdown()
        shutdown_ray()


def fresh(actors, stage: int) -> ActorGroup:
    group, ckpt = actors[stage]
    group.load(ckpt)
    return group


def with_old_log_probs(group: ActorGroup, batch: Batch) -> Batch:
    return batch.union(group.compute_log_prob(batch, temperature=T))


def update(group: ActorGroup, batch: Batch, step: int = 1, **kwargs) -> dict[str, float]:
    return group.update(batch, temperature=T, global_step=step, **kwargs)


def assert_state_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"max weight difference {worst:.3g} > {atol:g}"


# --------------------------------------------------------------------------- reference


def padded_log_probs(model, batch: Batch) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    logits = out.logits[:, PROMPT_W - 1 : -1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, batch["responses"][..., None]).squeeze(-1)
    return lp * batch["response_mask"]


def reference_update(model_path: Path, cfg: ActorConfig, batch: Batch, rows: int):
    """Single-process update: one AdamW step per mini-batch of ``rows`` rows."""
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupConstant(cfg.lr_warmup_steps))
    losses, norms = [], []
    for start in range(0, len(batch), rows):
        mb = batch[start : start + rows]
        logp = padded_log_probs(model, mb)
        loss, _ = compute_policy_loss(
            cfg.loss_name,
            mb["old_log_probs"],
            logp,
            mb["advantages"],
            mb["response_mask"],
            cfg.policy_loss,
        )
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return {k: v.detach() for k, v in model.named_parameters()}, losses, norms


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stage", STAGES)
def test_log_probs_match_padded_hf_forward(actors, model_path, stage):
    group = fresh(actors, stage)
    batch = make_batch()
    out = group.compute_log_prob(batch, temperature=T)
    got, ent = out["old_log_probs"], out["entropy"]
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    with torch.no_grad():
        ref = padded_log_probs(model, batch)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[:, PROMPT_W - 1 : -1]
        lsm = torch.log_softmax(logits.double(), -1)
        ref_ent = -(lsm.exp() * lsm).sum(-1) * batch["response_mask"]
    mask = batch["response_mask"]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=0)
    assert got.shape == ent.shape == (16, RESP_W)
    assert bool((got[mask == 0] == 0).all()) and bool((ent[mask == 0] == 0).all())


@pytest.mark.parametrize("stage", STAGES)
def test_on_policy_ratio_is_exactly_one(actors, stage):
    """Old log-probs and the first mini-batch's log-probs agree bitwise whatever the budget."""
    for budget in (32, 64, 4096):
        group = fresh(actors, stage)
        batch = make_batch(num_prompts=4, seed=1)  # exactly one mini-batch
        old = group.compute_log_prob(batch, temperature=T, max_token_len=budget)
        metrics = update(group, batch.union(old), max_token_len=budget)
        assert metrics["actor/on_policy_log_ratio_abs_max"] == 0.0, budget
        assert metrics["actor/ppo_kl"] == 0.0
        assert metrics["actor/pg_clipfrac"] == 0.0
        assert metrics["actor/pg_clipfrac_lower"] == 0.0
        assert metrics["actor/influence_weights_min"] == 1.0
        assert metrics["actor/influence_weights_max"] == 1.0
    # Old log-probs taken with another budget: equal within fp32 noise (documented).
    group = fresh(actors, stage)
    batch = make_batch(num_prompts=4, seed=1)
    old = group.compute_log_prob(batch, temperature=T, max_token_len=4096)
    metrics = update(group, batch.union(old), max_token_len=32)
    assert metrics["actor/on_policy_log_ratio_abs_max"] < 1e-5
    assert metrics["actor/pg_clipfrac"] == 0.0


@pytest.mark.parametrize("stage", STAGES)
def test_update_matches_single_process_reference(actors, model_path, stage):
    """Two mini-batches (2 optimizer steps), FIPO loss, forced sequence invalidation."""
    group = fresh(actors, stage)
    cfg = group.config
    batch = with_old_log_probs(group, make_batch())
    # Make two negative-advantage responses of mini-batch 0 look 20x more likely now than
    # at rollout on two tokens each: FIPO drops them from the loss and its denominator.
    old = batch["old_log_probs"].clone()
    neg = [
        i
        for i in range(8)
        if batch["advantages"][i, 0] < 0 and batch["response_mask"][i].sum() >= 2
    ][:2]
    assert len(neg) == 2
    for i in neg:
        old[i, :2] -= 3.0
    batch["old_log_probs"] = old

    metrics = update(group, batch)
    ref_state, ref_losses, ref_norms = reference_update(model_path, cfg, batch, rows=8)

    assert metrics["actor/invalid_seq_frac"] > 0  # the rescaling path really ran
    assert metrics["actor/on_policy_log_ratio_abs_max"] == pytest.approx(3.0, abs=1e-4)
    assert metrics["actor/optimizer_steps"] == 2
    assert metrics["actor/pg_loss"] == pytest.approx(sum(ref_losses) / 2, abs=1e-5)
    assert metrics["actor/grad_norm"] == pytest.approx(sum(ref_norms) / 2, rel=1e-4)
    assert metrics["actor/lr"] == pytest.approx(cfg.lr * 2 / 3)  # warm-up step 2 of 3
    assert_state_close(group.full_state_dict(), ref_state, atol=2e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_micro_batch_cut_does_not_change_the_update(actors, stage):
    results = []
    for budget in (32, 4096):
        group = fresh(actors, stage)
        batch = make_batch(seed=2)
        old = group.compute_log_prob(batch, temperature=T, max_token_len=budget)
        metrics = update(group, batch.union(old), max_token_len=budget)
        results.append((metrics, group.full_state_dict()))
    (m_small, w_small), (m_big, w_big) = results
    assert (
        m_small["actor/micro_batches_per_rank"] > 2 and m_big["actor/micro_batches_per_rank"] == 1
    )
    assert m_small["actor/pg_loss"] == pytest.approx(m_big["actor/pg_loss"], abs=1e-6)
    assert m_small["actor/grad_norm"] == pytest.approx(m_big["actor/grad_norm"], rel=1e-5)
    assert_state_close(w_small, w_big, atol=1e-5)


def test_zero2_and_zero3_agree(actors):
    out = {}
    for stage in STAGES:
        group = fresh(actors, stage)
        metrics = update(group, with_old_log_probs(group, make_batch(seed=3)))
        out[stage] = (metrics, group.full_state_dict())
    (m2, w2), (m3, w3) = out[2], out[3]
    for key in ("actor/pg_loss", "actor/ppo_kl", "actor/pg_clipfrac"):
        assert m2[key] == pytest.approx(m3[key], abs=1e-6), key
    assert m2["actor/grad_norm"] == pytest.approx(m3["actor/grad_norm"], rel=1e-5)
    assert_state_close(w2, w3, atol=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_weights_identical_across_ranks_after_update(actors, stage):
    group = fresh(actors, stage)
    update(group, with_old_log_probs(group, make_batch(seed=4)))
    rank0, rank1 = group.worker_group.call_all(DeepSpeedActorWorker.full_state_dict, all_ranks=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_round_trip(actors, stage, tmp_path):
    group = fresh(actors, stage)
    update(group, with_old_log_probs(group, make_batch(seed=5)))
    ckpt = group.save(str(tmp_path / "step1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1"]  # no temp dir left
    second = with_old_log_probs(group, make_batch(seed=6))
    m_a = update(group, second)
    w_a = group.full_state_dict()
    group.load(ckpt)  # model, optimizer moments and LR schedule come back
    m_b = update(group, second)
    w_b = group.full_state_dict()
    assert m_a["actor/lr"] == m_b["actor/lr"]
    assert m_a["actor/pg_loss"] == pytest.approx(m_b["actor/pg_loss"], abs=1e-7)
    assert_state_close(w_a, w_b, atol=1e-7)
    # Saving again over the same directory replaces it atomically.
    assert group.save(ckpt) == ckpt


def test_checkpoint_from_other_zero_stage_is_refused(actors):
    _, ckpt2 = actors[2]
    group, _ = actors[3]
    with pytest.raises(
        WorkerCallError, match=r"zero_stage=2 on 2 ranks; this actor runs zero_stage=3"
    ):
        group.load(ckpt2)


@pytest.mark.parametrize("stage", STAGES)
def test_export_hf_loads_with_transformers(actors, stage, tmp_path):
    group = fresh(actors, stage)
    update(group, with_old_log_probs(group, make_batch(seed=7)))
    out = Path(group.export(str(tmp_path / "hf")))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token is not None
    exported = {k: v.detach() for k, v in model.named_parameters()}
    assert_state_close(exported, group.full_state_dict(), atol=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dir left


def _sync_names(worker) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(t.shape)) for n, t in worker.state_dict_for_sync(bucket_bytes=4096)]


@pytest.mark.parametrize("stage", STAGES)
def test_state_dict_for_sync_yields_full_hf_tensors_on_rank0(actors, model_path, stage):
    group = fresh(actors, stage)
    rank0, rank1 = group.worker_group.call_all(DeepSpeedActorWorker.run, _sync_names)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    assert rank0 == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert rank1 == []


# --------------------------------------------------------------------------- reference mode


def agreed_plans(per_rank_lengths: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Each rank's token-budget micro-batches, all ranks with the same count (as the actor
    agrees on it: the largest count any rank needs)."""
    count = 1
    while True:
        plans = [plan_token_budget(ls, budget, min_micro_batches=count) for ls in per_rank_lengths]
        agreed = max(len(p) for p in plans)
        if agreed == count:
            return plans
        count = agreed


def verl_reference_update(model_path: Path, cfg: ActorConfig, batch: Batch, step: int):
    """verl 0.5 on 2 data-parallel ranks, transcribed: per rank and micro-batch, the loss is
    the micro-batch's own token-mean (FIPO's dropped responses excluded) x micro rows /
    mini-batch rows per rank; ranks average gradients; one AdamW step per mini-batch at the
    training step's warm-up LR."""
    world = 2
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    params = list(model.parameters())
    lr = cfg.lr * train_step_warmup_factor(step, cfg.lr_warmup_steps)
    opt = torch.optim.AdamW(
        params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    partitions, local = plan_rows(batch, cfg, world, n=2)
    lengths = batch["attention_mask"].sum(-1).tolist()
    norms, losses = [], []
    for k in range(len(partitions[0]) // local):
        ranks_rows = [part[k * local : (k + 1) * local] for part in partitions]
        plans = agreed_plans(
            [[lengths[i] for i in rows] for rows in ranks_rows], cfg.ppo_max_token_len_per_gpu
        )
        opt.zero_grad()
        for rows, plan in zip(ranks_rows, plans):
            for micro in plan:
                mb = batch[torch.tensor([rows[i] for i in micro])]
                loss, _ = compute_policy_loss(
                    cfg.loss_name,
                    mb["old_log_probs"],
                    padded_log_probs(model, mb),
                    mb["advantages"],
                    mb["response_mask"],
                    cfg.policy_loss,
                )
                (loss * len(micro) / local / world).backward()  # / world: DP averaging
                losses.append(float(loss.detach()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}, losses, norms, lr


def test_reference_loss_scale_on_deepspeed_matches_verl_05(actors, model_path):
    group = fresh(actors, REFERENCE)
    cfg = group.config
    batch = with_old_log_probs(group, make_batch(seed=8))
    old = batch["old_log_probs"].clone()
    neg = [i for i in range(8) if batch["advantages"][i, 0] < 0]
    old[neg[0], :2] -= 3.0  # two dual-clipped tokens: FIPO drops this response
    old += 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(0))
    batch["old_log_probs"] = old * batch["response_mask"]

    metrics = update(group, batch, step=3)
    ref_state, ref_losses, ref_norms, ref_lr = verl_reference_update(model_path, cfg, batch, 3)

    assert metrics["actor/micro_batches_per_rank"] >= 2
    assert metrics["actor/invalid_seq_frac"] > 0
    assert metrics["actor/lr"] == pytest.approx(ref_lr) == pytest.approx(cfg.lr * 2 / 3)
    assert metrics["actor/pg_loss"] == pytest.approx(sum(ref_losses) / len(ref_losses), abs=1e-6)
    assert metrics["actor/grad_norm"] == pytest.approx(sum(ref_norms) / 2, rel=1e-5)
    assert_state_close(group.full_state_dict(), ref_state, atol=2e-5)


def test_train_step_warm_up_starts_at_lr_zero(actors):
    group = fresh(actors, REFERENCE)
    before = group.full_state_dict()
    metrics = update(group, with_old_log_probs(group, make_batch(seed=9)), step=1)
    assert metrics["actor/lr"] == 0.0
    after = group.full_state_dict()
    # AdamW at lr 0 moves nothing (weight decay is lr-scaled too).
    assert_state_close(before, after, atol=0.0)


def _niceness(worker: DeepSpeedActorWorker) -> int:
    import os

    return os.nice(0)


def test_cpu_actor_ranks_yield_cores_to_the_rollout_engine(actors):
    """On CPU the ranks run below the priority Ray gives every worker (the rollout engine's),
    so async overlap fills idle cores instead of taking the engine's
    (``Platform.yield_cpu_to_rollout``)."""
    import os

    from fipo_trainer.platform import CPU_TRAINING_NICE_STEP

    ray_default = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    group, _ = actors[2]
    wanted = min(19, ray_default + CPU_TRAINING_NICE_STEP)
    assert wanted > ray_default
    assert group.worker_group.call_all(DeepSpeedActorWorker.run, _niceness) == [wanted] * 2
