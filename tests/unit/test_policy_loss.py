"""FIPO and vanilla (DAPO) policy losses: every branch of FIPO_SPEC.md §1, on purpose."""

from __future__ import annotations

import math

import pytest
import torch

from fipo_trainer.algorithms.policy_loss import (
    POLICY_LOSSES,
    PolicyLossConfig,
    PolicyLossTerms,
    compute_policy_loss,
    compute_policy_terms,
    register_policy_loss,
)

REFERENCE_METRICS = {
    "pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower",
    "influence_weights_mean", "influence_weights_min", "influence_weights_max",
    "influence_weights_mean_raw", "raw_influence_weights_min", "raw_influence_weights_max",
    "IW_upper_clip_ratio", "IW_lower_clip_ratio", "IW_overall_clip_ratio",
    "neg_ratio_2_3", "neg_ratio_3_4", "neg_ratio_4_10",
    "neg_is_max", "neg_is_p75", "neg_is_p995", "neg_is_p999",
    "pos_is_min", "pos_is_p25", "pos_is_median", "pos_is_p75", "pos_is_p995", "pos_is_p999",
    "pos_is_max", "pos_mini_frac",
}  # fmt: skip


def spec_fipo_loss(old, new, adv, mask, cfg: PolicyLossConfig):
    """FIPO_SPEC.md §1 transcribed token by token with Python loops (float64)."""
    old, new, adv, mask = (t.double().tolist() for t in (old, new, adv, mask))
    gamma = 2 ** (-1 / cfg.decay_rate)
    c = cfg.clip_ratio_c
    total, count = 0.0, 0
    weights_out = []
    for i in range(len(old)):
        n = len(old[i])
        delta = [min(max(new[i][t] - old[i][t], -20), 20) for t in range(n)]
        ratio = [math.exp(d) for d in delta]
        part = [1.0 if delta[t] <= math.log(c) else 0.0 for t in range(n)]
        d_t = [delta[t] * mask[i][t] * part[t] for t in range(n)]
        fkl = [sum(gamma ** (k - t) * d_t[k] for k in range(t, n)) for t in range(n)]
        row_w, row_loss, n_dual = [], [], 0
        for t in range(n):
            e = cfg.future_kl_clip_ratio
            raw = math.exp(fkl[t])
            if e == 0:
                f = min(raw, 10.0)
            elif cfg.future_kl_clip_high_only:
                f = min(max(raw, 1.0), 1 + e)
            else:
                f = min(max(raw, 1 - e), 1 + e)
            if adv[i][t] < 0 and ratio[t] > cfg.safety_thresh:
                f = min(max(f, 0.8), 1.0)
            a = adv[i][t] * f
            l1 = -a * ratio[t]
            l2 = -a * min(max(ratio[t], 1 - cfg.clip_ratio_low), 1 + cfg.clip_ratio_high)
            lc = max(l1, l2)
            l3 = -a * c
            row_loss.append(min(l3, lc) if a < 0 else lc)
            if adv[i][t] < 0 and lc > l3 and mask[i][t]:
                n_dual += 1
            row_w.append(f)
        weights_out.append(row_w)
        if n_dual > 1:
            continue
        for t in range(n):
            if mask[i][t]:
                total += row_loss[t]
                count += 1
    return total / max(count, 1), torch.tensor(weights_out, dtype=torch.float64)


def random_batch(seed: int, batch: int = 6, length: int = 40, scale: float = 0.7):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    new = old + torch.randn(batch, length, generator=gen, dtype=torch.float64) * scale
    adv = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, length).clone()
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    return old, new, adv, mask


