"""The policy being trained: the Ray-free update, the DeepSpeed engine facade, the Ray
worker and its driver-side group.

``ActorGroup`` is imported lazily: the update and the engine need no Ray.
"""

from typing import Any

from fipo_trainer.actor.config import ActorConfig

__all__ = ["ActorConfig", "ActorGroup"]


def __getattr__(name: str) -> Any:
    if name == "ActorGroup":
        from fipo_trainer.actor.group import ActorGroup

        return ActorGroup
    raise AttributeError(f"module 'fipo_trainer.actor' has no attribute {name!r}")
