"""Console entry points: ``fipo-train`` (Hydra), ``fipo-eval``, ``fipo-data``, ``fipo-plot``.

Why the config directory is located at run time: the Hydra tree (``configs/``, with the
top-level ``recipes/`` linked in as the ``recipe`` group) lives next to the package in the
repository, so an editable install finds it from this file; ``FIPO_CONFIG_DIR`` points
elsewhere (a copied tree, a container). Heavy modules are imported inside the commands so
``--help`` and ``--dry-run`` stay fast.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fipo_trainer.run_dir_hold import hold_run_dir

CONFIG_DIR_ENV = "FIPO_CONFIG_DIR"
CONFIG_NAME = "config"
DRY_RUN_FLAG = "--dry-run"
MULTIRUN_FLAGS = ("--multirun", "-m")
INTERRUPTED_EXIT = 130  # Ctrl-C: what a shell reports for a process SIGINT stopped (128 + 2)

__all__ = ["compose_config", "config_dir", "config_keys", "data_main", "dry_run"]
__all__ += ["dry_run_sweep", "eval_main", "plot_main", "quoted_override", "train_main"]
__all__ += ["unknown_key_message"]


def config_dir() -> Path:
    """The Hydra config directory: ``$FIPO_CONFIG_DIR`` or ``configs/`` of this checkout."""
    env = os.environ.get(CONFIG_DIR_ENV)
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "configs"
    if not (path / f"{CONFIG_NAME}.yaml").is_file():
        raise FileNotFoundError(
            f"Hydra config tree not found at {path} (no {CONFIG_NAME}.yaml): install "
            f"fipo-trainer editable from its repository (pip install -e .) or set "
            f"{CONFIG_DIR_ENV} to the repository's configs/ directory"
        )
    return path.resolve()


def compose_config(overrides: Sequence[str] = (), *, directory: str | Path | None = None):
    """Compose ``config.yaml`` with Hydra overrides (``recipe=NAME``, ``a.b=1``), no run dir.

    An override of a key the config lacks raises `ConfigError` naming the closest keys
    (Hydra's own advice, ``+a.b=1``, only moves the failure to the schema check).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, OverrideParseException

    import fipo_trainer.trainer.config  # noqa: F401 - registers the schema
    from fipo_trainer.trainer.config import overrides as ov
    from fipo_trainer.trainer.config.errors import ConfigError

    remaining, unknown = ov.open_overrides(overrides), []
    with initialize_config_dir(str(directory or config_dir()), version_base=None):
        while True:
            try:
                cfg = compose(config_name=CONFIG_NAME, overrides=remaining)
                break
            except OverrideParseException as err:
                raise ConfigError(unreadable_override_message(err.override, err.message)) from None
            except ConfigCompositionException as err:
                key = m.group(1) if (m := _UNKNOWN_OVERRIDE.search(str(err))) else None
                kept = [o for o in remaining if ov.override_key(o) != key]
                if key is None and (bad := _BAD_VALUE.match(str(err))) and err.__cause__:
                    why = str(err.__cause__).splitlines()[0]  # the schema's type, not a trace
                    raise ConfigError(f"cannot set {bad.group(1)}: {why}") from None
                if key is None or len(kept) == len(remaining):  # a group's option, a=b,c
                    raise ConfigError(ov.composition_message(str(err))) from None
                unknown.append(key)
                remaining = kept
    if unknown:
        keys = config_keys(cfg)
        raise ConfigError([unknown_key_message(k, keys) for k in unknown])
    return cfg


_UNKNOWN_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_BAD_VALUE = re.compile(r"Error merging override (.+)")


def quoted_override(key: str, value: object) -> str:
    """``key='value'``, which Hydra reads back as exactly ``str(value)``."""
    from fipo_trainer.trainer.config.overrides import quoted

    return f"{key}={quoted(value)}"


def unreadable_override_message(override: str, hydra_message: str) -> str:
    """Hydra could not parse ``override``: say which, why, and how to quote its value."""
    key, _, value = override.partition("=")
    reason = hydra_message.splitlines()[0] if hydra_message else "unreadable"
    return (
        f"cannot read the override {override!r} ({reason}). A value holding '=', '~', spaces, "
        f"commas, brackets or quotes must be quoted: {quoted_override(key, value)} "
        "(https://hydra.cc/docs/advanced/override_grammar/basic/)"
    )


def config_keys(cfg: Any) -> list[str]:
    """Every dotted key that holds a value, at all nesting levels (``actor.lr``,
    ``actor.policy_loss.clip_ratio_low``): the keys an override can set."""
    from omegaconf import OmegaConf

    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                key = f"{prefix}{name}"
                if not (isinstance(value, dict) and value):  # a value, or an empty mapping
                    keys.append(key)
                walk(value, key + ".")

    tree = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(tree, dict)
    tree.pop("hydra", None)
    walk(tree, "")
    return keys


def unknown_key_message(key: str, keys: Sequence[str]) -> str:
    """``unknown config key actor.lrr; did you mean actor.lr?`` (difflib's closest keys);
    verl's names (``actor_rollout_ref.actor.optim.lr``) are answered with this config's."""
    import difflib

    from fipo_trainer.trainer.config.overrides import from_verl, verl_message

    if message := verl_message(key, keys):
        return message
    ours = from_verl(key)
    scored = [(difflib.SequenceMatcher(None, ours or key, k).ratio(), k) for k in keys]
    best = max((score for score, _ in scored), default=0.0)
    # The nearest keys only: "actor.lrr" means actor.lr, not every key that shares "actor.".
    close = [k for score, k in sorted(scored, reverse=True) if score >= max(0.6, best - 0.05)][:3]
    if close:
        return f"unknown config key {key}; did you mean {' or '.join(close)}?"
    return f"unknown config key {key}; no key is close (fipo-train --cfg job lists them all)"


def _check_overrides(args: Sequence[str]) -> Any:
    """Before Hydra's main: an unknown key exits 2 with `unknown_key_message` (Hydra would
    suggest ``+key=value``). Anything else is left to Hydra, which reports it itself.
    Returns the composed config (None: not composed here)."""
    from fipo_trainer.trainer.config.errors import ConfigError

    if any(a.startswith(_OTHER_CONFIG_FLAGS) for a in args):
        return None  # another primary config: its keys are not config.yaml's
    overrides = [
        a for a in args if "=" in a and not a.startswith("-") and not a.startswith("hydra")
    ]
    try:
        return compose_config(overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    except Exception:  # Hydra's main reports it with its own message
        return None


def _run_dir_to_hold(args: Sequence[str], cfg: Any) -> Path | None:
    """The run directory to lock before Hydra's main writes ``.hydra/`` there (a refused
    second run overwrote the first's); None for Hydra's flags (``--cfg job``: no run)."""
    if cfg is None or any(a.startswith("-") for a in args):
        return None
    try:
        return Path(str(cfg.trainer.run_dir))  # `hold_run_dir` resolves it
    except Exception:  # an interpolation only Hydra's main resolves: the task locks it
        return None


_OTHER_CONFIG_FLAGS = ("--config-name", "--config-path", "--config-dir", "-cn", "-cp", "-cd")


def dry_run(overrides: Sequence[str]) -> int:
    """Print the converted, derived config and the validation result; start nothing."""
    from fipo_trainer.trainer.config import (
        ConfigError,
        config_to_yaml,
        load_config,
        validate_config,
    )

    try:
        cfg = load_config(compose_config(overrides), build_model=False)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    text = config_to_yaml(cfg)
    if cfg.model.tiny.enable and not cfg.model.path:
        text = "# model.path: built at start from model.tiny (cached)\n" + text
    print(text, end="")
    world, sp = cfg.resources.actor_world_size, cfg.actor.ulysses_sequence_parallel_size
    if sp >= 1 and world % sp == 0:  # how the actor ranks group
        print(f"actor layout: {world} actor ranks = {world // sp} DP groups × SP {sp}",
              file=sys.stderr)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    from fipo_trainer.data.records import DataError
    from fipo_trainer.trainer.data_source import loaded_prompts_report

    try:
        validate_config(cfg, check_data=True)  # logs its warnings; reads each file's head
        for line in loaded_prompts_report(cfg):  # then every row, tokenized
            print(line, file=sys.stderr)
    except (ConfigError, DataError) as err:
        print(err, file=sys.stderr)
        return 2
    print("config OK (dry run: nothing started)", file=sys.stderr)
    return 0


def sweep_jobs(args: Sequence[str]) -> list[list[str]]:
    """The overrides of every job ``fipo-train --multirun ARGS`` launches (Hydra's
    BasicSweeper expansion, with the config's ``hydra.sweeper.params``)."""
    from fipo_trainer.trainer.sweep import expand_sweep, sweeper_params

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return expand_sweep(overrides, sweeper_params(overrides, config_dir(), CONFIG_NAME))


def job_errors(overrides: Sequence[str], *, check_data: bool = False) -> list[str]:
    """Every config problem of one job (empty: it would start); its Hydra-only overrides
    (``hydra.sweep.dir=...``) are not the training config's."""
    from fipo_trainer.data.records import DataError
    from fipo_trainer.trainer.config import ConfigError, load_config, validate_config
    from fipo_trainer.trainer.data_source import loaded_prompts_report

    config_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        cfg = load_config(compose_config(config_overrides), build_model=False)
        validate_config(cfg, check_data=check_data)
        if check_data:  # every row as training loads it (once per distinct data setting)
            loaded_prompts_report(cfg)
    except ConfigError as err:
        return list(err.errors)
    except DataError as err:
        return [str(err)]
    except Exception as err:  # Hydra composition: report it per job
        return [" ".join(str(err).split())]
    return []


def dry_run_sweep(args: Sequence[str], *, check_data: bool = True) -> int:
    """``--dry-run --multirun``: expand the sweep and validate every job; start nothing."""
    try:
        jobs = sweep_jobs(args)
    except Exception as err:  # a malformed sweep override
        print(f"fipo-train: bad sweep: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    from fipo_trainer.trainer.sweep import swept_run_dir

    if refused := swept_run_dir(jobs):
        print(f"fipo-train: {refused}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    bad = 0
    for num, job in enumerate(jobs):
        errors = job_errors(job, check_data=check_data)
        bad += bool(errors)
        print(f"job {num}: {' '.join(job) or '(no overrides)'}: {'ERROR' if errors else 'OK'}")
        for message in errors:
            print(f"  - {message}", file=sys.stderr)
    verdict = f"{bad} of {len(jobs)} jobs invalid" if bad else f"all {len(jobs)} jobs OK"
    print(f"sweep: {verdict} (dry run: nothing started)", file=sys.stderr)
    return 2 if bad else 0


def _check_sweep(args: list[str]) -> list[str]:
    """Before a multirun starts: every job must be valid, or nothing runs (exit 2; Hydra
    itself finds a bad job only when its turn comes, after the others trained). Returns
    ``args`` naming each job directory by its swept overrides (`sweep.dirname_override`)."""
    from hydra.errors import OverrideParseException

    from fipo_trainer.trainer.sweep import dirname_override, swept_run_dir

    try:
        jobs = sweep_jobs(args)
    except OverrideParseException as err:
        print(unreadable_override_message(err.override, err.message), file=sys.stderr)
        sys.exit(2)
    except Exception:  # Hydra reports a malformed sweep itself
        return args
    if refused := swept_run_dir(jobs):
        print(f"fipo-train: {refused}", file=sys.stderr)
        sys.exit(2)
    failed = [(n, job, errs) for n, job in enumerate(jobs) if (errs := job_errors(job))]
    for num, job, errors in failed:
        print(f"job {num} ({' '.join(job)}):", file=sys.stderr)
        for message in errors:
            print(f"  - {message}", file=sys.stderr)
    if failed:
        print(f"fipo-train: {len(failed)} of {len(jobs)} sweep jobs invalid; nothing started",
              file=sys.stderr)
        sys.exit(2)
    extra = dirname_override(args, jobs)
    return [*args, extra] if extra else args


def _train_task(cfg) -> None:
    """The Hydra task: `prepare_config` (convert, validate once, build the tiny model), then
    the loop, which takes the validated config as it is. All before Ray starts, and without
    torch, which loads beside Ray's start (``trainer.launch``). In a sweep the job's own
    Hydra directory is its run directory, and a bad job fails alone."""
    from fipo_trainer.trainer.config import ConfigError, prepare_config
    from fipo_trainer.trainer.sweep import multirun_job_dir

    job_dir = multirun_job_dir()
    if job_dir is not None:
        cfg.trainer.run_dir = job_dir
    try:
        train_cfg = prepare_config(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        if job_dir is not None:
            raise  # Hydra marks this job failed and runs the next
        sys.exit(2)
    from fipo_trainer.trainer.launch import launch, one_line_errors

    try:
        with hold_run_dir(train_cfg.trainer.run_dir):  # train_main's hold, if it is that dir
            launch(train_cfg)  # Ray starts while torch loads
    except Exception as err:  # one whose message is the whole story: a line, not a trace
        stopped, one_line = one_line_errors()
        if job_dir is not None or not isinstance(err, one_line):
            raise
        print(f"fipo-train: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, stopped) else 2)


def train_main(argv: Sequence[str] | None = None) -> None:
    """``fipo-train [--dry-run] [recipe=NAME] [key=value ...]`` (Hydra flags such as
    ``--cfg job``, ``--help``, ``--multirun`` work as usual)."""
    from fipo_trainer.trainer.config.overrides import open_overrides

    args = open_overrides(list(sys.argv[1:] if argv is None else argv))
    multirun = any(a in MULTIRUN_FLAGS for a in args)
    if DRY_RUN_FLAG in args:
        rest = [a for a in args if a != DRY_RUN_FLAG]
        sys.exit(dry_run_sweep(rest) if multirun else dry_run(rest))
    from fipo_trainer.startup import pause_gc

    pause_gc()  # imports, config, tiny model, Ray: settled once the roles are up
    run_dir = None
    if multirun and not any(a.startswith(_OTHER_CONFIG_FLAGS) for a in args):
        args = _check_sweep(args)
    else:
        run_dir = _run_dir_to_hold(args, _check_overrides(args))
    import hydra

    import fipo_trainer.trainer.config  # registers the schema
    import fipo_trainer.trainer.sweep  # noqa: F401 - the ${fipo_job_dir:}, ... resolvers
    from fipo_trainer.fsutil import RunDirUnusable
    from fipo_trainer.trainer.interrupt import reporting_hangs

    sys.argv = [sys.argv[0] if sys.argv else "fipo-train", *args]
    main = hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base=None)
    try:
        with hold_run_dir(run_dir), reporting_hangs():
            main(_train_task)()
    except RunDirUnusable as err:  # the single run's, before Hydra wrote into the directory
        print(f"fipo-train: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:  # a message, not a traceback through Hydra's frames
        from fipo_trainer.trainer.loop import TrainingInterrupted  # it said where and how

        if not isinstance(err, TrainingInterrupted):  # before the trainer started
            print("fipo-train: interrupted (Ctrl-C) before training started", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)


def eval_main(argv: Sequence[str] | None = None) -> None:
    """``fipo-eval``: see fipo_trainer.trainer.evaluate."""
    from fipo_trainer.trainer.evaluate import main

    sys.exit(main(list(sys.argv[1:] if argv is None else argv)))


def plot_main(argv: Sequence[str] | None = None) -> None:
    """``fipo-plot``: see fipo_trainer.trainer.plot."""
    from fipo_trainer.trainer.plot import main

    sys.exit(main(list(sys.argv[1:] if argv is None else argv)))


def data_main(argv: Sequence[str] | None = None) -> None:
    """``fipo-data prepare|arithmetic|tiny-model ...``: see fipo_trainer.data.prepare."""
    from fipo_trainer.data.prepare import main

    sys.exit(main(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    train_main()
