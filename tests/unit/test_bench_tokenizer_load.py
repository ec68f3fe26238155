"""scripts/bench_tokenizer_load.py: both loaders run in fresh processes after the driver's
imports; only AutoTokenizer brings in the model stack, and both give the same class."""

from __future__ import annotations

from tests.helpers.scripts import load_script

bt = load_script("bench_tokenizer_load")


def test_only_autotokenizer_imports_the_model_stack(warm_tiny_model):
    auto = bt.run_child("AutoTokenizer", str(warm_tiny_model))
    direct = bt.run_child("load_tokenizer", str(warm_tiny_model))
    assert auto["class"] == direct["class"] == "Qwen2Tokenizer"
    assert "torch._dynamo" in auto["heavy"] and direct["heavy"] == []
    assert auto["cpu_s"] > 0 and direct["cpu_s"] > 0
