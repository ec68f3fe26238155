"""The Ray-free update (``PolicyTrainer``) driven in one process with a plain torch engine.

The references here are written independently of the update's code path: a padded HF
forward with ``log_softmax(logits / T)``, the per-micro-batch loss from
``compute_policy_loss`` and the normaliser rule transcribed from verl 0.5's
``dp_actor.update_policy`` (loss x micro rows / mini rows, or / #micro-batches).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fipo_trainer.actor.comm import Collectives
from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.policy_trainer import PolicyTrainer
from fipo_trainer.actor.synthetic_batch import random_rollout_batch
from fipo_trainer.algorithms.policy_loss import compute_policy_loss
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.tiny_model import build_tiny_model
from tests.helpers.torch_engine import TorchEngine

PROMPT_W, RESP_W = 8, 16
ROWS = 8  # 4 prompts x 2 responses = one mini-batch


@pytest.fixture(scope="module")
def model_path():
    return build_tiny_model()


def make_config(model_path, **overrides) -> ActorConfig:
    values = dict(
        model_path=str(model_path),
        lr=1e-3,
        lr_warmup_steps=0,
        grad_clip=0.0,
        ppo_mini_batch_size=4,
        ppo_max_token_len_per_gpu=1024,
        loss_name="fipo",
    )
    values.update(overrides)
    return ActorConfig(**values)


def make_trainer(cfg: ActorConfig) -> PolicyTrainer:
    torch.manual_seed(0)
    return PolicyTrainer(cfg, TorchEngine(cfg), Collectives(1))


def padded_log_probs(model, batch: Batch, temperature: float = 1.0):
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    logits = out.logits[:, PROMPT_W - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, batch["responses"][..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = batch["response_mask"]
    return logp * mask, entropy * mask


def off_policy_batch(trainer: PolicyTrainer, temperature: float = 1.0) -> Batch:
    """A batch whose old log-probs differ from the policy: ratios != 1, influence weights
    != 1, one negative-advantage response with 2 dual-clipped tokens (dropped by FIPO) and
    one with a single dual-clipped token (kept)."""
    batch = random_rollout_batch(
        num_prompts=4,
        n=2,
        vocab_size=200,
        prompt_width=PROMPT_W,
        response_width=RESP_W,
        min_response_len=4,
        seed=3,
    )
    old = trainer.compute_log_prob(batch, mini_batch_rows=ROWS, temperature=temperature)
    g = torch.Generator().manual_seed(1)
    mask = batch["response_mask"]
    old_lp = old["old_log_probs"] + 0.1 * torch.randn(old["old_log_probs"].shape, generator=g)
    negative = [i for i in range(ROWS) if float(batch["advantages"][i, 0]) < 0]
    assert len(negative) >= 2
    old_lp[negative[0], [1, 3]] -= 3.0  # ratio e^3 > c = 10: dual-clipped twice -> dropped
    old_lp[negative[1], 2] -= 3.0  # once -> kept
    batch.tensors["old_log_probs"] = old_lp * mask
    return batch


def reference_grads(model_path, cfg: ActorConfig, batch: Batch, parts, temperature: float):
    """verl 0.5's rule: per micro-batch token-mean over its surviving mask, x rows/mini-rows
    (token budget) or / number of micro-batches (fixed size); gradients summed."""
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    model.train()
    for part, loss in zip(parts, micro_batch_losses(model, cfg, batch, parts, temperature)):
        factor = len(part) / ROWS if cfg.use_dynamic_bsz else 1.0 / len(parts)
        (loss * factor).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def micro_batch_losses(model, cfg: ActorConfig, batch: Batch, parts, temperature: float = 1.0):
    """Each micro-batch's own FIPO loss: token-mean over its surviving mask."""
    losses = []
    for part in parts:
        mb = batch[torch.tensor(part)]
        logp, _ = padded_log_probs(model, mb, temperature)
        loss, _ = compute_policy_loss(
            "fipo",
            mb["old_log_probs"],
            logp,
            mb["advantages"],
            mb["response_mask"],
            cfg.policy_loss,
        )
        losses.append(loss)
    return losses


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


