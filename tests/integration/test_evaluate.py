"""fipo-eval end to end: tiny warm-started model, synthetic arithmetic rows, HF engine, real grader pool."""

from __future__ import annotations

import io
import json
from collections import defaultdict

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.dataset import PromptDataset
from fipo_trainer.data.synthetic import make_rows, write_rows
from fipo_trainer.rewards.dapo import INVALID_PRED, compute_score
from fipo_trainer.trainer.evaluate import (
    EvalConfig,
    evaluate,
    load_eval_prompts,
    main,
    resolve_model_dir,
)

pytestmark = pytest.mark.integration

K = 2
PROMPTS = 4


@pytest.fixture(scope="module")
def model_dir(warm_tiny_model):
    return warm_tiny_model


def _greedy_answers(model_dir, data, tmp_path):
    """Pass 1: the model's own greedy answers (k=1, T=0) to the first PROMPTS rows."""
    saved = tmp_path / "greedy.jsonl"
    evaluate(
        EvalConfig(model=str(model_dir), data=[str(data)], k=1, temperature=0.0, max_tokens=24,
                   max_prompts=PROMPTS, engine="hf", reward_workers=1, save_responses=str(saved)),
        console=Console(file=io.StringIO()),
    )
    preds = [compute_score(json.loads(line)["response"], "0")["pred"] for line in saved.read_text().splitlines()]
    assert len(preds) == PROMPTS
    return preds


def test_fipo_eval_on_arithmetic_with_hf_engine(tmp_path, model_dir, capsys):
    # The tiny model is weak, so real ground truths would give all-zero metrics that cannot
    # catch a wiring bug. Instead, half the rows take the model's own greedy answer as ground
    # truth and half an answer it never gives; near-greedy sampling (T 0.01, top_p 0.05)
    # then has to score those rows right and the others wrong.
    rows = make_rows(PROMPTS, seed=3, split="test")
    preds = _greedy_answers(model_dir, write_rows(rows, tmp_path / "real.parquet"), tmp_path)
    assert any(p != INVALID_PRED for p in preds), preds  # the warm start taught the format
    for i, row in enumerate(rows):
        row["reward_model"]["ground_truth"] = preds[i] if i % 2 == 0 and preds[i] != INVALID_PRED else "-987"
    data = write_rows(rows, tmp_path / "arith.parquet")
    out, responses = tmp_path / "results.json", tmp_path / "responses.jsonl"
    # a run dir holding one HF export resolves to it
    run_dir = tmp_path / "run"
    (run_dir / "hf_model").mkdir(parents=True)
    for f in model_dir.iterdir():
        (run_dir / "hf_model" / f.name).symlink_to(f)
    rc = main([
        "--model", str(run_dir), "--data", str(data), "--k", str(K), "--temperature", "0.01",
        "--top-p", "0.05", "--max-tokens", "24", "--engine", "hf",
        "--reward-workers", "1", "--out", str(out), "--save-responses", str(responses),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"avg@{K}" in printed and f"cons@{K}" in printed and "arithmetic" in printed

    result = json.loads(out.read_text())
    assert result["model"] == str(run_dir / "hf_model") and result["k"] == K
    row = result["results"]["arithmetic"]
    assert row["num_prompts"] == PROMPTS
    for key in (f"avg@{K}", f"cons@{K}", f"pass@{K}", "truncated_frac"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row[f"avg@{K}"] <= row[f"pass@{K}"] and row[f"cons@{K}"] <= row[f"pass@{K}"]
    assert result["overall"][f"avg@{K}"] == row[f"avg@{K}"]
    assert result["metrics"][f"eval/arithmetic/mean@{K}"] == row[f"avg@{K}"]
    assert 0.0 < row[f"avg@{K}"] <= 0.5 and row[f"pass@{K}"] <= 0.5

    # Independent check: regrade the saved responses with the DAPO rule directly.
    saved = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(saved) == PROMPTS * K
    per_prompt = defaultdict(list)
    for r in saved:
        graded = compute_score(r["response"], r["ground_truth"])
        assert (graded["acc"], graded["pred"]) == (r["acc"], r["pred"])
        per_prompt[r["uid"]].append(graded["acc"])
    assert len(per_prompt) == PROMPTS and all(len(v) == K for v in per_prompt.values())
    assert row[f"avg@{K}"] == pytest.approx(sum(sum(v) / K for v in per_prompt.values()) / PROMPTS)
    assert row[f"pass@{K}"] == pytest.approx(sum(any(v) for v in per_prompt.values()) / PROMPTS)


def test_bad_inputs_are_reported_clearly(tmp_path, model_dir, capsys):
    rc = main(["--model", str(model_dir), "--data", str(tmp_path / "missing.parquet"), "--engine", "hf"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["--model", str(model_dir), "--k", "4", "--temperature", "0", "--engine", "hf"])
    assert rc == 2 and "identical greedy" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "data_source": "x"}) + "\n")
    tok = AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"bad\.jsonl: missing column\(s\) \['reward_model'\]"):
        load_eval_prompts(bad, tok)
    # the trainer's loader: same prompt ids as training data loading, first N rows per file
    data = write_rows(make_rows(6, seed=1, split="test"), tmp_path / "six.jsonl")
    train_side = PromptDataset(data, tok, DataConfig(max_prompt_length=4096))
    loaded = load_eval_prompts(data, tok, max_prompts=4)
    assert len(loaded) == 4
    assert [it.prompt_ids for it in loaded] == [it.prompt_ids for it in train_side][:4]
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    for name in ("a", "b"):
        (tmp_path / "two" / name / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="several models"):
        resolve_model_dir(tmp_path / "two")
    assert resolve_model_dir(tmp_path / "two" / "a") == tmp_path / "two" / "a"


def test_a_model_without_chat_template_is_evaluated_on_plain_text_when_asked(
    tmp_path, model_dir, capsys
):
    """A base model trained with ``data.apply_chat_template=false`` has no template: fipo-eval
    refused it with no way out, and its message named nothing to change."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    (base / "chat_template.jinja").unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_rows(make_rows(3, seed=2, split="test"), tmp_path / "three.jsonl")
    args = ["--model", str(base), "--data", str(data), "--engine", "hf", "--k", "1",
            "--max-tokens", "4", "--reward-workers", "1"]  # fmt: skip
    assert main(args) == 2
    assert "--no-chat-template" in capsys.readouterr().err
    out = tmp_path / "results.json"
    assert main([*args, "--no-chat-template", "--out", str(out)]) == 0
    assert json.loads(out.read_text())
    # the prompts are the trainer's with data.apply_chat_template=false
    tok = AutoTokenizer.from_pretrained(base)
    train_side = PromptDataset(data, tok, DataConfig(apply_chat_template=False))
    loaded = load_eval_prompts(data, tok, chat_template=False)
    assert [it.prompt_ids for it in loaded] == [it.prompt_ids for it in train_side]
