"""Token records: a few responses of a rollout-dump step with the update's per-token values.

Why: FIPO re-weights each token by its Future-KL and DAPO/FIPO clip or drop tokens; the
step's metrics average that away. On every rollout-dump step (``trainer.rollout_dump_freq``)
the driver names ``trainer.token_record_samples`` rows of the training batch, the actor
records the loss's values for them while it updates (``actor/token_record.py``: ratio,
Future-KL, influence weight, clip flags, FIPO's dropped responses, from the last mini-batch
that saw each token), and this module writes them beside the decoded tokens as
``rollouts/tokens_step_{step:06d}.jsonl`` (atomically, one response per line). A loss
without a value (e.g. Future-KL under DAPO's vanilla loss) writes null.
``fipo-plot --tokens`` (``trainer/token_plot.py``) renders the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fipo_trainer.fsutil import atomic_file
from fipo_trainer.trainer.rollout_dump import jsonable

__all__ = [
    "TOKEN_VALUE_FIELDS",
    "build_token_records",
    "dump_step_tokens",
    "dump_token_records",
    "latest_token_step",
    "read_token_records",
    "record_kwargs",
    "sample_rows",
    "token_record_path",
    "token_record_steps",
    "write_token_records",
]

#: Per-token lists of a record (null when the loss has no such value).
TOKEN_VALUE_FIELDS = ("ratio", "future_kl", "influence_weight", "clipped", "dual_clipped")
_NAME = re.compile(r"^tokens_step_(\d+)\.jsonl$")


def token_record_path(run_dir: str | Path, step: int) -> Path:
    """``run_dir/rollouts/tokens_step_{step:06d}.jsonl``."""
    return Path(run_dir) / "rollouts" / f"tokens_step_{int(step):06d}.jsonl"


def sample_rows(n: int, k: int) -> list[int]:
    """``k`` rows spread evenly over ``n`` (so every mini-batch of the update is sampled;
    the first one's ratios are exactly 1 and its influence weights 1)."""
    k = min(max(k, 0), n)
    return sorted({i * n // k for i in range(k)}) if k else []


def record_kwargs(trainer_cfg: Any, step: int, n: int) -> dict[str, list[int]]:
    """``{"record_rows": rows}`` for ``ActorGroup.update`` on rollout-dump steps, else {}."""
    freq = int(getattr(trainer_cfg, "rollout_dump_freq", 0) or 0)
    samples = int(getattr(trainer_cfg, "token_record_samples", 0) or 0)
    if freq <= 0 or samples <= 0 or step % freq:
        return {}
    rows = sample_rows(n, samples)
    return {"record_rows": rows} if rows else {}


def _short(value: Any) -> Any:
    """Floats to 7 significant digits (float32 precision): a third of the file size."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def build_token_records(
    batch: Any,
    values: Mapping[int, Mapping[str, Any]],
    tokenizer: Any,
    step: int,
    loss_name: str = "",
) -> list[dict[str, Any]]:
    """One record per recorded row of the training ``batch``: identity, reward, the tokens
    (decoded one by one) and the values the actor recorded (``ActorGroup.token_records``)."""
    get = batch.non_tensors.get
    out = []
    for row in sorted(values):
        mask = batch["response_mask"][row].bool()
        ids = [int(t) for t in batch["responses"][row][mask].tolist()]
        adv = batch["advantages"][row][mask] if "advantages" in batch else None
        recorded = values[row]
        record: dict[str, Any] = {
            "step": int(step),
            "row": int(row),
            "uid": get("uid")[row] if get("uid") is not None else None,
            "loss": loss_name,
            "mini_batch": recorded.get("mini_batch"),
            "score": float(get("score")[row]) if get("score") is not None else None,
            "acc": bool(get("acc")[row]) if get("acc") is not None else None,
            "advantage": float(adv[0]) if adv is not None and len(adv) else None,
            "response": get("response_text")[row] if get("response_text") is not None else None,
            "token_ids": ids,
            "tokens": [tokenizer.decode([t]) for t in ids],
            "dropped": recorded.get("dropped"),
        }
        for name in TOKEN_VALUE_FIELDS:
            column = recorded.get(name)
            if column is not None and len(column) != len(ids):
                raise ValueError(
                    f"row {row}: {len(column)} recorded {name} values for {len(ids)} tokens"
                )
            record[name] = _short(list(column)) if column is not None else None
        out.append(record)
    return out


def dump_token_records(
    run_dir: str | Path, step: int, records: Sequence[Mapping[str, Any]]
) -> Path:
    """Write ``records`` to :func:`token_record_path` atomically (a re-run step replaces it)."""
    path = token_record_path(run_dir, step)
    with atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(jsonable(dict(record)), ensure_ascii=False) + "\n")
    return path


def token_record_steps(run_dir: str | Path) -> list[int]:
    """The steps with a token record in ``run_dir/rollouts``, ascending."""
    folder = Path(run_dir) / "rollouts"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def latest_token_step(run_dir: str | Path) -> int | None:
    steps = token_record_steps(run_dir)
    return steps[-1] if steps else None


def read_token_records(run_dir: str | Path, step: int | None = None) -> tuple[int, list[dict]]:
    """(step, records) of ``step`` (default: the latest step with a token record)."""
    steps = token_record_steps(run_dir)
    if step is None:
        if not steps:
            raise FileNotFoundError(
                f"no token records under {Path(run_dir) / 'rollouts'} (tokens_step_*.jsonl); "
                "train with trainer.rollout_dump_freq > 0 and trainer.token_record_samples > 0"
            )
        step = steps[-1]
    path = token_record_path(run_dir, step)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; steps with token records: {steps or 'none'}"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return int(step), [json.loads(line) for line in lines if line.strip()]


def write_token_records(
    run_dir: str | Path,
    step: int,
    batch: Any,
    values: Mapping[int, Mapping[str, Any]],
    tokenizer: Any,
    loss_name: str = "",
) -> Path:
    """:func:`build_token_records` + :func:`dump_token_records` (what the loop calls)."""
    records = build_token_records(batch, values, tokenizer, step, loss_name)
    return dump_token_records(run_dir, step, records)


def dump_step_tokens(trainer: Any, step: int, batch: Any, record: Mapping[str, Any]) -> Path | None:
    """After an update that recorded (``record`` from :func:`record_kwargs`; {} = nothing to
    do): write the ``RLTrainer``'s actor's records of ``batch`` into its run directory."""
    if not record:
        return None
    return write_token_records(
        trainer.run_dir,
        step,
        batch,
        trainer.actor.token_records,
        trainer.prompts.dataset.tokenizer,
        trainer.cfg.actor.loss_name,
    )
