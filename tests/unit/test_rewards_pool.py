"""RewardPool: routing, shaping, and crash isolation against hostile inputs (real processes)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fipo_trainer.rewards import RewardConfig, RewardPool, dapo
from fipo_trainer.rewards import math_verify as mv
from fipo_trainer.rewards.pool import GradeItems

# A regression that loses an item would make grade() wait forever: fail instead.
pytestmark = pytest.mark.timeout(90)

TIMEOUT_S = 2.0
# A timed-out item costs the timeout plus a worker restart (a fresh interpreter, < 2 s here).
PER_FAILURE_BUDGET_S = TIMEOUT_S + 4.0

CUSTOM_SOURCE = """
import os
import sys
import time


def score(response, ground_truth, data_source=None, extra_info=None):
    if response == "hang":
        time.sleep(10_000)
    if response == "spin":
        while True:
            pass
    if response == "die":
        os._exit(7)
    if response == "exit":
        sys.exit(3)
    if response == "raise":
        raise ValueError("boom")
    if response == "nan":
        return float("nan")
    if response == "child-hang":  # a grader that starts its own process, then hangs
        import subprocess

        child = subprocess.Popen(["sleep", "1000"])
        with open(extra_info["pid_file"], "w") as f:
            f.write(str(child.pid))
        time.sleep(10_000)
    if response == "echo":
        return {"score": 0.5, "acc": True, "pred": f"{data_source}|{extra_info}"}
    return 1.0 if response == ground_truth else 0.0
