"""Ulysses SP attention: 2 gloo ranks on shards of a packed row must match one process on the whole row."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM

from fipo_trainer.actor import ulysses
from fipo_trainer.cluster.worker import free_port

SP = 2
LENGTHS = (
    5,
    7,
    3,
)  # 15 tokens (odd) -> padded to 16; the 7-token sequence spans positions 5..11, across the cut at 8
CASES = {  # name -> (num_key_value_heads, inner attention, gradient checkpointing)
    "kv2_sdpa": (2, "sdpa", False),
    "kv1_sdpa_ckpt": (
        1,
        "sdpa",
        True,
    ),  # kv heads repeated; checkpointing re-runs the forward in backward
    "kv1_eager": (1, "eager", False),
}


def _config(num_kv: int, attn: str) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv,
        max_position_embeddings=64,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )


def _packed_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids and position ids of the padded packed row, plus fixed loss weights for every position."""
    gen = torch.Generator().manual_seed(1)
    total = sum(LENGTHS)
    pad = -total % SP
    pos = torch.cat([torch.arange(n) for n in (*LENGTHS, pad) if n])[None]
    ids = torch.randint(0, 128, (1, total + pad), generator=gen)
    weights = torch.randn(1, total + pad, 128, generator=gen)
    return ids, pos, weights


def _run(
    model: Qwen2ForCausalLM, ids, pos, weights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    (logits * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), grads


def _reference(num_kv: int, state: dict[str, torch.Tensor]):
    model = Qwen2ForCausalLM(_config(num_kv, "sdpa"))
    model.load_state_dict(state)
    return _run(model, *_packed_inputs())


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SP)
    try:
        ids, pos, weights = _packed_inputs()
        shard = slice(rank * ids.shape[1] // SP, (rank + 1) * ids.shape[1] // SP)
        ulysses.set_group(dist.group.WORLD, SP, rank)
        ulysses.set_sequence(pos)
        results = {}
        for name, (num_kv, inner, ckpt) in CASES.items():
            state = torch.load(Path(out_dir) / f"state_kv{num_kv}.pt")
            model = Qwen2ForCausalLM(_config(num_kv, ulysses.install(inner)))
            model.load_state_dict(state)
            if ckpt:
                model.gradient_checkpointing_enable()
                model.train()
            results[name] = _run(model, ids[:, shard], pos[:, shard], weights[:, shard])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks done before either tears gloo down: a rank destroying its group while the
        # other still has a pair open aborted once in CI ("terminate called without an active
        # exception", SIGABRT) after its results were written.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _states(tmp_path: Path) -> dict[int, dict[str, torch.Tensor]]:
    states = {}
    for num_kv in sorted({c[0] for c in CASES.values()}):
        torch.manual_seed(num_kv)
        states[num_kv] = Qwen2ForCausalLM(_config(num_kv, "sdpa")).state_dict()
        torch.save(states[num_kv], tmp_path / f"state_kv{num_kv}.pt")
    return states


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_two_ranks_match_single_process(tmp_path: Path) -> None:
    states = _states(tmp_path)
    mp.spawn(_worker, args=(free_port("127.0.0.1"), str(tmp_path)), nprocs=SP, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(SP)]
    for name, (num_kv, _, _) in CASES.items():
        ref_logits, ref_grads = _reference(num_kv, states[num_kv])
        logits = torch.cat([ranks[r][name][0] for r in range(SP)], dim=1)
        assert (logits - ref_logits).abs().max().item() <= 1e-5, name
        for param, ref in ref_grads.items():
            grad = sum(ranks[r][name][1][param] for r in range(SP))
            assert _rel(grad, ref) <= 1e-5, (name, param, _rel(grad, ref))
        # each rank's share is a real part of the gradient, not the whole of it
        assert any(_rel(ranks[0][name][1][p], ref) > 1e-3 for p, ref in ref_grads.items()), name


def test_reference_depends_on_packing() -> None:
    """Guard for the test itself: the packed mask matters, so a plain causal mask would be caught."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_config(2, "sdpa"))
    ids, pos, _ = _packed_inputs()
    packed = model(input_ids=ids, position_ids=pos).logits
    causal = model(input_ids=ids).logits
    assert (packed - causal).abs().max() > 1e-3


def test_one_rank_path_equals_plain_sdpa() -> None:
    """At size 1 sdpa runs per packed sequence (no [T, T] mask): the same block-diagonal
    attention as HF's masked sdpa, to float rounding."""
    torch.manual_seed(0)
    ref_model = Qwen2ForCausalLM(_config(1, "sdpa"))
    ulysses.set_group(None, 1, 0)
    model = Qwen2ForCausalLM(_config(1, ulysses.install("sdpa")))
    model.load_state_dict(ref_model.state_dict())
    ids, pos, weights = _packed_inputs()
    ulysses.set_sequence(pos)
    ref_logits, ref_grads = _run(ref_model, ids, pos, weights)
    logits, grads = _run(model, ids, pos, weights)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    for name, ref in ref_grads.items():
        assert _rel(grads[name], ref) <= 1e-5, name


def test_check_heads() -> None:
    with pytest.raises(ValueError) as err:
        ulysses.check_heads(6, 4, 4)
    msg = str(err.value)
    assert "num_attention_heads=6" in msg and "num_key_value_heads=4" in msg
    assert "actor.ulysses_sequence_parallel_size" in msg and "[1, 2]" in msg
    for heads, kv, sp in [
        (4, 2, 2),
        (4, 1, 2),
        (8, 2, 4),
        (8, 2, 8),
        (4, 4, 1),
        (28, 4, 4),
        (28, 4, 2),
    ]:
        ulysses.check_heads(heads, kv, sp)
    with pytest.raises(ValueError):
        ulysses.check_heads(4, 2, 3)


def test_install_is_idempotent() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert ulysses.install("sdpa") == ulysses.ATTENTION_NAME == "fipo_ulysses"
    fn = AttentionInterface._global_mapping[ulysses.ATTENTION_NAME]
    assert ulysses.install("sdpa") == ulysses.ATTENTION_NAME
    assert AttentionInterface._global_mapping[ulysses.ATTENTION_NAME] is fn
    assert ulysses.ATTENTION_NAME in AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError):
        ulysses.install("flex_attention")
