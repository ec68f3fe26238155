"""The in-process cases of ``scripts/gpu_check.py``; each runs in a subprocess of its own:
``python scripts/gpu_check.py --run-check NAME WORKDIR`` prints one ``GPU_CHECK_RESULT``
line. Under ``GPU_CHECK_ALLOW_CPU=1`` (the script's tests) the CUDA-only parts are skipped.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

RESULT_PREFIX = "GPU_CHECK_RESULT "
# The model of tests/integration/test_colocated_sync.py (8 heads of 32, warm-started so greedy
# argmaxes are far from ties); one cached build shared by the cases.
TINY = {"hidden_size": 256, "num_layers": 2, "warm_start_steps": 40}
MAX_TOKENS = 24
LOGPROB_ATOL = 2e-2  # bf16


class CheckFailed(Exception):
    pass


def tiny_model() -> Path:
    from fipo_trainer.data.tiny_model import build_tiny_model

    return build_tiny_model(**TINY)


def _prompts(model: Path, n: int = 8) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"What is {3 * i + 1}+{7 * i + 2}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(n)
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _device_free_bytes() -> int:
    import torch

    return int(torch.cuda.mem_get_info()[0])


# --------------------------------------------------------------------------- cases


def case_tiny_model(work: Path) -> str:
    path = tiny_model()
    return f"{path.name[:8]} (h{TINY['hidden_size']}, {TINY['num_layers']} layers)"


def case_vllm(work: Path) -> str:
    """Greedy output survives a reload of the same weights and a sleep(1)/wake cycle."""
    from transformers import AutoModelForCausalLM

    from fipo_trainer.platform import current_platform
    from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig
    from fipo_trainer.rollout.vllm_engine import VllmEngine

    model = tiny_model()
    cuda = current_platform().is_cuda
    engine = VllmEngine(
        model,
        RolloutConfig(
            gpu_memory_utilization=0.3,
            max_model_len=256,
            max_num_seqs=16,
            max_tokens=MAX_TOKENS,
            free_cache_engine=True,
            sleep_level=1,
        ),
    )
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=MAX_TOKENS)
    prompts = _prompts(model)

    def tokens() -> list[tuple[int, ...]]:
        return [o.token_ids for o in engine.generate(prompts, greedy)]

    try:
        before = tokens()
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=current_platform().dtype)
        weights = {k: v.to(current_platform().device()) for k, v in hf.state_dict().items()}
        loaded = engine.update_weights(iter(weights.items()))
        if loaded < len(weights):
            raise CheckFailed(f"update_weights loaded {loaded} of {len(weights)} tensors")
        if tokens() != before:
            raise CheckFailed("greedy output changed after reloading the same weights")
        free_awake = _device_free_bytes() if cuda else 0
        engine.sleep()
        freed = (_device_free_bytes() - free_awake) if cuda else 0
        try:
            engine.generate(prompts, greedy)
            raise CheckFailed("generate ran while the engine was asleep")
        except RuntimeError as err:
            if "asleep" not in str(err):
                raise
        engine.wake()
        if tokens() != before:
            raise CheckFailed("greedy output changed after sleep(level 1) + wake")
        engine.update_weights(iter(weights.items()))  # what the sync does after wake
        if tokens() != before:
            raise CheckFailed("greedy output changed after wake + reload")
        if cuda and freed <= 0:
            raise CheckFailed(f"sleep(level 1) freed no device memory ({freed} B)")
        engine.config.sleep_level = 2  # level 2 drops the weights: the reload restores them
        free_awake = _device_free_bytes() if cuda else 0
        engine.sleep()
        freed2 = (_device_free_bytes() - free_awake) if cuda else 0
        engine.wake()
        engine.update_weights(iter(weights.items()))
        if tokens() != before:
            raise CheckFailed("greedy output changed after sleep(level 2) + wake + reload")
    finally:
        engine.shutdown()
    length = sum(map(len, before))
    if not cuda:
        return f"greedy equal after reload, wake ({length} tokens; CPU: no sleep mode)"
    return (
        f"greedy equal after reload, sleep 1/wake, sleep 2/wake/reload; sleep freed "
        f"{freed / 2**30:.2f} / {freed2 / 2**30:.2f} GiB"
    )


def _packed_batch(vocab: int, rows: int = 6, seed: int = 0):
    """Rows of varied prompt/response lengths, packed as the actor packs them."""
    import torch

    from fipo_trainer.actor.micro_batch import pack_rows

    gen = torch.Generator().manual_seed(seed)
    prompt_w, resp_w = 24, 40
    ids = torch.randint(10, vocab, (rows, prompt_w + resp_w), generator=gen)
    mask = torch.zeros_like(ids)
    for i in range(rows):
        p, r = 8 + (5 * i) % 16, 12 + (11 * i) % 28
        mask[i, prompt_w - p : prompt_w + r] = 1
    return pack_rows(ids, mask, prompt_w), ids, mask, prompt_w


def case_zero3(work: Path, offload: bool = False) -> str:
    """One ZeRO-3 step of the actor's DeepSpeed engine: finite loss and grad norm, weights move."""
    from fipo_trainer.platform import current_platform, worker_env

    for key, value in worker_env().items():  # DS_ACCELERATOR before DeepSpeed is imported
        os.environ.setdefault(key, value)
    import torch

    from fipo_trainer.actor.config import ActorConfig
    from fipo_trainer.actor.logprob import token_log_probs
    from fipo_trainer.cluster.worker import DistInfo, free_port, init_torch_distributed

    plat = current_platform()
    info = DistInfo(
        rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port("127.0.0.1")
    )
    os.environ.update({k: v for k, v in info.env().items() if k != "FIPO_WORKER_GROUP"})
    plat.bind_device(0)
    init_torch_distributed(info, plat.dist_backend)
    from fipo_trainer.actor.engine import DeepSpeedEngine

    model = tiny_model()
    cfg = ActorConfig(
        model_path=str(model),
        zero_stage=3,
        lr=1e-3,
        lr_warmup_steps=0,
        weight_decay=0.0,
        gradient_checkpointing=True,
        param_offload=offload,
        optimizer_offload=offload,
    )
    engine = DeepSpeedEngine(cfg, 1, plat)
    named = engine.named_tensors()
    tensors = [t for _, t in named]

    def snapshot() -> dict[str, torch.Tensor]:
        with engine.gathered(tensors):
            return {n: t.detach().float().cpu().clone() for n, t in named}

    dtype = next(engine.module.parameters()).dtype
    if plat.is_cuda and dtype != torch.bfloat16:
        raise CheckFailed(f"parameters are {dtype}, expected bf16")
    before = snapshot()
    vocab = engine.module.config.vocab_size
    packed = _packed_batch(vocab)[0].to(engine.device)
    if plat.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    engine.train()
    logp, _ = token_log_probs(engine.logits(packed), packed.targets)
    loss = -logp.mean()
    engine.set_accumulation_boundary(True)
    engine.backward(loss)
    norm = engine.step()
    after = snapshot()
    moved = max(float((after[n] - before[n]).abs().max()) for n in before)
    if not (torch.isfinite(loss) and norm == norm and norm > 0 and moved > 0):
        raise CheckFailed(f"loss {float(loss)}, grad norm {norm}, max abs dw {moved}")
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if plat.is_cuda else ""
    where = "param+optimizer offload, " if offload and plat.is_cuda else ""
    return (
        f"{where}{str(dtype).split('.')[-1]}: loss {float(loss):.3f}, grad_norm {norm:.3g}, "
        f"max abs dw {moved:.1e}{peak}"
    )