CUTS = [  # (use_dynamic_bsz, budget or micro size): 3 token-budget cuts + a fixed-size one
    (True, 1024),
    (True, 60),
    (True, 30),
    (False, 3),
]


@pytest.mark.parametrize("dynamic,size", CUTS)
def test_reference_loss_scale_matches_verl_rule(model_path, dynamic, size):
    cfg = make_config(
        model_path,
        loss_scale="reference",
        use_dynamic_bsz=dynamic,
        ppo_max_token_len_per_gpu=size if dynamic else 1024,
        micro_batch_size_per_gpu=size if not dynamic else 4,
    )
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer, temperature=0.7)
    lengths = batch["attention_mask"].sum(-1).tolist()
    parts = trainer.plan(lengths, cfg.ppo_max_token_len_per_gpu, "budget")
    assert dynamic is False or size == 1024 or len(parts) >= 2
    metrics = trainer.update(batch, mini_batch_rows=ROWS, temperature=0.7, global_step=1)
    (grads,) = trainer.engine.last_grads
    ref = reference_grads(model_path, cfg, batch, parts, 0.7)
    assert max_abs_diff(grads, ref) <= 1e-6
    assert metrics["actor/invalid_seq_frac"] > 0  # the dropped response is in the batch
    assert metrics["actor/micro_batches_per_rank"] == len(parts)


def test_reference_metrics_are_the_mean_over_micro_batches(model_path):
    cfg = make_config(model_path, loss_scale="reference", ppo_max_token_len_per_gpu=30)
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    parts = trainer.plan(batch["attention_mask"].sum(-1).tolist(), 30, "budget")
    metrics = trainer.update(batch, mini_batch_rows=ROWS, temperature=1.0, global_step=1)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    losses = [float(x.detach()) for x in micro_batch_losses(model, cfg, batch, parts)]
    assert metrics["actor/pg_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)


def test_global_loss_scale_is_the_full_mini_batch_loss_and_differs_from_reference(model_path):
    cfg = make_config(model_path, loss_scale="global", ppo_max_token_len_per_gpu=30)
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    trainer.update(batch, mini_batch_rows=ROWS, temperature=1.0, global_step=1)
    (grads,) = trainer.engine.last_grads
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    logp, _ = padded_log_probs(model, batch)
    loss, _ = compute_policy_loss(
        "fipo",
        batch["old_log_probs"],
        logp,
        batch["advantages"],
        batch["response_mask"],
        cfg.policy_loss,
    )
    loss.backward()
    full = {n: p.grad for n, p in model.named_parameters()}
    assert max_abs_diff(grads, full) <= 1e-6
    parts = trainer.plan(batch["attention_mask"].sum(-1).tolist(), 30, "budget")
    ref = reference_grads(model_path, cfg, batch, parts, 1.0)
    assert max_abs_diff(full, ref) > 1e-4  # the two normalisers are different rules


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_log_probs_and_entropy_at_the_rollout_temperature(model_path, temperature):
    trainer = make_trainer(make_config(model_path, ppo_max_token_len_per_gpu=40))
    batch = random_rollout_batch(
        num_prompts=4, n=2, vocab_size=200, prompt_width=PROMPT_W, response_width=RESP_W, seed=5
    )
    out = trainer.compute_log_prob(batch, mini_batch_rows=ROWS, temperature=temperature)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    with torch.no_grad():
        logp, entropy = padded_log_probs(model, batch, temperature)
    assert sorted(out.keys()) == ["entropy", "old_log_probs"]
    assert torch.allclose(out["old_log_probs"], logp, atol=1e-5)
    assert torch.allclose(out["entropy"], entropy, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_on_policy_ratio_is_exactly_one_at_any_temperature(model_path, temperature):
    cfg = make_config(model_path, loss_scale="reference", ppo_max_token_len_per_gpu=40)
    trainer = make_trainer(cfg)
    batch = random_rollout_batch(
        num_prompts=4, n=2, vocab_size=200, prompt_width=PROMPT_W, response_width=RESP_W, seed=5
    )
    old = trainer.compute_log_prob(batch, mini_batch_rows=ROWS, temperature=temperature)
    batch.tensors["old_log_probs"] = old["old_log_probs"]
    metrics = trainer.update(batch, mini_batch_rows=ROWS, temperature=temperature, global_step=1)
    assert metrics["actor/on_policy_log_ratio_abs_max"] == 0.0
    assert metrics["actor/pg_clipfrac"] == 0.0


def test_train_step_warmup_holds_the_lr_for_every_mini_batch(model_path):
    cfg = make_config(
        model_path, lr_warmup_unit="train_step", lr_warmup_steps=3, ppo_mini_batch_size=2
    )
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    logged = []
    for step in (1, 2, 3, 4, 5):
        logged.append(
            trainer.update(batch, mini_batch_rows=4, temperature=1.0, global_step=step)["actor/lr"]
        )
    used = trainer.engine.lrs  # 2 mini-batches per step
    expected = [0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3]
    assert used == pytest.approx([lr for lr in expected for _ in range(2)])
    assert logged == pytest.approx(expected)


def test_optimizer_step_warmup_counts_optimizer_steps(model_path):
    cfg = make_config(
        model_path, lr_warmup_unit="optimizer_step", lr_warmup_steps=3, ppo_mini_batch_size=2
    )
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    trainer.update(batch, mini_batch_rows=4, temperature=1.0, global_step=1)
    trainer.update(batch, mini_batch_rows=4, temperature=1.0, global_step=2)
    assert trainer.engine.lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])


