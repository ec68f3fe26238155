"""Advantage estimators and KL estimators against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fipo_trainer.algorithms.advantages import compute_advantage
from fipo_trainer.algorithms.kl import kl_penalty


def test_grpo_matches_formula_and_broadcasts_over_mask():
    scores = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, -0.5])
    uids = ["a", "a", "a", "a", "b", "b"]
    mask = torch.ones(6, 3)
    mask[1, 2] = 0
    adv = compute_advantage("grpo", scores, mask, uids)
    a = scores[:4]
    expected_a = (a - a.mean()) / (a.std() + 1e-6)  # unbiased std, as the reference
    torch.testing.assert_close(adv[:4, 0], expected_a)
    b = scores[4:]
    torch.testing.assert_close(adv[4:, 0], (b - b.mean()) / (b.std() + 1e-6))
    assert adv[1, 2] == 0 and adv[1, 1] == adv[1, 0]


def test_grpo_constant_group_and_singleton_and_dr_grpo():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.3])
    uids = [0, 0, 0, 1]
    adv = compute_advantage("grpo", scores, torch.ones(4, 2), uids)
    assert torch.all(adv[:3] == 0)  # no signal in a solved group
    assert adv[3, 0] == pytest.approx(0.3 / (1 + 1e-6))  # singleton: mean 0, std 1
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    dr = compute_advantage("grpo", scores, torch.ones(4, 1), [0] * 4, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(dr[:, 0], scores - 0.25)


def test_rloo_is_leave_one_out():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0])
    adv = compute_advantage("rloo", scores, torch.ones(4, 1), ["g"] * 4)
    for i in range(4):
        others = torch.cat([scores[:i], scores[i + 1 :]])
        assert adv[i, 0].item() == pytest.approx((scores[i] - others.mean()).item())


def test_reinforce_pp_baseline_is_whitened():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]).float()
    adv = compute_advantage("reinforce_plus_plus_baseline", scores, mask, [0, 0, 0, 1, 1, 1])
    vals = adv[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(adv[mask == 0] == 0)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_no_response_tokens_give_zero_advantages(name):
    """A batch whose responses are all empty: finite zeros, not NaN from 0/0."""
    adv = compute_advantage(
        name, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4, 3), [0, 0, 1, 1]
    )
    assert torch.equal(adv, torch.zeros(4, 3))


def test_advantage_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator 'gae'"):
        compute_advantage("gae", torch.zeros(2), torch.ones(2, 1), [0, 0])
    with pytest.raises(ValueError, match="disagree"):
        compute_advantage("grpo", torch.zeros(3), torch.ones(2, 1), [0, 0])


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    d = lp - ref
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), d.abs())
    torch.testing.assert_close(kl_penalty(lp, ref, "mse"), 0.5 * d**2)
    k3 = kl_penalty(lp, ref, "low_var_kl")
    torch.testing.assert_close(k3, torch.exp(-d) + d - 1)
    assert torch.all(k3 >= 0)
    far = kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3")
    assert far.item() == 10.0  # clamped
    assert math.isfinite(kl_penalty(torch.tensor([0.0]), torch.tensor([-100.0]), "k3").item())
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k4")
