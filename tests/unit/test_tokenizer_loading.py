"""``load_tokenizer``: AutoTokenizer's tokenizer, without importing transformers' model stack
where the class is known (the driver tokenizes prompts but never runs a model)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fipo_trainer.data.tokenization import (
    DIRECT_TOKENIZER_CLASSES,
    direct_tokenizer_class,
    load_tokenizer,
    prompt_ids,
)


def test_direct_classes_are_the_ones_transformers_registers():
    """The fast path's premise: for these model types AutoTokenizer resolves the class the
    checkpoint names to the type's registered class, and no hub-id override applies."""
    from transformers.models.auto import tokenization_auto as auto

    for model_type, name in DIRECT_TOKENIZER_CLASSES.items():
        assert auto.TOKENIZER_MAPPING_NAMES[model_type] == name, model_type
        assert auto.tokenizer_class_from_name(name).__name__ == name
    assert not any("qwen" in p for p in auto.MODEL_IDS_TO_TOKENIZERS_BACKEND)


def test_tiny_model_gets_the_tokenizer_autotokenizer_gives(warm_tiny_model):
    from transformers import AutoTokenizer

    assert direct_tokenizer_class(warm_tiny_model) == "Qwen2Tokenizer"
    ours, theirs = load_tokenizer(warm_tiny_model), AutoTokenizer.from_pretrained(warm_tiny_model)
    assert type(ours) is type(theirs)
    messages = [{"role": "user", "content": "What is 3 + 4? End with Answer: N."}]
    assert prompt_ids(ours, messages) == prompt_ids(theirs, messages)
    text = "Answer: 7 <|end|> 12+30"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    ids = theirs(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "chat_template", "padding_side"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr


def _checkpoint(tmp_path, model_type: str, tokenizer_config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(tmp_path)


@pytest.mark.parametrize(
    ("model_type", "tokenizer_config", "expected"),
    [
        ("qwen2", {"tokenizer_class": "Qwen2Tokenizer"}, "Qwen2Tokenizer"),
        ("qwen3", {"tokenizer_class": "Qwen2TokenizerFast"}, "Qwen2Tokenizer"),
        # AutoTokenizer's own rules decide everything else:
        ("qwen2", {"tokenizer_class": "PreTrainedTokenizerFast"}, None),  # a known-bad hub class
        ("qwen2", {"tokenizer_class": "Qwen2Tokenizer", "auto_map": {"AutoTokenizer": ["a.B", None]}}, None),
        ("qwen2", {}, None),  # no class named: the model type decides
        ("llama", {"tokenizer_class": "LlamaTokenizer"}, None),  # a type not listed
    ],
)
def test_only_a_checkpoint_naming_its_types_class_skips_autotokenizer(
    tmp_path, model_type, tokenizer_config, expected
):
    assert direct_tokenizer_class(_checkpoint(tmp_path, model_type, tokenizer_config)) == expected


def test_hub_ids_and_incomplete_directories_go_through_autotokenizer(tmp_path):
    assert direct_tokenizer_class("Qwen/Qwen2.5-7B") is None  # not a local directory
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
    assert direct_tokenizer_class(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text("not json")
    assert direct_tokenizer_class(tmp_path) is None


def test_loading_prompts_does_not_import_the_model_stack(warm_tiny_model):
    """The driver's start-up: AutoTokenizer's import alone costs ~2 CPU-s and ~150 MiB
    (``torch._dynamo``, sympy, triton and every model's auto mapping)."""
    code = textwrap.dedent(f"""
        import sys
        from fipo_trainer.data.tokenization import load_tokenizer, prompt_ids
        tok = load_tokenizer({str(warm_tiny_model)!r})
        prompt_ids(tok, [{{"role": "user", "content": "1 + 2"}}])
        heavy = [m for m in ("torch._dynamo", "sympy", "triton",
                             "transformers.models.auto.modeling_auto") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
