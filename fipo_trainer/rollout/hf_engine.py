"""Transformers ``generate`` as a fallback rollout engine (no vLLM needed).

Why keep it: it runs wherever transformers runs (new architectures before vLLM supports
them, machines without a vLLM build) and serves as an independent reference that the vLLM
engine is checked against. It is slower: left-padded static batches, no paged KV cache.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from fipo_trainer.platform import current_platform
from fipo_trainer.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutOutput, check_prompts
from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_config(model_path: str, override_config: dict[str, Any]):
    """The model's AutoConfig with ``override_config`` set on it (as vLLM's hf_overrides)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_path)
    for key, value in override_config.items():
        setattr(hf_config, key, value)
    return hf_config


class HFEngine:
    """``RolloutEngine`` on ``AutoModelForCausalLM.generate``.

    Log-probs are those of the sampled distribution's temperature: ``log_softmax(logits / T)``
    of each step's raw logits (``output_logits``), as the vLLM engine's
    ``processed_logprobs`` and the actor's log-probs at the training temperature.
    """

    def __init__(self, model_path: str | Path, config: RolloutConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config.validate()
        self.config = config
        self.model_path = str(model_path)
        plat = current_platform()
        self.device = plat.device(0)
        dtype = _DTYPES[config.dtype] if config.dtype else plat.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"the tokenizer in {self.model_path} has no pad token; the HF engine left-pads "
                "batches and needs one (set pad_token in tokenizer_config.json)"
            )
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            config=load_hf_config(self.model_path, config.override_config),
            dtype=dtype,
            attn_implementation=plat.attn_implementation,
        ).to(self.device)
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_model_len = int(config.max_model_len or self.model.config.max_position_embeddings)
        self._offloaded = False
        torch.manual_seed(config.seed)

    # --- generation -----------------------------------------------------------------
    def _stop_ids(self, sampling: SamplingConfig) -> list[int]:
        ids = list(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            eos = self.tokenizer.eos_token_id
            gen_eos = self.model.generation_config.eos_token_id
            for tok in [eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
                if tok is not None and tok not in ids:
                    ids.append(int(tok))
        return ids

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, stop_ids: list[int]
    ) -> list[tuple[tuple[int, ...], tuple[float, ...], str]]:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        max_new = min(sampling.max_tokens, self.max_model_len - width)
        gen_kwargs: dict = {
            "max_new_tokens": max_new,
            "num_return_sequences": sampling.n,
            "pad_token_id": pad,
            "eos_token_id": stop_ids or None,
            "return_dict_in_generate": True,
            "output_logits": True,
        }
        if sampling.greedy:
            gen_kwargs["do_sample"] = False
        else:
            gen_kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
            )
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=GenerationConfig(**gen_kwargs),
        )
        new_tokens = out.sequences[:, width:].cpu()
        if new_tokens.shape[1] == 0:
            raise RuntimeError("transformers generated no tokens; check rollout.max_tokens")
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [B*n, T, V] raw
        if not sampling.greedy and sampling.temperature != 1.0:
            logits = logits / sampling.temperature
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens[..., None])[..., 0]
        stop = torch.tensor(stop_ids, dtype=torch.long)
        results = []
        for row in range(new_tokens.shape[0]):
            toks = new_tokens[row]
            hits = torch.nonzero(torch.isin(toks, stop)).flatten() if stop_ids else torch.tensor([])
            if len(hits):
                length, reason = int(hits[0]) + 1, FINISH_STOP  # the stop token stays in
            else:
                length, reason = min(int(toks.shape[0]), max_new), FINISH_LENGTH
            results.append(
                (tuple(toks[:length].tolist()), tuple(log_probs[row, :length].tolist()), reason)
            )
        return results

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
    ) -> list[RolloutOutput]:
        """n responses per prompt, prompt-major (``num_return_sequences`` keeps them together)."""
        sampling.validate()
        if self._offloaded:
            raise RuntimeError("the HF engine is asleep; call wake() before generate()")
        if not prompt_token_ids:
            return []
        check_prompts(prompt_token_ids, self.vocab_size, self.max_model_len)
        stop_ids = self._stop_ids(sampling)
        rng = (
            torch.random.fork_rng(devices=[])
            if sampling.seed is not None
            else contextlib.nullcontext()
        )
        outputs: list[RolloutOutput] = []
        with rng:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            step = self.config.hf_batch_size
            for start in range(0, len(prompt_token_ids), step):
                chunk = prompt_token_ids[start : start + step]
                for j, (toks, lps, reason) in enumerate(
                    self._generate_chunk(chunk, sampling, stop_ids)
                ):
                    outputs.append(RolloutOutput(start + j // sampling.n, toks, lps, reason))
        return outputs

    # --- weights --------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model in place (tied weights share storage)."""
        targets = self.model.state_dict(keep_vars=True)
        count = 0
        for name, tensor in named_tensors:
            target = targets.get(name)
            if target is None:
                raise ValueError(
                    f"weight {name!r} from the actor is not a parameter of the rollout model "
                    f"{self.model_path}; actor and rollout must load the same architecture"
                )
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)} from the actor but "
                    f"{tuple(target.shape)} in the rollout model {self.model_path}"
                )
            target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
            count += 1
        return count

    # --- memory ---------------------------------------------------------------------
    def sleep(self) -> None:
        if not self.config.free_cache_engine:
            return
        if self.device.type == "cpu":
            logger.info("HF engine on CPU: nothing to free while the actor updates")
            return
        self.model.to("cpu")
        self._offloaded = True

    def wake(self) -> None:
        if self._offloaded:
            self.model.to(self.device)
            self._offloaded = False

    def shutdown(self) -> None:
        self.model = None