def test_unknown_loss_scale_and_warmup_unit_are_refused(model_path):
    with pytest.raises(ValueError, match=r"actor\.loss_scale"):
        make_config(model_path, loss_scale="verl")
    with pytest.raises(ValueError, match=r"actor\.lr_warmup_unit"):
        make_config(model_path, lr_warmup_unit="epoch")


def test_sign_subset_quantiles_weigh_micro_batches_by_their_own_tokens(model_path):
    """``loss_scale: global``: ``actor/pos_is_median`` over micro-batches is weighted by each
    micro-batch's positive-advantage tokens (``neg_is_p75`` by its negative ones). Before,
    every micro-batch weighed by all its response tokens, so one with a single positive
    token counted as much in ``pos_is_median`` as one full of them."""
    cfg = make_config(model_path, loss_scale="global", ppo_max_token_len_per_gpu=30)
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    parts = trainer.plan(batch["attention_mask"].sum(-1).tolist(), 30, "budget")
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    expected = {}
    for key, sign in (("pos_is_median", 1), ("neg_is_p75", -1)):
        pairs = []
        for part in parts:
            mb = batch[torch.tensor(part)]
            logp, _ = padded_log_probs(model, mb)
            _, m = compute_policy_loss(
                "fipo", mb["old_log_probs"], logp, mb["advantages"], mb["response_mask"],
                cfg.policy_loss,
            )  # fmt: skip
            own = int(((mb["advantages"] * sign > 0) & mb["response_mask"].bool()).sum())
            if key in m:
                pairs.append((m[key], own, int(mb["response_mask"].sum())))
        assert len({round(v, 6) for v, _, _ in pairs}) > 1  # the weighting matters here
        expected[key] = sum(v * w for v, w, _ in pairs) / sum(w for _, w, _ in pairs)
        by_all = sum(v * a for v, _, a in pairs) / sum(a for _, _, a in pairs)
        assert abs(expected[key] - by_all) > 1e-4, key  # the old rule gives another value
    metrics = trainer.update(batch, mini_batch_rows=ROWS, temperature=1.0, global_step=1)
    for key, value in expected.items():
        assert metrics[f"actor/{key}"] == pytest.approx(value, abs=1e-5), key
