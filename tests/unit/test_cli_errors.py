"""Everyday command-line mistakes are one line and exit 2, not a traceback (review findings):
a config group's unknown option, ``key=a,b`` without brackets, an unresolvable value, a
``fipo-data`` flag out of range, and verl's keys whose close-name guess was the wrong fix."""

from __future__ import annotations

import pytest

from fipo_trainer import cli
from fipo_trainer.cluster.resource_pool import cluster_shortfall
from fipo_trainer.data.prepare import main as data_main
from fipo_trainer.trainer.config import ConfigError


@pytest.mark.parametrize(
    "override, said",
    [
        ("recipe=nope", "no option 'nope' in config group 'recipe'; available: "),
        ("algorithm=foo", "no option 'foo' in config group 'algorithm'; available: dapo, fipo, grpo"),
        ("data.val_files=a.parquet,b.parquet", "write a list, data.val_files=[a.parquet,b.parquet]"),
        ("trainer.run_dir=${trainer.nope}", "cannot resolve trainer.run_dir: Interpolation key"),
        ("data.data_dir=${oc.env:FIPO_TEST_UNSET}", "cannot resolve data.data_dir: "),
        ("model.path=???", "model.path has no value (???)"),
    ],
)
def test_a_dry_run_mistake_is_one_line_and_exit_2(override, said, capsys, monkeypatch):
    monkeypatch.delenv("FIPO_TEST_UNSET", raising=False)
    assert cli.dry_run([override]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["arithmetic", "--digits", "0"], "--digits: ArithmeticTask.digits must be in 1..9"),
        (["tiny-model", "--hidden-size", "48"], "--hidden-size: hidden_size (48)"),
        (["tiny-model", "--num-layers", "0"], "--num-layers: num_layers must be >= 1"),
    ],
)
def test_a_fipo_data_flag_out_of_range_is_a_usage_error(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        data_main([*argv, "--out-dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    "override, said",
    [
        ("actor_rollout_ref.actor.loss_agg_mode=token-mean",
         "here it is actor.policy_loss.loss_agg_mode"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=future_kl",
         "here it is actor.loss_name (verl's future_kl is actor.loss_name=fipo)"),
        ("actor_rollout_ref.actor.kl_loss_coef=0.0", "no KL-to-reference loss or entropy bonus"),
        ("actor_rollout_ref.actor.use_kl_loss=false", "no KL-to-reference loss or entropy bonus"),
        ("actor_rollout_ref.actor.entropy_coeff=0", "no KL-to-reference loss or entropy bonus"),
        ("data.filter_overlong_prompts=true",
         "here it is data.truncation (verl's filter_overlong_prompts=true is data.truncation=filter"),
    ],
)
def test_a_verl_key_with_no_close_name_here_gets_the_right_fix(override, said):
    with pytest.raises(ConfigError) as err:
        cli.compose_config([override])
    assert said in str(err.value) and "did you mean" not in str(err.value)


def test_a_short_cluster_names_the_real_ray_cluster_command():
    """``scripts/ray_cluster.sh`` has ``worker HEAD_ADDR``; ``start-worker`` is no command."""
    gpus = cluster_shortfall({"GPU": 8.0}, 1, nnodes=2, gpus_per_node=8)
    nodes = cluster_shortfall({"GPU": 16.0}, 1, nnodes=2, gpus_per_node=0)
    for message in (gpus, nodes):
        assert message and "scripts/ray_cluster.sh worker HEAD_ADDR" in message
        assert "start-worker" not in message
    assert "--num-gpus 8" in gpus


def test_the_dry_run_refuses_model_path_with_the_tiny_model_as_the_run_does(tmp_path, capsys):
    """The default recipe builds the tiny model; a model.path beside it is the run's exit 2,
    so the dry run must say so too (one rule, `rules.tiny_model_clash`)."""
    from fipo_trainer.trainer.config import load_config, prepare_config

    other = tmp_path / "model"
    other.mkdir()
    assert cli.dry_run([f"model.path={other}"]) == 2
    err = capsys.readouterr().err
    assert "model.tiny.enable=true are both set" in err and "config OK" not in err
    with pytest.raises(ConfigError, match="are both set"):
        prepare_config(cli.compose_config([f"model.path={other}"]), check_platform=False)
    # a saved config reloaded: model.path is the tiny model these settings build
    built = load_config(cli.compose_config(["model.tiny.warm_start_steps=0"])).model.path
    assert cli.dry_run([f"model.path={built}", "model.tiny.warm_start_steps=0"]) == 0
