"""The paper's ablation knobs: ``participation_filter`` changes Future-KL exactly as FIPO_SPEC.md
§1.2/§1.4 say (pure tensors, with and without sequence-parallel shards), and every FIPO knob
is switchable from the command line."""

from __future__ import annotations

import math

import pytest
import torch

from fipo_trainer.algorithms.policy_loss import PolicyLossConfig, compute_policy_terms
from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import load_config
from tests.unit.test_sequence_shards import (
    LOSS_LENGTHS,
    LOSS_WIDTH,
    WIDE,
    _all_slices,
    _loss_inputs,
    _run_sharded_loss,
    _unsharded,
)


def spec_future_kl(old: torch.Tensor, new: torch.Tensor, mask: torch.Tensor, cfg) -> torch.Tensor:
    """§1.2–1.4 with loops: D_t = δ_t·m_t·P_t, F_t = Σ_k γ^(k−t) D_k; P_t = 1 without the filter."""
    gamma = 2 ** (-1 / cfg.decay_rate)
    out = torch.zeros_like(old, dtype=torch.float64)
    for i in range(old.shape[0]):
        delta = [min(max(float(n - o), -20.0), 20.0) for o, n in zip(old[i], new[i])]
        part = [
            1.0 if (not cfg.participation_filter or d <= math.log(cfg.clip_ratio_c)) else 0.0
            for d in delta
        ]
        d_t = [delta[t] * float(mask[i, t]) * part[t] for t in range(len(delta))]
        for t in range(len(delta)):
            out[i, t] = sum(gamma ** (k - t) * d_t[k] for k in range(t, len(delta)))
    return out


def test_participation_filter_off_lets_every_token_into_future_kl():
    """The token above c is left out with the filter (default) and counted without it."""
    on = PolicyLossConfig(future_kl_clip_ratio=0.0, safety_thresh=1e9)
    off = PolicyLossConfig(future_kl_clip_ratio=0.0, safety_thresh=1e9, participation_filter=False)
    assert on.participation_filter is True
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.ones(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    high = math.log(on.clip_ratio_c) + 0.5  # ratio above c
    new = torch.tensor([[0.1, high, 0.2]], dtype=torch.float64)
    gamma = 2 ** (-1 / on.decay_rate)
    raw_on = compute_policy_terms("fipo", old, new, adv, mask, on).token_stats
    raw_off = compute_policy_terms("fipo", old, new, adv, mask, off).token_stats
    assert raw_on["raw_influence_weights"][0, 0].item() == pytest.approx(
        math.exp(0.1 + gamma**2 * 0.2), rel=1e-12
    )
    assert raw_off["raw_influence_weights"][0, 0].item() == pytest.approx(
        math.exp(0.1 + gamma * high + gamma**2 * 0.2), rel=1e-12
    )
    assert raw_off["raw_influence_weights"][0, 1].item() == pytest.approx(
        math.exp(high + gamma * 0.2), rel=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("participation_filter", [True, False])
def test_future_kl_matches_spec_with_and_without_filter(seed, participation_filter):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(5, 30, generator=gen, dtype=torch.float64) * 3
    new = old + torch.randn(5, 30, generator=gen, dtype=torch.float64) * 1.5  # many ratios > c
    adv = torch.randn(5, 1, generator=gen, dtype=torch.float64).expand(5, 30).clone()
    lengths = torch.randint(1, 31, (5,), generator=gen)
    mask = (torch.arange(30)[None, :] < lengths[:, None]).double()
    cfg = PolicyLossConfig(
        clip_ratio_c=3.0, decay_rate=4.0, participation_filter=participation_filter
    )
    stats = compute_policy_terms("fipo", old, new, adv, mask, cfg).token_stats
    expected = torch.exp(spec_future_kl(old, new, mask, cfg))
    keep = mask.bool()
    torch.testing.assert_close(
        stats["raw_influence_weights"][keep], expected[keep], rtol=1e-10, atol=0
    )
    above_c = ((new - old) > math.log(cfg.clip_ratio_c)) & keep
    assert above_c.any()  # the filter had something to filter


@pytest.mark.parametrize("slices", _all_slices()[:3])
def test_participation_filter_off_under_sequence_parallel_matches_unsharded(slices):
    """The sharded path stitches the unfiltered Future-KL exactly too."""
    config = PolicyLossConfig(**WIDE, participation_filter=False)
    full, _, _ = _unsharded("fipo", config)
    filtered, _, _ = _unsharded("fipo", PolicyLossConfig(**WIDE))
    old, log_prob, _, mask = _loss_inputs()
    above_c = ((log_prob - old) > math.log(config.clip_ratio_c)) & mask.bool()
    assert above_c.any()
    raw, raw_filtered = (
        t.token_stats["raw_influence_weights"][mask.bool()] for t in (full, filtered)
    )
    assert not torch.allclose(raw, raw_filtered)  # the switch matters on these inputs
    for owned, terms, _, _ in _run_sharded_loss("fipo", slices, config, with_grad=False):
        torch.testing.assert_close(
            terms.token_stats["raw_influence_weights"][owned],
            full.token_stats["raw_influence_weights"][owned],
            rtol=1e-12,
            atol=0,
        )
    assert full.token_stats["raw_influence_weights"].shape == (len(LOSS_LENGTHS), LOSS_WIDTH)


KNOBS = {
    "participation_filter": ("false", False),
    "decay_rate": ("64", 64.0),
    "future_kl_clip_high_only": ("false", False),
    "future_kl_clip_ratio": ("0.1", 0.1),
    "safety_thresh": ("3.0", 3.0),
}


@pytest.mark.parametrize("algorithm", ["fipo", "dapo"])
def test_every_fipo_knob_is_switchable_from_the_command_line(algorithm):
    overrides = [f"actor.policy_loss.{k}={text}" for k, (text, _) in KNOBS.items()]
    composed = compose_config([f"algorithm={algorithm}", "model.path=/m", *overrides])
    cfg = load_config(composed, build_model=False)
    actor = cfg.actor.to_actor_config()  # what the actor ranks receive
    for key, (_, value) in KNOBS.items():
        assert getattr(cfg.actor.policy_loss, key) == value, key
        assert getattr(actor.policy_loss, key) == value, key


def test_participation_filter_defaults_on_in_every_recipe_path():
    cfg = load_config(compose_config([]), build_model=False)
    assert cfg.actor.policy_loss.participation_filter is True
