"""Tiny model factory: real save_pretrained / Auto* loading, caching, atomic parallel builds."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from fipo_trainer.data.synthetic import ArithmeticTask, make_rows, solution_text
from fipo_trainer.data.tiny_model import (
    MARKER_FILE,
    TinyModelSettings,
    build_tiny_model,
    read_info,
)
from fipo_trainer.data.warm_start import greedy_accuracy


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_cache")


@pytest.fixture(scope="module")
def model_dir(cache) -> Path:
    return build_tiny_model(cache_dir=cache)


def test_loads_with_auto_classes(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, Qwen2ForCausalLM)
    cfg = model.config
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2 and cfg.head_dim == 32
    assert cfg.max_position_embeddings >= 512
    assert cfg.vocab_size == len(tok) < 300  # small vocabulary
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        tok.eos_token_id,
        tok.pad_token_id,
        tok.bos_token_id,
    )
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.padding_side == "left"


def test_embeddings_are_untied_by_default(model_dir, cache):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings is False
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head)
    assert "lm_head.weight" in load_file(model_dir / "model.safetensors")
    tied = AutoModelForCausalLM.from_pretrained(
        build_tiny_model(cache_dir=cache, tie_word_embeddings=True)
    )
    assert tied.config.tie_word_embeddings is True
    assert (
        tied.get_input_embeddings().weight.data_ptr()
        == tied.get_output_embeddings().weight.data_ptr()
    )


def test_chat_template_and_vocabulary_cover_the_task(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is 12+34?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|user|>What is 12+34?<|end|><|assistant|>"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == "<|user|>What is 12+34?<|end|>"
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.convert_tokens_to_ids(
        "<|assistant|>"
    )
    for row in make_rows(50, seed=0):
        text = row["prompt"][0]["content"] + solution_text(
            row["extra_info"]["expr"], int(row["reward_model"]["ground_truth"])
        )
        enc = tok(text, add_special_tokens=False)["input_ids"]
        assert len(enc) == len(text)  # one token per character: no merges, no unknowns
        assert tok.decode(enc) == text
    odd = "∫ x² dx = ½ — ünïcödé\t$\\frac{1}{2}$"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    assert tok.decode(tok("12<|end|>")["input_ids"], skip_special_tokens=True) == "12"


def test_cache_is_reused_and_keyed_by_settings(model_dir, cache):
    marker = model_dir / MARKER_FILE
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_tiny_model(cache_dir=cache)
    assert again == model_dir and marker.stat().st_mtime_ns == before
    assert time.perf_counter() - start < 0.5
    assert model_dir.name == TinyModelSettings().key()
    assert read_info(model_dir)["settings"]["hidden_size"] == 64
    keys = {
        TinyModelSettings().key(),
        TinyModelSettings(seed=1).key(),
        TinyModelSettings(warm_start_steps=5).key(),
        TinyModelSettings(warm_start_steps=5, warm_start_lr=1e-3).key(),
        TinyModelSettings(task_digits=1).key(),
        TinyModelSettings(hidden_size=128).key(),
    }
    assert len(keys) == 6
    other = build_tiny_model(cache_dir=cache, seed=1)
    assert other != model_dir
    w0 = load_file(model_dir / "model.safetensors")["lm_head.weight"]
    w1 = load_file(other / "model.safetensors")["lm_head.weight"]
    assert not torch.equal(w0, w1)
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temp dirs left behind


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FIPO_TINY_MODEL_CACHE", str(tmp_path))
    path = build_tiny_model(num_layers=1)
    assert path.parent == tmp_path and (path / "config.json").is_file()


def test_explicit_out_dir(tmp_path):
    out = tmp_path / "model"
    assert build_tiny_model(out) == out.resolve()
    assert build_tiny_model(out) == out.resolve()  # same settings: reused
    with pytest.raises(ValueError, match="other settings"):
        build_tiny_model(out, seed=3)
    assert build_tiny_model(out, seed=3, force=True) == out.resolve()
    assert read_info(out)["settings"]["seed"] == 3
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a tiny-model build"):
        build_tiny_model(junk)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 48}, "multiple of head_dim"),
        ({"head_dim": 16}, "head_dim"),
        ({"num_layers": 0}, "num_layers"),
        ({"warm_start_steps": -1}, "warm_start_steps"),
        ({"task_digits": 0}, "digits"),
    ],
)
def test_bad_settings(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(cache_dir=tmp_path, **kwargs)


def _build_in_child(cache: str, barrier, queue) -> None:
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("fipo_trainer.data.tiny_model")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    barrier.wait()  # both builders start at the same moment
    path = build_tiny_model(cache_dir=cache, seed=7)
    queue.put((str(path), any("built concurrently" in r for r in records)))


def test_parallel_builders_do_not_collide(tmp_path):
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [
        ctx.Process(target=_build_in_child, args=(str(tmp_path), barrier, queue)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len({path for path, _ in results}) == 1
    # both built; the second rename lost the race and fell back to the winner's directory
    assert sorted(lost for _, lost in results) == [False, True]
    built = Path(results[0][0])
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temp dirs left
    AutoModelForCausalLM.from_pretrained(built)
    assert read_info(built)["settings"]["seed"] == 7


def test_warm_start_is_deterministic_and_lowers_the_loss(tmp_path):
    a = build_tiny_model(cache_dir=tmp_path / "a", warm_start_steps=20, task_digits=1)
    b = build_tiny_model(cache_dir=tmp_path / "b", warm_start_steps=20, task_digits=1)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    cold = load_file(
        build_tiny_model(cache_dir=tmp_path / "a", task_digits=1) / "model.safetensors"
    )
    assert not torch.equal(cold["lm_head.weight"], wa["lm_head.weight"])
    info = read_info(a)["warm_start"]
    assert info["steps"] == 20 and info["final_loss"] < 0.5 * info["first_loss"]
    assert 0.0 <= info["greedy_accuracy"] <= 1.0


def test_warm_start_gives_rl_a_starting_accuracy(tmp_path):
    """Measured: digits=1, 200 steps -> ~0.85-1.0 greedy accuracy in a few seconds."""
    path = build_tiny_model(cache_dir=tmp_path, warm_start_steps=200, task_digits=1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    # re-measured here on other held-out prompts, with the model as loaded from disk
    rows = make_rows(128, seed=99, task=ArithmeticTask(digits=1), split="test")
    accuracy = greedy_accuracy(model, tok, rows)
    assert accuracy >= 0.5, f"greedy accuracy after warm start only {accuracy:.2f}"
    assert read_info(path)["warm_start"]["greedy_accuracy"] >= 0.5
