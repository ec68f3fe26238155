"""Cross-section rules and `validate_config`, the one start-up check of a `TrainConfig`.

Why one module: a rule that relates two sections (batch sizes over actor ranks, lengths over
the engine's context, GPUs over nodes) has no single owner, so all such rules live here, in
one place a reader can scan; each section's own fields are checked by its ``validate()``.
`validate_config` runs both, plus the machine checks of `environment.py`, and reports every
problem at once. It is called once, by `prepare_config` (the CLI) or by a test; the trainer
takes the validated config as it is.
"""

from __future__ import annotations

import logging

from fipo_trainer.trainer.config import environment
from fipo_trainer.trainer.config.environment import Report
from fipo_trainer.trainer.config.errors import ConfigError
from fipo_trainer.trainer.config.load import tiny_model_clash
from fipo_trainer.trainer.config.schema import GROUP_ESTIMATORS, TrainConfig

logger = logging.getLogger(__name__)


def validate_config(
    cfg: TrainConfig,
    *,
    check_files: bool = True,
    check_platform: bool = True,
    check_data: bool = False,
) -> list[str]:
    """Check `cfg` at start-up; raise `ConfigError` listing every problem, return warnings.

    ``check_files``: data files, model/tokenizer directories, resume path and custom reward
    file must exist, and the model must hold prompt + response (its max_position_embeddings
    after ``model.override_config``). ``check_platform``: this machine must fit the settings
    (CUDA when GPUs are asked for locally, vLLM and logger packages installed, enough CPUs
    for local Ray). ``check_data``: each data file's columns and first rows parse (the dry run
    and ``prepare_config``; a bad row further in fails when training reads it).
    """
    report = Report()
    _check_sections(cfg, report)
    for rule in (_model, _batches, _algorithm, _lengths, _resources, _sequence_parallel):
        rule(cfg, report)
    if check_files:
        environment.check_files(cfg, report)
    if check_data:
        environment.check_data(cfg, report)
    if check_platform:
        environment.check_platform(cfg, report)
    for msg in report.warnings:
        logger.warning("config: %s", msg)
    if report.errors:
        raise ConfigError(report.errors)
    return report.warnings


def _sp(cfg: TrainConfig) -> int:
    """Sequence-parallel size (a plain ActorConfig, built in code, has none: 1)."""
    return max(1, int(getattr(cfg.actor, "ulysses_sequence_parallel_size", 1)))


def _prefixed(message: str, prefix: str) -> str:
    return message if message.startswith(prefix + ".") else f"{prefix}: {message}"


def _check_sections(cfg: TrainConfig, r: Report) -> None:
    """Each section's own ``validate()``; component messages get their full key."""
    from fipo_trainer.trainer.config.schema import TrainActorConfig

    actor_check = (
        cfg.actor.validate
        if isinstance(cfg.actor, TrainActorConfig)
        else lambda: TrainActorConfig.validate(cfg.actor)  # a plain ActorConfig built in code
    )
    checks = (
        ("model", cfg.model.validate),
        ("data", cfg.data.validate),
        ("actor", actor_check),
        ("rollout", cfg.rollout.validate),
        ("reward", cfg.reward.validate),
        ("algorithm", cfg.algorithm.validate),
        ("trainer", cfg.trainer.validate),
        ("resources", cfg.resources.validate),
    )
    for prefix, check in checks:
        try:
            check()
        except ConfigError as err:
            r.errors += err.errors
        except ValueError as err:
            r.error(_prefixed(str(err), prefix))


def _model(cfg: TrainConfig, r: Report) -> None:
    """model x data.synthetic: a model.path beside the tiny model (`tiny_model_clash`)."""
    if clash := tiny_model_clash(cfg):
        r.error(clash)


