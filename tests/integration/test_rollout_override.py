"""rollout.override_config reaches both engines' model config (vLLM's hf_overrides, the HF
engine's AutoConfig): a context extension lifts the engine's context past config.json's.

Engines run in this process, one vLLM engine at a time (module-scoped, shut down at the end).
"""

from __future__ import annotations

import pytest

from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig, build_engine

pytestmark = pytest.mark.integration

POSITIONS = 256  # what the tiny model's config.json states
EXTENDED = {"max_position_embeddings": 512}
CFG = {"max_tokens": 8, "n": 1, "max_num_seqs": 8, "max_model_len": None}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny_256", max_position_embeddings=POSITIONS
    )


@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_override_config_extends_the_engines_context(engine_name, model_dir):
    plain = build_engine(model_dir, RolloutConfig(engine=engine_name, **CFG))
    try:
        assert plain.max_model_len == POSITIONS
    finally:
        plain.shutdown()
    engine = build_engine(
        model_dir, RolloutConfig(engine=engine_name, override_config=EXTENDED, **CFG)
    )
    try:
        assert engine.max_model_len == 512
        if engine_name == "vllm":
            hf_config = engine._llm.llm_engine.model_config.hf_config
        else:
            hf_config = engine.model.config
        assert hf_config.max_position_embeddings == 512
        out = engine.generate([[1, 2, 3]], SamplingConfig(temperature=0.0, max_tokens=4))
        assert len(out) == 1 and len(out[0].token_ids) >= 1
    finally:
        engine.shutdown()
