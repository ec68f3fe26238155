"""Outcome-reward advantage estimators for groups of responses to one prompt.

Each estimator maps sequence scores [N] + group ids [N] to token advantages [N, L]
(constant per response, zero outside the response mask). Registry is open.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from fipo_trainer.algorithms.options import ADVANTAGE_ESTIMATORS, register_advantage

EPS = 1e-6
AdvantageFn = Callable[..., torch.Tensor]


def compute_advantage(
    name: str,
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Sequence[Hashable],
    **kwargs,
) -> torch.Tensor:
    """Advantages [N, L] from estimator `name` (grpo, rloo, reinforce_plus_plus_baseline)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)} "
            "(set algorithm.adv_estimator)"
        )
    if (
        scores.dim() != 1
        or scores.shape[0] != response_mask.shape[0]
        or len(group_ids) != scores.shape[0]
    ):
        raise ValueError(
            f"scores [N], response_mask [N, L] and group_ids (N) disagree: {tuple(scores.shape)}, "
            f"{tuple(response_mask.shape)}, {len(group_ids)}"
        )
    return ADVANTAGE_ESTIMATORS[name](scores, response_mask, group_ids, **kwargs)


def _group_index(group_ids: Sequence[Hashable], device) -> tuple[torch.Tensor, int]:
    """Dense group index per sample, in order of first appearance."""
    lookup: dict[Hashable, int] = {}
    index = [lookup.setdefault(g, len(lookup)) for g in group_ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(lookup)


def _group_stats(scores: torch.Tensor, group_ids: Sequence[Hashable]):
    """Per-sample group size, mean and unbiased std (std 1 for singleton groups, as verl)."""
    idx, n_groups = _group_index(group_ids, scores.device)
    x = scores.double()
    count = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(
        0, idx, torch.ones_like(x)
    )
    total = torch.zeros_like(count).index_add_(0, idx, x)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, idx, (x - mean[idx]).square())
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.ones_like(count))
    mean = torch.where(count > 1, mean, torch.zeros_like(mean))
    return count[idx], mean[idx], std[idx]


def _broadcast(per_seq: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask.to(torch.float32)
    return per_seq.to(mask.dtype)[:, None] * mask


@register_advantage("grpo")
def grpo_advantage(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Sequence[Hashable],
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = EPS,
) -> torch.Tensor:
    """(R − mean_group) / (std_group + ε); without the std division for Dr. GRPO."""
    _, mean, std = _group_stats(scores, group_ids)
    adv = scores.double() - mean
    if norm_adv_by_std_in_grpo:
        adv = adv / (std + epsilon)
    return _broadcast(adv, response_mask)


@register_advantage("rloo")
def rloo_advantage(
    scores: torch.Tensor, response_mask: torch.Tensor, group_ids: Sequence[Hashable]
) -> torch.Tensor:
    """Leave-one-out baseline: R_i − mean of the other responses to the same prompt."""
    count, mean, _ = _group_stats(scores, group_ids)
    x = scores.double()
    adv = torch.where(count > 1, (x - mean) * count / (count - 1).clamp(min=1), torch.zeros_like(x))
    return _broadcast(adv, response_mask)


@register_advantage("reinforce_plus_plus_baseline")
def reinforce_pp_baseline_advantage(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Sequence[Hashable],
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over all batch tokens."""
    _, mean, _ = _group_stats(scores, group_ids)
    tokens = _broadcast(scores.double() - mean, response_mask).double()
    mask = response_mask.to(torch.float64)
    n = mask.sum().clamp(min=1)  # no response token: zeros, not 0/0 = NaN
    mu = (tokens * mask).sum() / n
    var = ((tokens - mu).square() * mask).sum() / (n - 1).clamp(min=1)
    return (((tokens - mu) * torch.rsqrt(var + epsilon)) * mask).to(torch.float32)
