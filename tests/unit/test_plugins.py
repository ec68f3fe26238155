"""User code by path: files and modules, errors naming the config key."""

from __future__ import annotations

import pytest

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.algorithms.policy_loss import POLICY_LOSSES
from fipo_trainer.plugins import import_file, import_plugins

PLUGIN = """
from fipo_trainer.algorithms.policy_loss import register_policy_loss, vanilla_policy_loss
CALLS = []

@register_policy_loss("test_plugin_loss")
def loss(*args):
    CALLS.append(1)
    return vanilla_policy_loss(*args)
"""


def test_file_is_imported_once_and_registers_its_loss(tmp_path):
    path = tmp_path / "my_losses.py"
    path.write_text(PLUGIN)
    try:
        first = import_file(path, "actor.loss_plugins")
        assert import_file(str(path), "actor.loss_plugins") is first
        assert "test_plugin_loss" in POLICY_LOSSES
        cfg = ActorConfig(model_path="m", loss_name="test_plugin_loss", loss_plugins=[str(path)])
        assert cfg.loss_name == "test_plugin_loss"
    finally:
        POLICY_LOSSES.pop("test_plugin_loss", None)


def test_modules_by_name_and_clear_errors(tmp_path):
    (json_module,) = import_plugins(["json"], "actor.loss_plugins")
    assert json_module.__name__ == "json"
    with pytest.raises(FileNotFoundError, match=r"actor\.loss_plugins: file .*missing\.py"):
        import_plugins([str(tmp_path / "missing.py")], "actor.loss_plugins")
    with pytest.raises(ModuleNotFoundError, match=r"actor\.loss_plugins: cannot import module"):
        import_plugins(["no_such_module_xyz"], "actor.loss_plugins")
    with pytest.raises(ValueError, match="unknown policy loss 'nope'"):
        ActorConfig(model_path="m", loss_name="nope")
