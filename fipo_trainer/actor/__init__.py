"""The policy being trained: DeepSpeed ZeRO-2/3 workers and their driver-side group."""

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.group import ActorGroup, plan_rows, responses_per_prompt

__all__ = ["ActorConfig", "ActorGroup", "plan_rows", "responses_per_prompt"]
