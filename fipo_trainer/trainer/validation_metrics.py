"""Validation metrics over k sampled responses per prompt: mean@k, maj@k, best@k, pass@j.

Why a pure module: the trainer's validation and ``fipo-eval`` report the same numbers, and
the definitions (tie-breaking of the vote, the unbiased pass@j estimator) must be testable
by hand without a model. Names follow verl: ``mean@k`` (the paper's avg@k), ``maj@k``
(cons@k) and ``best@k`` (pass@k).

Definitions, per prompt with k responses (c of them correct), averaged over prompts:

- ``mean@k``: c / k.
- ``maj@k``: majority vote over the parsed predictions ``pred``; a tie goes to the
  prediction seen first; the vote is correct when that prediction's first response is
  correct. Invalid predictions (e.g. ``"[INVALID]"``) vote like any other, as in verl, so
  a prompt whose responses mostly fail to answer scores 0.
- ``best@k``: 1 if c > 0.
- ``pass@j`` (optional, j <= k): the unbiased estimator 1 - C(k-c, j) / C(k, j)
  (Chen et al., 2021), i.e. the chance that j responses drawn without replacement from
  the k contain a correct one. ``pass@k`` equals ``best@k``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import comb
from typing import Any

__all__ = [
    "PromptStats",
    "compute_validation_metrics",
    "group_prompts",
    "majority_vote",
    "pass_at_j",
    "validation_metrics",
]


@dataclass(frozen=True)
class PromptStats:
    """The per-prompt outcomes that the metrics average."""

    k: int
    num_correct: int
    maj_correct: bool
    score_mean: float


def pass_at_j(k: int, num_correct: int, j: int) -> float:
    """Unbiased pass@j from k samples with ``num_correct`` correct ones."""
    if not 1 <= j <= k:
        raise ValueError(f"pass@j needs 1 <= j <= k, got j={j}, k={k}")
    if not 0 <= num_correct <= k:
        raise ValueError(f"num_correct must be in [0, {k}], got {num_correct}")
    if k - num_correct < j:
        return 1.0
    return 1.0 - comb(k - num_correct, j) / comb(k, j)


def majority_vote(preds: Sequence[Any], acc: Sequence[bool]) -> tuple[Any, bool]:
    """The most frequent prediction (first seen wins a tie) and whether it is correct."""
    if not preds:
        raise ValueError("majority_vote needs at least one prediction")
    counts: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for i, p in enumerate(preds):
        key = _vote_key(p)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    # max() keeps the first maximal item; dicts iterate in first-occurrence order.
    winner = max(counts, key=counts.__getitem__)
    return preds[first[winner]], bool(acc[first[winner]])


def _vote_key(pred: Any) -> Hashable:
    """Predictions are usually strings; anything unhashable votes by its repr."""
    if pred is None:
        return None
    if isinstance(pred, str):
        return pred.strip()
    try:
        hash(pred)
    except TypeError:
        return repr(pred)
    return pred


def group_prompts(
    uids: Sequence[Hashable],
    acc: Sequence[bool],
    preds: Sequence[Any],
    scores: Sequence[float] | None = None,
) -> dict[Hashable, PromptStats]:
    """Per-prompt stats, keyed by uid in first-seen order (responses need not be adjacent)."""
    rows: dict[Hashable, list[int]] = defaultdict(list)
    for i, uid in enumerate(uids):
        rows[uid].append(i)
    out: dict[Hashable, PromptStats] = {}
    for uid, idx in rows.items():
        a = [bool(acc[i]) for i in idx]
        _, maj = majority_vote([preds[i] for i in idx], a)
        s = [float(scores[i]) for i in idx] if scores is not None else [float(x) for x in a]
        out[uid] = PromptStats(k=len(idx), num_correct=sum(a), maj_correct=maj, score_mean=sum(s) / len(s))
    return out


def _summarise(stats: Sequence[PromptStats], k: int, pass_ks: Iterable[int], prefix: str) -> dict[str, float]:
    n = len(stats)
    m = {
        f"{prefix}mean@{k}": sum(s.num_correct / s.k for s in stats) / n,
        f"{prefix}maj@{k}": sum(s.maj_correct for s in stats) / n,
        f"{prefix}best@{k}": sum(s.num_correct > 0 for s in stats) / n,
        f"{prefix}score_mean": sum(s.score_mean for s in stats) / n,
        f"{prefix}num_prompts": float(n),
    }
    for j in sorted(set(pass_ks)):
        if 1 <= j < k:  # pass@k is best@k; larger j cannot be estimated from k samples
            m[f"{prefix}pass@{j}"] = sum(pass_at_j(s.k, s.num_correct, j) for s in stats) / n
    return m


def validation_metrics(
    data_sources: Sequence[str],
    uids: Sequence[Hashable],
    acc: Sequence[bool],
    preds: Sequence[Any],
    scores: Sequence[float] | None = None,
    *,
    pass_ks: Iterable[int] = (),
    prefix: str = "val",
) -> dict[str, float]:
    """mean@k / maj@k / best@k (and pass@j for j in ``pass_ks``) per data source and overall.

    One entry per response; ``uids`` groups the k responses of a prompt. Keys are
    ``{prefix}/{data_source}/mean@{k}`` (etc., plus ``score_mean`` and ``num_prompts``) and
    ``{prefix}/mean@{k}`` (etc.) over all prompts of all sources (prompt-weighted). Every
    prompt must have the same number of responses k: the metrics at different k are not
    comparable, so mixing them is refused.
    """
    n = len(uids)
    named = {"data_sources": data_sources, "acc": acc, "preds": preds}
    if scores is not None:
        named["scores"] = scores
    for name, seq in named.items():
        if len(seq) != n:
            raise ValueError(f"validation_metrics: {name} has {len(seq)} entries but uids has {n}")
    if n == 0:
        return {}

    source_of: dict[Hashable, str] = {}
    for i, uid in enumerate(uids):
        ds = str(data_sources[i])
        if source_of.setdefault(uid, ds) != ds:
            raise ValueError(
                f"validation_metrics: prompt uid {uid!r} appears under data sources "
                f"{source_of[uid]!r} and {ds!r}; uids must be unique per prompt"
            )
    stats = group_prompts(uids, acc, preds, scores)
    ks = {s.k for s in stats.values()}
    if len(ks) != 1:
        raise ValueError(
            f"validation_metrics: prompts have different numbers of responses {sorted(ks)}; "
            "validation must sample the same n (rollout.val.n) for every prompt"
        )
    k = ks.pop()

    by_source: dict[str, list[PromptStats]] = defaultdict(list)
    for uid, s in stats.items():
        by_source[source_of[uid]].append(s)
    pass_ks = tuple(pass_ks)
    metrics: dict[str, float] = {}
    for ds in sorted(by_source):
        metrics.update(_summarise(by_source[ds], k, pass_ks, f"{prefix}/{ds}/"))
    metrics.update(_summarise(list(stats.values()), k, pass_ks, f"{prefix}/"))
    return metrics


def compute_validation_metrics(
    records: Iterable[Mapping[str, Any]],
    *,
    uid_key: str = "uid",
    pass_ks: Iterable[int] = (),
    prefix: str = "val",
) -> dict[str, float]:
    """:func:`validation_metrics` on dict records with ``data_source``, ``uid``, ``acc``, ``pred``
    and optionally ``score`` (used when every record has one)."""
    records = list(records)
    for i, r in enumerate(records):
        missing = [key for key in ("data_source", uid_key, "acc", "pred") if key not in r]
        if missing:
            raise ValueError(f"validation record {i} lacks {missing}; it has {sorted(r)}")
    has_scores = bool(records) and all("score" in r for r in records)
    return validation_metrics(
        [r["data_source"] for r in records],
        [r[uid_key] for r in records],
        [r["acc"] for r in records],
        [r["pred"] for r in records],
        [r["score"] for r in records] if has_scores else None,
        pass_ks=pass_ks,
        prefix=prefix,
    )