def _batches(cfg: TrainConfig, r: Report) -> None:
    """data x actor x rollout x resources: batches split into mini-batches and over ranks."""
    data, actor, res = cfg.data, cfg.actor, cfg.resources
    n = cfg.rollout.n
    if data.train_batch_size < 1 or actor.ppo_mini_batch_size < 1 or n < 1:
        return  # reported by the sections
    if data.train_batch_size % actor.ppo_mini_batch_size:
        r.error(
            f"data.train_batch_size={data.train_batch_size} is not a multiple of "
            f"actor.ppo_mini_batch_size={actor.ppo_mini_batch_size} (both in prompts): make "
            "the train batch a whole number of mini-batches"
        )
    sp = _sp(cfg)
    if res.actor_world_size >= 1 and res.actor_world_size % sp == 0:
        dp = res.actor_world_size // sp
        what = "resources.actor_world_size" + (
            f" / actor.ulysses_sequence_parallel_size = {dp} data-parallel ranks"
            if sp > 1
            else f"={dp}"
        )
        if (data.train_batch_size * n) % dp:
            r.error(
                f"data.train_batch_size x rollout.n = {data.train_batch_size} x {n} responses "
                f"do not split evenly over {what}: choose sizes whose product is a multiple of "
                f"{dp}"
            )
        if (actor.ppo_mini_batch_size * n) % dp:
            r.error(
                f"actor.ppo_mini_batch_size x rollout.n = {actor.ppo_mini_batch_size} x {n} "
                f"responses per optimizer step do not split evenly over {what}: choose a "
                f"mini-batch whose response count is a multiple of {dp}"
            )
    fg = cfg.algorithm.filter_groups
    if not fg.enable:
        if data.gen_batch_size < data.train_batch_size:
            r.error(
                f"data.gen_batch_size={data.gen_batch_size} < data.train_batch_size="
                f"{data.train_batch_size} without dynamic sampling: one generation round must "
                "fill the batch; set 'data.gen_batch_size=${data.train_batch_size}' (quoted) or "
                "algorithm.filter_groups.enable=true"
            )
        elif data.gen_batch_size > data.train_batch_size:
            r.warn(
                f"data.gen_batch_size={data.gen_batch_size} > data.train_batch_size="
                f"{data.train_batch_size} without dynamic sampling: the extra prompts are "
                "generated for nothing (a recipe's value kept after algorithm=grpo?); set "
                "'data.gen_batch_size=${data.train_batch_size}' (quoted)"
            )


def _algorithm(cfg: TrainConfig, r: Report) -> None:
    """algorithm x rollout.n x actor.loss_name."""
    alg, n = cfg.algorithm, cfg.rollout.n
    if alg.adv_estimator in GROUP_ESTIMATORS and n < 2:
        r.error(
            f"rollout.n={n} with algorithm.adv_estimator={alg.adv_estimator}: group-relative "
            "advantages need at least 2 responses per prompt; set rollout.n>=2"
        )
    if alg.filter_groups.enable and n < 2:
        r.error(
            f"rollout.n={n} with algorithm.filter_groups.enable=true: dynamic sampling keeps "
            "groups whose metric varies, which needs rollout.n>=2 (or disable filter_groups)"
        )
    _bypass(cfg, r)
    expected = {"fipo": "fipo", "dapo": "vanilla", "grpo": "vanilla"}.get(alg.name)
    if expected is not None and cfg.actor.loss_name != expected:
        r.warn(
            f"algorithm.name={alg.name} but actor.loss_name={cfg.actor.loss_name}: the name is "
            "only a label; the loss that runs is actor.loss_name"
        )


