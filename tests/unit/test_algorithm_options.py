"""``algorithms.options``: the names a config may choose, known without torch, in step
with the tensor modules that register them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fipo_trainer.algorithms import options


def test_the_builtin_names_are_what_the_tensor_modules_register():
    """In a fresh process (this one's tests register losses of their own)."""
    code = (
        "import fipo_trainer.algorithms.policy_loss, fipo_trainer.algorithms.advantages\n"
        "from fipo_trainer.algorithms import options as o\n"
        "print(sorted(o.POLICY_LOSSES), sorted(o.ADVANTAGE_ESTIMATORS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == (
        f"{sorted(options.BUILTIN_POLICY_LOSSES)} {sorted(options.BUILTIN_ADVANTAGES)}"
    )


def test_the_tensor_modules_share_the_registries_and_the_rules():
    from fipo_trainer.algorithms import advantages, aggregation, policy_loss, rollout_correction

    assert policy_loss.POLICY_LOSSES is options.POLICY_LOSSES
    assert advantages.ADVANTAGE_ESTIMATORS is options.ADVANTAGE_ESTIMATORS
    assert policy_loss.PolicyLossConfig is options.PolicyLossConfig
    assert aggregation.AGG_MODES is options.AGG_MODES
    assert rollout_correction.parse_threshold is options.parse_threshold
    assert rollout_correction.LEVELS == options.CORRECTION_LEVELS


def test_a_loss_registered_later_is_a_name_a_config_may_use():
    with pytest.raises(ValueError, match=r"unknown policy loss 'mine'; registered: \[.*'fipo'"):
        options.check_policy_loss_name("mine")

    @options.register_policy_loss("mine")
    def mine(*args):
        return None

    try:
        options.check_policy_loss_name("mine")
        assert "mine" in options.policy_loss_names()
        with pytest.raises(ValueError, match="already registered"):
            options.register_policy_loss("mine")(lambda *a: None)
    finally:
        options.POLICY_LOSSES.pop("mine")