"""


@pytest.fixture(scope="module")
def pool():
    cfg = RewardConfig(timeout_s=TIMEOUT_S, num_workers=2, chunk_size=4, dapo_chunk_size=16)
    with RewardPool(cfg) as p:
        p.wait_ready()
        yield p


@pytest.fixture(scope="module")
def custom_pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward_fn") / "my_reward.py"
    path.write_text(CUSTOM_SOURCE)
    cfg = RewardConfig(
        custom_function=f"{path}:score",
        timeout_s=TIMEOUT_S,
        num_workers=2,
        chunk_size=16,  # one chunk: failures must be charged to the right item within it
        score_format="binary",
    )
    with RewardPool(cfg) as p:
        p.wait_ready()
        yield p


def _assert_complete(result, n: int) -> None:
    assert len(result.scores) == len(result.acc) == len(result.preds) == len(result.status) == n
    assert all(s in ("ok", "timeout", "error") for s in result.status)


def test_routing_matches_direct_graders(pool: RewardPool) -> None:
    responses = [
        "Work...\nAnswer: \\frac12",
        "Work...\nAnswer: 0.5",
        "So \\boxed{\\frac12}",
        "Answer: 23",
        "So \\boxed{\\frac{1}{2}}",
        "Answer: 0.5",
    ]
    gts = ["\\frac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}", "23", "0.5", "\\frac{1}{2}"]
    sources = ["math_dapo", "math_dapo", "math_dapo", "aime24", "math500", "gsm8k"]
    result = pool.grade(responses, gts, sources)
    _assert_complete(result, 6)
    assert result.status == ["ok"] * 6
    for i in range(3):  # DAPO rule: string match after normalisation only
        assert result.preds[i] == dapo.compute_score(responses[i], gts[i])["pred"]
    assert result.acc == [True, False, False, True, True, True]
    assert result.scores == [1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    assert result.preds[4:] == [
        mv.compute_score(r, g)["pred"] for r, g in zip(responses[4:], gts[4:])
    ]
    assert result.metrics["reward/acc/math_dapo"] == pytest.approx(1 / 3)
    assert result.metrics["reward/timeouts"] == 0 and result.metrics["reward/errors"] == 0


def test_grade_stream_grades_parts_as_they_come_and_equals_grade(pool: RewardPool) -> None:
    responses = ["Answer: 1", "Answer: 2", "So \\boxed{3}", "Answer: 5", "nothing", "Answer: 6"]
    gts = ["1", "3", "3", "5", "5", "6"]
    sources = ["math_dapo", "math_dapo", "math500", "aime24", "math_dapo", "gsm8k"]
    whole = pool.grade(responses, gts, sources)
    arrived: list[int] = []

    def parts():  # out of order, the way engines finish prompts
        for idx in ([3, 4], [0], [1, 2, 5]):
            arrived.append(len(idx))
            yield GradeItems(idx, [responses[i] for i in idx], [gts[i] for i in idx],
                             [sources[i] for i in idx])  # fmt: skip

    streamed = pool.grade_stream(parts(), 6)
    assert arrived == [2, 1, 3]
    assert (streamed.scores, streamed.acc, streamed.preds) == (
        whole.scores, whole.acc, whole.preds
    )
    assert streamed.metrics["reward/acc/math_dapo"] == whole.metrics["reward/acc/math_dapo"]
    with pytest.raises(ValueError, match="1 of 2 items never came"):
        pool.grade_stream([GradeItems([0], ["Answer: 1"], ["1"], ["math_dapo"])], 2)
    twice = [GradeItems([0], ["Answer: 1"], ["1"], ["math_dapo"])] * 2
    with pytest.raises(ValueError, match="item 0 came twice"):
        pool.grade_stream(twice, 2)


def test_hostile_inputs_all_get_verdicts(pool: RewardPool) -> None:
    big = "Let me think. " * 75_000  # ~1 MB
    cases = [  # (response, ground truth, data source, expected acc or None if it may fail)
        ("", "", "math_dapo", False),
        ("", "5", "math500", False),
        (big + "Answer: 5", "5", "math_dapo", True),
        (big + "\\boxed{5}", "5", "math500", True),
        ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1", "math500", False),
        ("{" * 10_000 + "\nAnswer: 5", "5", "math_dapo", True),
        ("Answer: \ud800", "\ud800", "math_dapo", True),
        ("\\boxed{\ud800}", "\udfff", "math500", False),
        ("\\boxed{10^{10^{10^{10}}}}", "1", "math500", None),  # sympy would run for minutes
        ("Answer: 7", "7", "math500", True),
        ("Answer: 8", "7", "aime25", False),
    ]
    responses, gts, sources, expected = (list(x) for x in zip(*cases))
    start = time.monotonic()
    result = pool.grade(responses, gts, sources)
    elapsed = time.monotonic() - start
    _assert_complete(result, len(cases))
    for i, want in enumerate(expected):
        if want is not None:
            assert result.status[i] == "ok", (i, result.errors.get(i))
            assert result.acc[i] is want, i
    slow = 8
    assert result.status[slow] == "timeout"
    assert result.preds[slow] == "[TIMEOUT]" and result.scores[slow] == -1.0
    assert result.metrics["reward/timeouts"] == 1
    assert result.metrics["reward/worker_restarts"] == 1
    assert elapsed < PER_FAILURE_BUDGET_S + 3.0
    # The pool is whole again and still grades correctly.
    assert len(pool._workers) == 2
    again = pool.grade(["Answer: 3"] * 8, ["3"] * 8, ["math_dapo"] * 4 + ["math500"] * 4)
    assert again.acc == [True] * 8 and again.status == ["ok"] * 8


def test_custom_function_failures_are_isolated(custom_pool: RewardPool) -> None:
    responses = ["a", "hang", "b", "die", "raise", "exit", "nan", "c", "spin", "d"]
    gts = ["a", "x", "x", "x", "x", "x", "x", "c", "x", "d"]
    start = time.monotonic()
    result = custom_pool.grade(responses, gts, ["anything"] * len(responses))
    elapsed = time.monotonic() - start
    _assert_complete(result, len(responses))
    assert result.status == [
        "ok", "timeout", "ok", "error", "error", "error", "error", "ok", "timeout", "ok"
    ]  # fmt: skip
    assert result.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # binary format
    assert result.acc == [True, False, False, False, False, False, False, True, False, True]
    assert "exit code 7" in result.errors[3]
    assert "ValueError: boom" in result.errors[4]
    assert "SystemExit" in result.errors[5]
    assert "non-finite" in result.errors[6]
    assert result.metrics["reward/timeouts"] == 2
    assert result.metrics["reward/errors"] == 4
    assert elapsed < 3 * PER_FAILURE_BUDGET_S
    after = custom_pool.grade(["a", "b"], ["a", "a"], ["s", "s"])
    assert after.scores == [1.0, 0.0] and after.status == ["ok", "ok"]
    assert len(custom_pool._workers) == 2


def test_custom_function_gets_data_source_and_extra_info(custom_pool: RewardPool) -> None:
    result = custom_pool.grade(["echo"], ["1"], ["src"], extra_infos=[{"index": 3}])
    assert result.preds == ["src|{'index': 3}"]
    assert result.scores == [0.5] and result.acc == [True]


def test_timeout_kills_the_graders_children(custom_pool: RewardPool, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    result = custom_pool.grade(["child-hang"], ["1"], ["s"], extra_infos=[{"pid_file": pid_file}])
    assert result.status == ["timeout"]
    child_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # killed with the worker's process group; init reaps it
    status = Path(f"/proc/{child_pid}/stat")
    assert not status.exists() or status.read_text().split(") ")[1].startswith("Z")


def test_overlong_shaping_keeps_acc() -> None:
    cfg = RewardConfig(
        routes={},
        default_grader="dapo",
        num_workers=1,
        overlong_buffer_enable=True,
        max_response_length=100,
        overlong_buffer_len=20,
        overlong_penalty_factor=1.0,
    )
    with RewardPool(cfg) as pool:
        result = pool.grade(
            ["Answer: 1", "Answer: 1", "Answer: 2"], ["1"] * 3, ["x"] * 3, [10, 90, 100]
        )
        assert result.acc == [True, True, False]
        assert result.overlong_penalties == pytest.approx([0.0, -0.5, -1.0])
        assert result.scores == pytest.approx([1.0, 0.5, -2.0])
        assert result.metrics["reward/overlong_frac"] == pytest.approx(2 / 3)
        with pytest.raises(ValueError, match="response_lengths"):
            pool.grade(["Answer: 1"], ["1"], ["x"])


def test_worker_start_up_failure_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "fragile.py"
    path.write_text(
        "import sys\n"
        "if sys.argv[0].endswith('_worker.py'):\n"
        "    raise ImportError('missing dependency inside the worker')\n"
        "def score(response, ground_truth):\n    return 1.0\n"
    )
    pool = RewardPool(RewardConfig(custom_function=f"{path}:score", num_workers=1))
    with pool, pytest.raises(RuntimeError, match="missing dependency inside the worker"):
        pool.grade(["a"], ["a"], ["s"])


def test_bad_input_and_lifecycle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.py"):
        RewardPool(RewardConfig(custom_function=f"{tmp_path}/missing.py:f"))
    pool = RewardPool(RewardConfig(routes={}, default_grader="dapo", num_workers=1))
    with pytest.raises(ValueError, match="ground_truths has 1 items but responses has 2"):
        pool.grade(["a", "b"], ["1"], ["x", "x"])
    with pytest.raises(ValueError, match=r"responses\[1\] is bytes"):
        pool.grade(["a", b"b"], ["1", "1"], ["x", "x"])
    with pytest.raises(ValueError, match=r"ground_truths\[0\] is None"):
        pool.grade(["a"], [None], ["x"])
    with pytest.raises(ValueError, match=r"ground_truths\[1\] is a list.*custom_function"):
        pool.grade(["a", "b"], ["1", ["1", "2"]], ["x", "x"])
    empty = pool.grade([], [], [])
    assert empty.scores == [] and empty.metrics["reward/timeouts"] == 0
    procs = [w.proc for w in pool._workers]
    pool.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.grade(["a"], ["1"], ["x"])


def test_dapo_boxed_fallback_reaches_the_graders() -> None:
    responses = ["the answer is \\boxed{7}", "Answer: 7", "\\boxed{8}"]
    kwargs = {"timeout_s": TIMEOUT_S, "num_workers": 1}
    with RewardPool(RewardConfig(**kwargs)) as published:
        off = published.grade(responses, ["7"] * 3, ["math_dapo"] * 3)
    with RewardPool(RewardConfig(dapo_boxed_fallback=True, **kwargs)) as later:
        on = later.grade(responses, ["7"] * 3, ["math_dapo"] * 3)
    assert off.acc == [False, True, False] and off.preds[0] == dapo.INVALID_PRED
    assert on.acc == [True, True, False] and on.preds == ["7", "7", "8"]


def _pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux smaps_rollup")
def test_workers_warm_up_only_the_graders_the_data_needs():
    """A run whose data all goes to the DAPO rule does not pay for math-verify's sympy in
    its grader processes (~40 MiB each); a grader it did not expect still works."""
    cfg = RewardConfig(num_workers=1)  # default routes: math-verify is among the used graders
    assert "math_verify" in cfg.used_graders
    with RewardPool(cfg) as everything, RewardPool(cfg, graders={"dapo"}) as rule_only:
        everything.wait_ready()
        rule_only.wait_ready()
        assert rule_only.expected_graders == {"dapo"}
        full, lean = (_pss_mib(p.worker_pids[0]) for p in (everything, rule_only))
        assert full - lean > 20, (full, lean)
        result = rule_only.grade(["\\boxed{\\frac{1}{2}}", "Answer: 4"], ["0.5", "4"],
                                 ["math500", "math_dapo"])  # math-verify loads on first use
        assert result.status == ["ok", "ok"] and result.acc == [True, True]