def _bypass(cfg: TrainConfig, r: Report) -> None:
    """algorithm.rollout_correction.bypass_mode x the correction x async x sampling: the
    engine's log-probs stand in for π_old only where they are π_old's."""
    rc, rollout, key = cfg.algorithm.rollout_correction, cfg.rollout, "algorithm.rollout_correction"
    if not rc.bypass_mode:
        return
    if rc.enable:
        r.error(
            f"{key}.bypass_mode=true with {key}.enable=true: bypass makes π_old the engine's "
            f"log-probs, so π_old / π_rollout is 1 and there is nothing to correct; set one false"
        )
    if cfg.trainer.async_mode != "off":
        r.error(
            f"{key}.bypass_mode=true with trainer.async_mode={cfg.trainer.async_mode}: under "
            "async π_old is the actor's recomputation and the engine's staleness is rollout "
            f"correction's to handle (docs/architecture.md); set {key}.bypass_mode=false or "
            "trainer.async_mode=off"
        )
    if rollout.top_p < 1.0 or rollout.top_k > 0:
        r.error(
            f"{key}.bypass_mode=true with rollout.top_p={rollout.top_p}, rollout.top_k="
            f"{rollout.top_k}: the engine's log-probs are then those of the truncated "
            "distribution, not the policy's; set rollout.top_p=1.0 and rollout.top_k=-1, or "
            f"{key}.bypass_mode=false"
        )