@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(),
        PolicyLossConfig(future_kl_clip_high_only=False, safety_thresh=3.0),
        PolicyLossConfig(future_kl_clip_ratio=0.0),
        PolicyLossConfig(decay_rate=4.0, clip_ratio_c=3.0, safety_thresh=2.0),
    ],
    ids=["high-only", "symmetric", "no-clip", "short-half-life"],
)
@pytest.mark.parametrize("seed", range(6))
def test_fipo_matches_spec_transcription(cfg, seed):
    old, new, adv, mask = random_batch(seed, scale=1.5 if seed % 2 else 0.5)
    loss, _ = compute_policy_loss("fipo", old, new, adv, mask, cfg)
    expected, _ = spec_fipo_loss(old, new, adv, mask, cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_fipo_equals_vanilla_on_policy_exactly():
    old, _, adv, mask = random_batch(1)
    new = old.clone().requires_grad_(True)
    new_v = old.clone().requires_grad_(True)
    loss_f, m_f = compute_policy_loss("fipo", old, new, adv, mask)
    loss_v, _m_v = compute_policy_loss("vanilla", old, new_v, adv, mask)
    assert loss_f.item() == loss_v.item()
    loss_f.backward()
    loss_v.backward()
    assert torch.equal(new.grad, new_v.grad)
    assert m_f["influence_weights_min"] == m_f["influence_weights_max"] == 1.0
    assert m_f["pg_clipfrac"] == 0.0 and m_f["ppo_kl"] == 0.0


def test_gradient_equals_vanilla_with_detached_weights():
    """Influence weights are constants: grad(FIPO) == grad(vanilla with A·f)."""
    old, new0, adv, mask = random_batch(3, scale=0.3)
    cfg = PolicyLossConfig(future_kl_clip_high_only=False, clip_ratio_c=50.0, safety_thresh=50.0)
    new = new0.clone().requires_grad_(True)
    terms = compute_policy_terms("fipo", old, new, adv, mask, cfg)
    assert torch.equal(terms.loss_mask, mask)  # no sequence dropped at c = 50
    _, weights = spec_fipo_loss(old, new0, adv, mask, cfg)
    loss, _ = compute_policy_loss("fipo", old, new, adv, mask, cfg)
    loss.backward()
    new_v = new0.clone().requires_grad_(True)
    loss_v, _ = compute_policy_loss("vanilla", old, new_v, adv * weights, mask, cfg)
    loss_v.backward()
    torch.testing.assert_close(new.grad, new_v.grad, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(weights, torch.ones_like(weights))  # the weights did something


def test_participation_mask_excludes_tokens_above_c():
    """A token with ratio > c contributes nothing to the Future-KL of earlier tokens."""
    cfg = PolicyLossConfig(future_kl_clip_ratio=0.0, safety_thresh=1e9)
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.ones(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    new = torch.tensor([[0.1, math.log(cfg.clip_ratio_c) + 0.5, 0.2]], dtype=torch.float64)
    gamma = 2 ** (-1 / cfg.decay_rate)
    m = compute_policy_terms("fipo", old, new, adv, mask, cfg).metrics
    expected_first = math.exp(0.1 + gamma**2 * 0.2)  # middle token left out
    assert m["raw_influence_weights_max"] == pytest.approx(expected_first, rel=1e-12)
    # at exactly log c the token still participates (δ <= log c)
    new_eq = new.clone()
    new_eq[0, 1] = math.log(cfg.clip_ratio_c)
    m_eq = compute_policy_terms("fipo", old, new_eq, adv, mask, cfg).metrics
    assert m_eq["raw_influence_weights_max"] > 5.0


def test_negative_advantage_above_safety_threshold_is_capped():
    cfg = PolicyLossConfig(future_kl_clip_high_only=False, safety_thresh=3.0, clip_ratio_c=100.0)
    old = torch.zeros(1, 2, dtype=torch.float64)
    new = torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64)  # ratio 4 > s on token 0
    adv = -torch.ones(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    m = compute_policy_terms("fipo", old, new, adv, mask, cfg).metrics
    # raw weight of token 0 is exp(log 4) = 4 -> clipped to 1.2 -> safety caps it at 1.0
    assert m["raw_influence_weights_max"] == pytest.approx(4.0)
    assert m["influence_weights_max"] == pytest.approx(1.0)
    # the same token with a positive advantage keeps the 1.2 weight
    m_pos = compute_policy_terms("fipo", old, new, -adv, mask, cfg).metrics
    assert m_pos["influence_weights_max"] == pytest.approx(1.2)


@pytest.mark.parametrize(
    ("clip_ratio", "high_only", "lo", "hi"),
    [(0.2, True, 1.0, 1.2), (0.2, False, 0.8, 1.2), (0.0, True, 0.0, 10.0)],
)
def test_influence_clip_modes(clip_ratio, high_only, lo, hi):
    cfg = PolicyLossConfig(
        future_kl_clip_ratio=clip_ratio, future_kl_clip_high_only=high_only, clip_ratio_c=1e6
    )
    deltas = [-3.0, 0.0, 0.05, 2.0, 3.0]  # one-token responses: FutureKL = δ
    old = torch.zeros(len(deltas), 1, dtype=torch.float64)
    new = torch.tensor(deltas, dtype=torch.float64)[:, None]
    adv = torch.ones_like(old)
    mask = torch.ones_like(old)
    m = compute_policy_terms("fipo", old, new, adv, mask, cfg).metrics
    expected = [min(max(math.exp(d), lo), hi) for d in deltas]
    assert m["influence_weights_min"] == pytest.approx(min(expected))
    assert m["influence_weights_max"] == pytest.approx(max(expected))
    assert m["influence_weights_mean"] == pytest.approx(sum(expected) / len(expected))
    assert m["raw_influence_weights_max"] == pytest.approx(math.exp(3.0))
    n_upper = sum(e >= hi - 1e-7 for e in expected)
    n_lower = sum(e <= lo + 1e-7 for e in expected)
    assert m["IW_upper_clip_ratio"] == pytest.approx(n_upper / len(deltas))
    assert m["IW_lower_clip_ratio"] == pytest.approx(n_lower / len(deltas))
    assert m["IW_overall_clip_ratio"] == pytest.approx((n_upper + n_lower) / len(deltas))


def test_sequence_with_two_dual_clipped_tokens_is_dropped():
    cfg = PolicyLossConfig(clip_ratio_c=3.0, safety_thresh=1e9)
    old = torch.zeros(3, 4, dtype=torch.float64)
    big = math.log(5.0)  # ratio 5 > c = 3: dual-clipped for negative advantages
    new = torch.tensor(
        [[big, big, 0.0, 0.0], [big, 0.0, 0.0, 0.0], [0.1, 0.0, -0.1, 0.0]], dtype=torch.float64
    )
    adv = -torch.ones(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    terms = compute_policy_terms("fipo", old, new.requires_grad_(True), adv, mask, cfg)
    assert terms.loss_mask[0].sum() == 0  # two dual-clipped tokens -> whole response dropped
    assert terms.loss_mask[1].sum() == 4  # one is tolerated
    assert terms.loss_mask[2].sum() == 4
    assert terms.metrics["pg_clipfrac_lower"] == pytest.approx(3 / 12)
    loss, _ = compute_policy_loss("fipo", old, new, adv, mask, cfg)
    loss.backward()
    assert torch.all(new.grad[0] == 0)  # dropped response
    assert new.grad[1, 0] == 0  # dual-clipped token: loss is the constant −Ã·c
    assert torch.all(new.grad[1, 1:] != 0)
    # vanilla keeps the response (no invalidation) but dual-clipped tokens still get no grad
    new_v = new.detach().clone().requires_grad_(True)
    compute_policy_loss("vanilla", old, new_v, adv, mask, cfg)[0].backward()
    assert torch.all(new_v.grad[0, :2] == 0) and torch.all(new_v.grad[0, 2:] != 0)


def test_log_ratio_is_clamped_at_20():
    old = torch.zeros(1, 2, dtype=torch.float64)
    new = torch.tensor([[50.0, -50.0]], dtype=torch.float64)
    adv = torch.ones(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    m = compute_policy_terms("vanilla", old, new, adv, mask).metrics
    assert m["ppo_kl"] == pytest.approx(0.0)  # mean of -(20) and -(-20)
    loss, _ = compute_policy_loss("vanilla", old, new, adv, mask)
    assert torch.isfinite(loss)


def test_metrics_have_reference_names_and_use_response_mask():
    old, new, adv, mask = random_batch(5, scale=1.0)
    _, metrics = compute_policy_loss("fipo", old, new, adv, mask)
    assert set(metrics) >= REFERENCE_METRICS
    assert all(math.isfinite(v) for v in metrics.values())
    # padding values never leak into metrics
    new_pad = new.clone()
    new_pad[mask == 0] = 1e6
    _, metrics_pad = compute_policy_loss("fipo", old, new_pad, adv, mask)
    for key in REFERENCE_METRICS:
        assert metrics_pad[key] == pytest.approx(metrics[key], rel=1e-12, abs=1e-12), key


def test_invalid_configs_and_names_raise():
    for kwargs, key in [
        ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
        ({"clip_ratio_c": 0.5}, "clip_ratio_c"),
        ({"clip_ratio_low": -0.1}, "clip_ratio_low"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high"),
        ({"decay_rate": 0.0}, "decay_rate"),
        ({"decay_rate": -1.0}, "decay_rate"),
        ({"future_kl_clip_ratio": -0.2}, "future_kl_clip_ratio"),
        ({"loss_agg_mode": "mean"}, "loss_agg_mode"),
    ]:
        with pytest.raises(ValueError, match=key):
            PolicyLossConfig(**kwargs)
    t = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown policy loss 'nope'"):
        compute_policy_loss("nope", t, t, t, t)
    with pytest.raises(ValueError, match="shape"):
        compute_policy_loss("fipo", t, torch.zeros(1, 3), t, t)


def test_registry_is_open():
    @register_policy_loss("test_reinforce")
    def reinforce(old_log_prob, log_prob, advantages, response_mask, config):
        return PolicyLossTerms(-advantages * log_prob, response_mask, {"custom": 1.0})

    try:
        old, new, adv, mask = random_batch(0)
        loss, metrics = compute_policy_loss("test_reinforce", old, new, adv, mask)
        expected = (-(adv * new) * mask).sum() / mask.sum()
        assert loss.item() == pytest.approx(expected.item())
        assert metrics["custom"] == 1.0
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_reinforce")(lambda *a: None)
    finally:
        POLICY_LOSSES.pop("test_reinforce")
