"""Mapping-valued keys take new entries from the command line without Hydra's ``+``, and
per-role bundle resources are validated (issue 12, multi-node placement)."""

from __future__ import annotations

import pytest

from fipo_trainer.cli import compose_config, map_keys, open_map_overrides
from fipo_trainer.trainer.config import ConfigError, prepare_config


def test_map_keys_come_from_the_schema():
    keys = map_keys()
    assert {
        "model.override_config",
        "resources.actor_bundle_resources",
        "resources.rollout_bundle_resources",
    } <= set(keys)
    assert "actor.lr" not in keys


def test_only_overrides_of_map_keys_are_opened():
    assert open_map_overrides(
        [
            "resources.actor_bundle_resources={a: 1}",
            "model.override_config.rope_theta=10",
            "actor.lr=1e-6",
            "+x.y=1",
            "--dry-run",
        ]
    ) == [
        "++resources.actor_bundle_resources={a: 1}",
        "++model.override_config.rope_theta=10",
        "actor.lr=1e-6",
        "+x.y=1",
        "--dry-run",
    ]


def test_bundle_resources_from_the_command_line():
    cfg = prepare_config(
        compose_config(
            [
                "resources.actor_bundle_resources={node_a: 1}",
                "resources.rollout_bundle_resources.node_b=0.5",
            ]
        )
    )
    assert cfg.resources.actor_bundle_resources == {"node_a": 1.0}
    assert cfg.resources.rollout_bundle_resources == {"node_b": 0.5}


@pytest.mark.parametrize(
    "override",
    ["resources.rollout_bundle_resources={GPU: 1}", "resources.actor_bundle_resources={a: 0}"],
)
def test_bad_bundle_resources_name_the_key(override):
    with pytest.raises(
        ConfigError, match=r"resources\.\w+_bundle_resources\.\w+=.*custom resources"
    ):
        prepare_config(compose_config([override]))
