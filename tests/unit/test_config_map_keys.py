"""Mapping-valued keys take new entries from the command line without Hydra's ``+``,
list-valued keys take one bare value as verl's do, and per-role bundle resources are
validated (issue 12, multi-node placement)."""

from __future__ import annotations

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import ConfigError, prepare_config
from fipo_trainer.trainer.config.overrides import list_keys, map_keys, open_overrides


def test_map_keys_come_from_the_schema():
    keys = map_keys()
    assert {
        "model.override_config",
        "resources.actor_bundle_resources",
        "resources.rollout_bundle_resources",
    } <= set(keys)
    assert "actor.lr" not in keys


def test_only_overrides_of_map_keys_are_opened():
    assert open_overrides(
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


def test_list_keys_come_from_the_schema():
    keys = list_keys()
    assert {"data.train_files", "data.val_files", "trainer.loggers"} <= set(keys)
    assert "data.max_prompt_length" not in keys and "model.override_config" not in keys


@pytest.mark.parametrize(
    "override, opened",
    [
        ("data.train_files=/d/train.parquet", "data.train_files=['/d/train.parquet']"),
        ("data.val_files='/d/a b.parquet'", "data.val_files=['/d/a b.parquet']"),
        ("data.train_files=/d/it's=1.parquet", "data.train_files=['/d/it\\'s=1.parquet']"),
        ("trainer.loggers=console", "trainer.loggers=['console']"),
        # already a list, a sweep, an interpolation, null: Hydra's to read
        ("data.train_files=[/a.parquet,/b.parquet]", "data.train_files=[/a.parquet,/b.parquet]"),
        ("data.train_files=/a.parquet,/b.parquet", "data.train_files=/a.parquet,/b.parquet"),
        ("data.train_files=${oc.env:TRAIN}", "data.train_files=${oc.env:TRAIN}"),
        ("data.train_files=null", "data.train_files=null"),
        ("data.max_prompt_length=512", "data.max_prompt_length=512"),
    ],
)
def test_one_bare_value_of_a_list_key_becomes_a_one_element_list(override, opened):
    assert open_overrides([override]) == [opened]


def test_a_verl_style_single_data_file_composes(tmp_path):
    """verl's ``data.train_files=/path/train.parquet``: Hydra alone refused it ("str is not a
    ListConfig"); the path arrives whole, quotes and ``=`` included."""
    odd = str(tmp_path / "it's=odd train.parquet")
    cfg = compose_config([f"data.train_files={odd}", "data.val_files=/d/val.parquet"])
    assert list(cfg.data.train_files) == [odd]
    assert list(cfg.data.val_files) == ["/d/val.parquet"]


@pytest.mark.parametrize(
    "override, opened",
    [
        ("trainer.run_dir=~/runs/a", "trainer.run_dir='~/runs/a'"),
        ("model.path=~", "model.path='~'"),
        ("data.train_files=~/d/train.parquet", "data.train_files=['~/d/train.parquet']"),
        ("~trainer.loggers", "~trainer.loggers"),  # Hydra's delete, untouched
        ("trainer.run_dir='~/quoted'", "trainer.run_dir='~/quoted'"),
    ],
)
def test_a_value_starting_with_a_tilde_is_quoted(override, opened):
    """Hydra's grammar parses no value that starts with ``~`` (the shell leaves ``k=~/x``
    alone), so ``trainer.run_dir=~/runs/a`` was a parse error."""
    assert open_overrides([override]) == [opened]


def test_home_relative_paths_are_expanded_once_for_the_whole_run(tmp_path, monkeypatch):
    """Hydra wrote ``.hydra/`` into ``./~/run``, the data went to ``$HOME/run/data`` and was
    then looked for in ``~/run/data`` (not found): ``~`` meant three things in one run."""
    from fipo_trainer.trainer.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        compose_config(
            open_overrides(
                ["trainer.run_dir=~/run", "data.val_files=~/val.parquet", "model.path=~/m"]
            )
        ),
        build_model=False,
    )
    assert cfg.trainer.run_dir == str(tmp_path / "run")
    assert cfg.data.val_files == [str(tmp_path / "val.parquet")]
    assert cfg.model.path == cfg.actor.model_path == str(tmp_path / "m")
    assert cfg.data.train_files == ["builtin:arithmetic"]  # not a path: as it was


@pytest.mark.parametrize(
    "override, opened",
    [
        ("data.val_files=A.parquet,B.parquet", "data.val_files=['A.parquet'],['B.parquet']"),
        ("trainer.loggers=console,'wandb'", "trainer.loggers=['console'],['wandb']"),
        ("data.train_files=/d/it's.parquet,/e", "data.train_files=['/d/it\\'s.parquet'],['/e']"),
        # an explicit list, Hydra's sweep functions, a quote spanning a comma: untouched
        ("data.val_files=[a,b]", "data.val_files=[a,b]"),
        ("data.val_files=[a],[b]", "data.val_files=[a],[b]"),
        ("data.val_files=choice([a],[b])", "data.val_files=choice([a],[b])"),
        ("trainer.loggers='a,b',c", "trainer.loggers='a,b',c"),
        ("data.val_files=a,${x}", "data.val_files=a,${x}"),
        ("trainer.seed=1,2", "trainer.seed=1,2"),
    ],
)
def test_a_multirun_sweep_of_a_list_key_sweeps_one_element_lists(override, opened):
    """``-m data.val_files=A,B``: the pre-flight check passed each job ``['A']`` while Hydra's
    own job got the bare ``A`` and failed its merge; now both read the same lists."""
    assert open_overrides(["-m", override]) == ["-m", opened]
    if override.startswith("data.val_files=A"):
        assert open_overrides([override]) == [override]  # no -m: Hydra's "ambiguous" stands


def test_each_job_of_a_list_key_sweep_is_a_list():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fipo_trainer.trainer.sweep import expand_sweep

    _, opened = open_overrides(["--multirun", "data.val_files=A.parquet,/d/B.parquet"])
    (parsed,) = OverridesParser.create().parse_overrides([opened])
    values = list(parsed.sweep_iterator())  # one list per job, of Hydra's QuotedString
    assert [[getattr(v, "text", v) for v in job] for job in values] == [["A.parquet"], ["/d/B.parquet"]]
    jobs = expand_sweep([opened])
    assert [list(compose_config(job).data.val_files) for job in jobs] == [
        ["A.parquet"], ["/d/B.parquet"]
    ]
