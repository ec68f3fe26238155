"""KL estimators between the policy and a reference policy, per token (Schulman's k1/k2/k3)."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
LOW_VAR_KL_CLAMP = 10.0


def kl_penalty(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "low_var_kl"
) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate from sampled-token log-probs.

    k1 ("kl"): log π − log π_ref (unbiased, high variance). abs: |k1|. k2 ("mse"): ½·k1².
    k3 ("low_var_kl"): exp(−k1) + k1 − 1 ≥ 0, unbiased and low variance; clamped to ±10 to
    keep one outlier token from dominating.
    """
    diff = log_prob - ref_log_prob
    if kind in ("k1", "kl"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("k2", "mse"):
        return 0.5 * diff.square()
    if kind in ("k3", "low_var_kl"):
        log_r = torch.clamp(-diff, -20.0, 20.0)  # log(π_ref / π)
        return torch.clamp(torch.exp(log_r) - log_r - 1, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
