"""Every field of the training batch: shape, dtype, the one stage that produces it, readers.

Why one table: a batch passes through five stages (prompts -> generate -> grade -> log-prob
-> advantages -> update); each stage returns only the fields it adds (``batch |= stage(...)``
refuses to overwrite), and each worker receives ``batch.select(*what_it_reads)``. This
module is that contract; ``tests/unit/test_schema.py`` checks the stages against it.

Shapes: ``n`` rows (responses), ``P`` the padded prompt width (left-padded), ``R`` the
response width (= ``rollout.max_tokens``, right-padded); ``P+R`` sequences are
``[prompt | response]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ACTOR_LOG_PROB_READS",
    "ACTOR_UPDATE_OPTIONAL_READS",
    "ACTOR_UPDATE_READS",
    "FIELDS",
    "GENERATE_READS",
    "PROMPT_OBJECT_FIELDS",
    "STAGES",
    "Field",
    "check_stage_output",
    "produced_by",
]

# Stages in order (the producer of a field is one of them).
PROMPTS = "prompts"  # data.dataset: collate (per prompt, repeated n times by generate)
GENERATE = "generate"  # rollout: RolloutGroup.generate
GRADE = "grade"  # rewards: RewardPool via trainer.sampling.grade
LOG_PROB = "log_prob"  # actor: ActorGroup.compute_log_prob
# trainer: trainer.rollout_correction.rollout_correction (pure; only with the correction on)
ROLLOUT_CORRECTION = "rollout_correction"
ADVANTAGES = "advantages"  # trainer: loop.advantages (pure)
STAGES = (PROMPTS, GENERATE, GRADE, LOG_PROB, ROLLOUT_CORRECTION, ADVANTAGES)


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "tensor" or "object" (one Python value per row)
    shape: str
    dtype: str
    producer: str
    readers: tuple[str, ...]
    doc: str


def _f(name, kind, shape, dtype, producer, readers, doc) -> Field:
    return Field(name, kind, shape, dtype, producer, tuple(readers), doc)


_TABLE = (
    # --- per prompt, repeated for each of its n responses
    _f("uid", "object", "[n]", "str", PROMPTS, ("sampling", "advantages", "dump"),
       "prompt id; the n responses of a prompt form one group"),
    _f("data_source", "object", "[n]", "str", PROMPTS, ("grade", "dump", "validation"),
       "dataset name; routes the grader"),
    _f("ground_truth", "object", "[n]", "str", PROMPTS, ("grade", "dump"),
       "the reference answer"),
    _f("extra_info", "object", "[n]", "dict", PROMPTS, ("grade",),
       "per-row dict handed to custom reward functions"),
    _f("raw_prompt", "object", "[n]", "list[dict]", PROMPTS, ("dump",),
       "the chat messages before tokenisation"),
    # --- generate
    _f("responses", "tensor", "[n, R]", "int64", GENERATE, ("actor",),
       "response token ids, right-padded with pad_token_id"),
    _f("input_ids", "tensor", "[n, P+R]", "int64", GENERATE, ("actor",),
       "prompt (left-padded) + response (right-padded)"),
    _f("attention_mask", "tensor", "[n, P+R]", "int64", GENERATE, ("actor", "metrics"),
       "1 on real prompt and response tokens"),
    _f("response_mask", "tensor", "[n, R]", "float32", GENERATE,
       ("actor", "grade", "advantages", "metrics"), "1 on real response tokens"),
    _f("rollout_log_probs", "tensor", "[n, R]", "float32", GENERATE,
       ("metrics", "rollout_correction"),
       "log-prob of each sampled token under the engine's sampling distribution"),
    _f("rollout_weight_version", "tensor", "[n, R]", "int64", GENERATE, ("pipeline",),
       "weight version (syncs loaded by the engine) that produced each token; -1 on padding"),
    _f("response_text", "object", "[n]", "str", GENERATE, ("grade", "dump"),
       "decoded response (special tokens skipped)"),
    # --- grade
    _f("score", "object", "[n]", "float", GRADE, ("advantages", "metrics", "dump"),
       "reward after overlong shaping"),
    _f("acc", "object", "[n]", "bool", GRADE, ("sampling", "metrics", "dump"),
       "the answer is correct"),
    _f("pred", "object", "[n]", "str", GRADE, ("dump", "validation"),
       "the answer the grader extracted"),
    # --- log-prob (actor, training temperature)
    _f("old_log_probs", "tensor", "[n, R]", "float32", LOG_PROB,
       ("actor", "metrics", "rollout_correction"),
       "log-probs of the responses under the policy before the update (bypass_mode: the "
       "engine's rollout_log_probs)"),
    _f("entropy", "tensor", "[n, R]", "float32", LOG_PROB, ("metrics",),
       "token entropy of the policy before the update"),
    # --- rollout correction (algorithm.rollout_correction.enable; absent when off)
    _f("rollout_is_weights", "tensor", "[n, R]", "float32", ROLLOUT_CORRECTION, ("actor",),
       "importance weight pi_old / pi_rollout (thresholded, 0 on padding) multiplying the "
       "per-token policy loss"),
    # --- advantages
    _f("advantages", "tensor", "[n, R]", "float32", ADVANTAGES, ("actor",),
       "per-token advantage (GRPO/RLOO/... of score within each uid group)"),
)

FIELDS: dict[str, Field] = {f.name: f for f in _TABLE}

#: Object fields of a prompt batch that travel on with its responses (others are dropped).
PROMPT_OBJECT_FIELDS = tuple(f.name for f in _TABLE if f.producer == PROMPTS)
#: What a rollout worker reads from a (prompt-level, left-padded) prompt batch.
GENERATE_READS = ("input_ids", "attention_mask")
#: What the actor reads for the old-log-prob pass and for the update.
ACTOR_LOG_PROB_READS = ("input_ids", "attention_mask", "responses")
ACTOR_UPDATE_READS = (*ACTOR_LOG_PROB_READS, "response_mask", "old_log_probs", "advantages")
#: Read by the update when the batch has them (produced only by an optional stage).
ACTOR_UPDATE_OPTIONAL_READS = ("rollout_is_weights",)


def produced_by(stage: str) -> tuple[str, ...]:
    """The fields ``stage`` adds to the batch."""
    if stage not in STAGES:
        raise ValueError(f"unknown batch stage {stage!r}; stages: {STAGES}")
    return tuple(f.name for f in _TABLE if f.producer == stage)


def check_stage_output(stage: str, keys: Iterable[str]) -> None:
    """Raise unless ``keys`` are exactly the fields ``stage`` produces."""
    got, want = set(keys), set(produced_by(stage))
    if got != want:
        raise ValueError(
            f"stage {stage!r} returned fields {sorted(got)}; data/schema.py declares "
            f"{sorted(want)} (extra: {sorted(got - want)}, missing: {sorted(want - got)})"
        )
