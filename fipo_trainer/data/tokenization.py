"""Prompt messages -> prompt text -> token ids: the one tokenisation of every prompt.

Why its own module: training prompts (:class:`~fipo_trainer.data.dataset.PromptDataset`),
``fipo-eval`` (through the same dataset) and the tiny model's supervised warm start must
turn chat messages into exactly the same ids, or a model is evaluated (or warm-started) on
prompts that differ from the ones it is trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fipo_trainer.data.records import DataError  # a one-line error at the CLI, not a trace

__all__ = [
    "encode_prompts",
    "load_tokenizer",
    "prompt_ids",
    "render_prompt",
    "resolve_chat_template",
]

#: Model types whose registered tokenizer class AutoTokenizer picks when a checkpoint's
#: ``tokenizer_config.json`` names that same class (checked against transformers' own
#: mapping in tests/unit/test_tokenizer_loading.py): the Qwen families the recipes train.
DIRECT_TOKENIZER_CLASSES = {
    "qwen2": "Qwen2Tokenizer",
    "qwen2_moe": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "qwen3_moe": "Qwen2Tokenizer",
}

#: Texts per tokenizer call (large files show a progress bar per chunk).
ENCODE_CHUNK = 2048


def direct_tokenizer_class(path: str | Path) -> str | None:
    """The class AutoTokenizer would load from the local checkpoint ``path``, when that is
    sure without asking AutoTokenizer (``None``: ask it).

    Sure means: the directory's ``config.json`` has a model type listed in
    ``DIRECT_TOKENIZER_CLASSES``, its ``tokenizer_config.json`` names that type's registered
    class (a ``Fast`` suffix aside) and carries no ``auto_map`` (remote code).
    """
    path = Path(path)
    try:
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = DIRECT_TOKENIZER_CLASSES.get(model_type)
    named = tok_cfg.get("tokenizer_class")
    if wanted is None or "auto_map" in tok_cfg or not isinstance(named, str):
        return None
    return wanted if named.removesuffix("Fast") == wanted else None


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, the same tokenizer, without importing every
    model's code where the class is known (``direct_tokenizer_class``).

    Why: in transformers 5, importing AutoTokenizer imports the auto model mappings, and
    with them ``torch._dynamo``, sympy and triton: 2.1 CPU-s and ~150 MiB more in the
    trainer's driver, which tokenizes prompts but never runs a model. Any other checkpoint
    goes through AutoTokenizer as before.
    """
    import transformers

    name = direct_tokenizer_class(path)
    if name is None:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    return getattr(transformers, name).from_pretrained(str(path))


def resolve_chat_template(tokenizer: Any, wanted: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template (``None``: if it has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if wanted is None:
        return has_template
    if wanted and not has_template:
        name = getattr(tokenizer, "name_or_path", "")
        raise DataError(
            f"data.apply_chat_template=true but the tokenizer{f' of {name}' if name else ''} "
            "has no chat template: set data.apply_chat_template=false (plain-text prompts, base models) or use a "
            "model with a chat template"
        )
    return wanted


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], chat_template: bool) -> str:
    """Prompt text: chat template + generation prompt, or the contents joined (base models)."""
    if chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def encode_prompts(
    tokenizer: Any, texts: Sequence[str], chat_template: bool, *, desc: str = "tokenizing"
) -> list[list[int]]:
    """Token ids of rendered prompts, in chunks (a progress bar for large inputs).

    Chat templates already add BOS where the model wants it, so special tokens are added
    only to plain-text prompts.
    """
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    bar = tqdm(total=len(texts), desc=desc, disable=len(texts) < 4 * ENCODE_CHUNK)
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = list(texts[start : start + ENCODE_CHUNK])
        out.extend(
            tokenizer(chunk, add_special_tokens=not chat_template, verbose=False)["input_ids"]
        )
        bar.update(len(chunk))
    bar.close()
    return out


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Chat-template token ids with the generation prompt (one prompt)."""
    return encode_prompts(tokenizer, [render_prompt(tokenizer, messages, True)], True)[0]
