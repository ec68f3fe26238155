"""fipo-trainer: FIPO, DAPO and GRPO for LLM reasoning on Ray + vLLM + DeepSpeed."""

__version__ = "0.1.0"
