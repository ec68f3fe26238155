"""The DeepSpeed actor on a real local Ray cluster: 2 ranks, ZeRO-2 and ZeRO-3, gloo, CPU.

The reference for "correct" is a plain single-process PyTorch update written independently
of the actor's code path: a padded HF forward, ``log_softmax``, the full mini-batch loss
from ``compute_policy_loss``, ``clip_grad_norm_`` and ``torch.optim.AdamW``. The ZeRO-3
group also runs with gradient checkpointing on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fipo_trainer.actor import ActorConfig, ActorGroup
from fipo_trainer.actor.engine import WarmupConstant
from fipo_trainer.actor.synthetic_batch import random_rollout_batch
from fipo_trainer.algorithms.policy_loss import compute_policy_loss
from fipo_trainer.cluster import WorkerCallError, init_ray, shutdown_ray
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.tiny_model import build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STAGES = (2, 3)
PROMPT_W, RESP_W = 12, 20
BUDGET = "max_token_len_per_gpu"  # Batch.meta override of the token budget


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
    init_ray(num_cpus=2)
    groups = {}
    try:
        for stage in STAGES:
            group = ActorGroup(make_config(model_path, stage), 2, name=f"actor-z{stage}")
            ckpt = group.save_checkpoint(str(tmp_path_factory.mktemp(f"z{stage}") / "init"))
            groups[stage] = (group, ckpt)
        yield groups
    finally:
        for group, _ in groups.values():
            group.shutdown()
        shutdown_ray()


def fresh(actors, stage: int) -> ActorGroup:
    group, ckpt = actors[stage]
    group.load_checkpoint(ckpt)
    return group


def with_old_log_probs(group: ActorGroup, batch: Batch) -> Batch:
    return batch.union(group.compute_log_prob(batch))


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
    batch.meta["calculate_entropy"] = True
    out = group.compute_log_prob(batch)
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
        batch.meta[BUDGET] = budget
        metrics = group.update_policy(with_old_log_probs(group, batch))
        assert metrics["actor/on_policy_log_ratio_abs_max"] == 0.0, budget
        assert metrics["actor/ppo_kl"] == 0.0
        assert metrics["actor/pg_clipfrac"] == 0.0
        assert metrics["actor/pg_clipfrac_lower"] == 0.0
        assert metrics["actor/influence_weights_min"] == 1.0
        assert metrics["actor/influence_weights_max"] == 1.0
    # Old log-probs taken with another budget: equal within fp32 noise (documented).
    group = fresh(actors, stage)
    batch = make_batch(num_prompts=4, seed=1)
    batch.meta[BUDGET] = 4096
    old = group.compute_log_prob(batch)
    batch.meta[BUDGET] = 32
    metrics = group.update_policy(batch.union(old))
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

    metrics = group.update_policy(batch)
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
        batch.meta[BUDGET] = budget
        metrics = group.update_policy(with_old_log_probs(group, batch))
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
        metrics = group.update_policy(with_old_log_probs(group, make_batch(seed=3)))
        out[stage] = (metrics, group.full_state_dict())
    (m2, w2), (m3, w3) = out[2], out[3]
    for key in ("actor/pg_loss", "actor/ppo_kl", "actor/pg_clipfrac"):
        assert m2[key] == pytest.approx(m3[key], abs=1e-6), key
    assert m2["actor/grad_norm"] == pytest.approx(m3["actor/grad_norm"], rel=1e-5)
    assert_state_close(w2, w3, atol=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_weights_identical_across_ranks_after_update(actors, stage):
    group = fresh(actors, stage)
    group.update_policy(with_old_log_probs(group, make_batch(seed=4)))
    rank0, rank1 = group.workers.execute_all("full_state_dict", all_ranks=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_round_trip(actors, stage, tmp_path):
    group = fresh(actors, stage)
    group.update_policy(with_old_log_probs(group, make_batch(seed=5)))
    ckpt = group.save_checkpoint(str(tmp_path / "step1"))
    assert not (tmp_path / ".step1.tmp").exists()
    second = with_old_log_probs(group, make_batch(seed=6))
    m_a = group.update_policy(second)
    w_a = group.full_state_dict()
    group.load_checkpoint(ckpt)  # model, optimizer moments and LR schedule come back
    m_b = group.update_policy(second)
    w_b = group.full_state_dict()
    assert m_a["actor/lr"] == m_b["actor/lr"]
    assert m_a["actor/pg_loss"] == pytest.approx(m_b["actor/pg_loss"], abs=1e-7)
    assert_state_close(w_a, w_b, atol=1e-7)
    # Saving again over the same directory replaces it atomically.
    assert group.save_checkpoint(ckpt) == ckpt


def test_checkpoint_from_other_zero_stage_is_refused(actors):
    _, ckpt2 = actors[2]
    group, _ = actors[3]
    with pytest.raises(
        WorkerCallError, match=r"zero_stage=2 on 2 ranks; this actor runs zero_stage=3"
    ):
        group.load_checkpoint(ckpt2)


@pytest.mark.parametrize("stage", STAGES)
def test_export_hf_loads_with_transformers(actors, stage, tmp_path):
    group = fresh(actors, stage)
    group.update_policy(with_old_log_probs(group, make_batch(seed=7)))
    out = Path(group.export_hf(str(tmp_path / "hf")))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token is not None
    exported = {k: v.detach() for k, v in model.named_parameters()}
    assert_state_close(exported, group.full_state_dict(), atol=0.0)
    assert not (tmp_path / ".hf.tmp").exists()


def _sync_names(worker) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(t.shape)) for n, t in worker.state_dict_for_sync(bucket_bytes=4096)]


@pytest.mark.parametrize("stage", STAGES)
def test_state_dict_for_sync_yields_full_hf_tensors_on_rank0(actors, model_path, stage):
    group = fresh(actors, stage)
    rank0, rank1 = group.workers.execute_all("run", _sync_names)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    assert rank0 == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert rank1 == []