def _lengths(cfg: TrainConfig, r: Report) -> None:
    """data lengths x rollout context x actor token budgets."""
    data, rollout, actor = cfg.data, cfg.rollout, cfg.actor
    total = data.max_prompt_length + data.max_response_length
    if rollout.max_tokens != data.max_response_length:
        r.error(
            f"rollout.max_tokens={rollout.max_tokens} != data.max_response_length="
            f"{data.max_response_length}: set data.max_response_length only"
        )
    if rollout.max_model_len is not None and rollout.max_model_len < total:
        r.error(
            f"data.max_prompt_length + data.max_response_length = {total} exceeds "
            f"rollout.max_model_len={rollout.max_model_len}: raise rollout.max_model_len (null "
            "derives it) or shorten the prompt/response limits"
        )
    val_tokens = rollout.val.max_tokens
    if (
        val_tokens is not None
        and rollout.max_model_len is not None
        and data.max_prompt_length + val_tokens > rollout.max_model_len
    ):
        r.error(
            f"data.max_prompt_length + rollout.val.max_tokens = "
            f"{data.max_prompt_length + val_tokens} exceeds rollout.max_model_len="
            f"{rollout.max_model_len}: lower rollout.val.max_tokens or raise max_model_len"
        )
    if actor.use_dynamic_bsz:
        capacity = actor.ppo_max_token_len_per_gpu * _sp(cfg)
        if capacity < total:
            r.error(
                f"actor.ppo_max_token_len_per_gpu={actor.ppo_max_token_len_per_gpu} (x sequence "
                f"parallel {_sp(cfg)}) cannot hold one sequence of data.max_prompt_length + "
                f"data.max_response_length = {total} tokens: raise it to >= {total}"
            )
        lp = actor.log_prob_max_token_len_per_gpu
        if lp is not None and lp * _sp(cfg) < total:
            r.error(
                f"actor.log_prob_max_token_len_per_gpu={lp} cannot hold one sequence of {total} "
                "tokens: raise it or set it to null (= the update's budget)"
            )
    reward = cfg.reward
    if reward.max_response_length not in (None, data.max_response_length):
        r.error(
            f"reward.max_response_length={reward.max_response_length} != "
            f"data.max_response_length={data.max_response_length}: set data.max_response_length only"
        )
    if actor.override_config != cfg.model.override_config or (
        rollout.override_config != cfg.model.override_config
    ):
        r.error(
            "actor.override_config / rollout.override_config differ from "
            "model.override_config: set model.override_config only (both follow it)"
        )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _resources(cfg: TrainConfig, r: Report) -> None:
    """resources x rollout: placement of the engines and the GPUs they need.

    ``resources.rollout_workers`` counts vLLM engines; each spans ``rollout.tensor_parallel_size``
    = k devices, one TP rank per device. Colocated: engine e's k ranks share the devices of
    actor ranks e*k .. e*k+k-1 (one actor rank and at most one TP rank per device), so the
    engines need engines x k <= actor_world_size and k | actor_world_size. Split: the engines
    have engines x k devices of their own.
    """
    res, rollout = cfg.resources, cfg.rollout
    tp, engines, world = rollout.tensor_parallel_size, res.rollout_workers, res.actor_world_size
    if tp < 1 or engines < 1 or world < 1:
        return  # reported by the sections
    if res.placement == "colocated" and cfg.trainer.async_mode != "off":
        r.error(
            f"trainer.async_mode={cfg.trainer.async_mode} needs resources.placement=split: "
            "colocated engines share the actor's devices, so generation cannot overlap the "
            "update; set resources.placement=split or trainer.async_mode=off"
        )
    if res.placement == "colocated":
        if world % tp:
            r.error(
                f"resources.placement=colocated with rollout.tensor_parallel_size={tp}: an engine "
                f"spans {tp} consecutive actor devices, so resources.actor_world_size={world} must "
                f"be a multiple of {tp} (TP sizes that divide it: {_divisors(world)})"
            )
        if tp > 1 and engines * tp > world:  # (tp 1: the resources section reports it)
            r.error(
                f"resources.placement=colocated with more engines than devices: "
                f"resources.rollout_workers={engines} engines x rollout.tensor_parallel_size={tp} "
                f"= {engines * tp} devices, but resources.actor_world_size={world} devices host "
                f"them: set resources.rollout_workers <= {world // tp}"
            )
        elif res.gpus_per_node > 0 and engines * tp < world and world % tp == 0:
            r.warn(
                f"resources.placement=colocated: resources.rollout_workers={engines} engines x "
                f"rollout.tensor_parallel_size={tp} use {engines * tp} of the "
                f"{world} actor GPUs; the others idle during generation (rollout_workers="
                f"{world // tp} uses them all)"
            )
        if res.gpus_per_node > 0 and not rollout.free_cache_engine:
            r.warn(
                "resources.placement=colocated with rollout.free_cache_engine=false: vLLM keeps "
                "its KV cache while the actor trains on the same GPU (set it true to free it)"
            )
    elif rollout.free_cache_engine:
        r.warn(  # and an engine asleep would refuse the producer's calls in async modes
            "rollout.free_cache_engine=true has no use with resources.placement=split: "
            "the engines stay awake"
        )
    if res.gpus_per_node > 0 and res.gpus_per_node % tp:
        r.error(
            f"rollout.tensor_parallel_size={tp} does not divide resources.gpus_per_node="
            f"{res.gpus_per_node}: an engine's TP ranks must sit on one node; choose "
            f"rollout.tensor_parallel_size from {_divisors(res.gpus_per_node)}"
        )
    if res.gpus_per_node > 0 and res.nnodes >= 1:
        total = res.nnodes * res.gpus_per_node
        # Colocated: the engines live on the actor's devices (checked above).
        need = world + (engines * tp if res.placement == "split" else 0)
        if need > total:
            r.error(
                f"{res.placement} placement needs {need} GPUs (resources.actor_world_size="
                f"{world}"
                + (
                    f" + resources.rollout_workers={engines} x rollout.tensor_parallel_size={tp}"
                    if res.placement == "split"
                    else ""
                )
                + f") but resources.nnodes x gpus_per_node = {total}: lower them or add nodes"
            )
        elif need < total:
            r.warn(f"{total - need} of the {total} GPUs (nnodes x gpus_per_node) stay unused")


def _sequence_parallel(cfg: TrainConfig, r: Report) -> None:
    """SP groups tile the actor world (the model's heads are checked with the files)."""
    sp = _sp(cfg)
    if sp > 1 and cfg.resources.actor_world_size % sp:
        r.error(
            f"resources.actor_world_size={cfg.resources.actor_world_size} is not a multiple "
            f"of actor.ulysses_sequence_parallel_size={sp}: the actor ranks form data-parallel "
            "groups of that many ranks"
        )
