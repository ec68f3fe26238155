"""The trainer starts Ray as its config says: ``resources.*`` reaches ``init_ray``."""

from __future__ import annotations

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import load_config
from fipo_trainer.trainer.loop import RLTrainer


class _Stop(Exception):
    pass


@pytest.mark.parametrize("lean", [True, False])
def test_the_ray_start_gets_the_lean_head_setting(tmp_path, monkeypatch, lean) -> None:
    import fipo_trainer.cluster.ray_init as ray_init

    seen: dict = {}

    def record(*args, **kwargs):
        seen.update(args=args, **kwargs)
        raise _Stop  # the rest of the start-up (workers) is not this test's

    monkeypatch.setattr(ray_init, "init_ray", record)
    overrides = ["recipe=quickstart_cpu", f"trainer.run_dir={tmp_path}"]
    if not lean:
        overrides.append("resources.ray_lean_head=false")
    cfg = load_config(compose_config(overrides), build_model=False)
    with pytest.raises(_Stop):
        RLTrainer(cfg)._start_roles()
    assert seen["lean_head"] is lean
    assert seen["args"][0] is None  # the quickstart starts its own Ray