def case_flash(work: Path) -> str:
    """Packed-varlen log-probs: flash_attention_2 vs sdpa through actor/ulysses.py, and the
    packed row vs each row alone (plain sdpa, no packing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fipo_trainer.actor import ulysses
    from fipo_trainer.actor.logprob import token_log_probs
    from fipo_trainer.platform import current_platform

    plat = current_platform()
    model_path = tiny_model()
    dev = plat.device()
    attn = ulysses.install("sdpa")
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=plat.dtype, attn_implementation=attn
    ).to(dev)
    model.eval()
    packed, ids, mask, prompt_w = _packed_batch(model.config.vocab_size)
    packed = packed.to(dev)

    def packed_logp(kernel: str) -> torch.Tensor:
        ulysses.install(kernel)
        ulysses.set_sequence(packed.position_ids)
        with torch.no_grad():
            logits = model(
                input_ids=packed.input_ids,
                position_ids=packed.position_ids,
                use_cache=False,
                logits_to_keep=packed.logit_positions,
            ).logits[0]
        return token_log_probs(logits, packed.targets)[0]

    sdpa = packed_logp("sdpa")
    plain = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=plat.dtype, attn_implementation="sdpa"
    ).to(dev)
    plain.eval()
    alone = []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()].to(dev)[None]
            p = int(mask[i, :prompt_w].sum())
            logits = plain(input_ids=row, use_cache=False).logits[0, p - 1 : -1]
            alone.append(token_log_probs(logits, row[0, p:])[0])
    vs_alone = float((sdpa - torch.cat(alone)).abs().max())
    if vs_alone >= LOGPROB_ATOL:
        raise CheckFailed(f"packed sdpa vs rows alone: max abs diff {vs_alone:.2e}")
    if not plat.is_cuda:
        return f"sdpa packed vs alone {vs_alone:.1e}; flash not run (CPU)"
    if plat.attn_implementation != "flash_attention_2":
        raise CheckFailed("flash_attn is not installed: the platform falls back to sdpa")
    flash = packed_logp("flash_attention_2")
    diff = float((flash - sdpa).abs().max())
    if diff >= LOGPROB_ATOL:
        raise CheckFailed(f"flash vs sdpa max abs diff {diff:.2e} >= {LOGPROB_ATOL}")
    return (
        f"max |flash - sdpa| {diff:.1e} over {packed.targets.numel()} tokens "
        f"({ids.shape[0]} packed rows); sdpa packed vs alone {vs_alone:.1e}"
    )


CASES = {
    "tiny_model": case_tiny_model,
    "vllm": case_vllm,
    "zero3": case_zero3,
    "zero3_offload": lambda work: case_zero3(work, offload=True),
    "flash": case_flash,
}


def run_case(name: str, workdir: str) -> int:
    """Run one case; print its result line; 0 on pass."""
    try:
        if name != "tiny_model" and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
            from fipo_trainer.platform import current_platform

            if not current_platform().is_cuda:  # never pass a GPU check on the CPU path
                raise CheckFailed("this check's process runs on CPU (no CUDA or FIPO_FORCE_CPU)")
        value, result = CASES[name](Path(workdir)), "PASS"
    except CheckFailed as err:
        value, result = str(err), "FAIL"
    except Exception as err:  # report any crash as this check's failure
        traceback.print_exc()
        value, result = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}", "FAIL"
    print(RESULT_PREFIX + json.dumps({"result": result, "value": value}), flush=True)
    return 0 if result == "PASS" else 1
