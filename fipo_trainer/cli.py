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
import sys
from collections.abc import Sequence
from pathlib import Path

CONFIG_DIR_ENV = "FIPO_CONFIG_DIR"
CONFIG_NAME = "config"
DRY_RUN_FLAG = "--dry-run"

__all__ = [
    "compose_config",
    "config_dir",
    "data_main",
    "dry_run",
    "eval_main",
    "plot_main",
    "train_main",
]


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
    """Compose ``config.yaml`` with Hydra overrides (``recipe=NAME``, ``a.b=1``), no run dir."""
    from hydra import compose, initialize_config_dir

    import fipo_trainer.trainer.config  # noqa: F401 - registers the schema

    with initialize_config_dir(str(directory or config_dir()), version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def actor_layout(cfg) -> str:
    """How the actor ranks group, e.g. "64 actor ranks = 8 DP groups × SP 8"."""
    world = cfg.resources.actor_world_size
    sp = cfg.actor.ulysses_sequence_parallel_size
    return f"{world} actor ranks = {world // sp} DP groups × SP {sp}"


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
    if sp >= 1 and world % sp == 0:
        print(f"actor layout: {actor_layout(cfg)}", file=sys.stderr)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        validate_config(cfg)  # logs its warnings
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print("config OK (dry run: nothing started)", file=sys.stderr)
    return 0


def _train_task(cfg) -> None:
    """The Hydra task: `prepare_config` (convert, validate once, build the tiny model), then
    the loop, which takes the validated config as it is. All before Ray starts."""
    from fipo_trainer.trainer.config import ConfigError, prepare_config

    try:
        train_cfg = prepare_config(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    from fipo_trainer.trainer.loop import run_training

    run_training(train_cfg)


def train_main(argv: Sequence[str] | None = None) -> None:
    """``fipo-train [--dry-run] [recipe=NAME] [key=value ...]`` (Hydra flags such as
    ``--cfg job``, ``--help``, ``--multirun`` work as usual)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if DRY_RUN_FLAG in args:
        sys.exit(dry_run([a for a in args if a != DRY_RUN_FLAG]))
    import hydra

    import fipo_trainer.trainer.config  # noqa: F401 - registers the schema

    sys.argv = [sys.argv[0] if sys.argv else "fipo-train", *args]
    main = hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base=None)
    main(_train_task)()


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
