"""mean@k / maj@k / best@k / pass@j on hand-computed examples."""

from __future__ import annotations

import itertools

import pytest

from fipo_trainer.trainer.validation_metrics import (
    compute_validation_metrics,
    majority_vote,
    pass_at_j,
    validation_metrics,
)


def _records():
    rows = []

    def add(ds, uid, preds, acc):
        for p, a in zip(preds, acc):
            rows.append({"data_source": ds, "uid": uid, "pred": p, "acc": a, "score": 1.0 if a else -1.0})

    # p1: "1" and "2" tie 2-2; "1" is seen first and is correct.
    add("a", "p1", ["1", "2", "2", "1"], [True, False, False, True])
    # p2: "7" wins 3-1 and is wrong although one response is right.
    add("a", "p2", ["5", "7", "7", "7"], [True, False, False, False])
    # p3: nothing right; the invalid prediction votes too.
    add("b", "p3", ["x", "y", "x", "[INVALID]"], [False, False, False, False])
    return rows


def test_hand_example_per_source_and_overall():
    m = compute_validation_metrics(_records(), pass_ks=(1, 2, 4, 8))
    assert m["val/a/mean@4"] == pytest.approx(0.375)
    assert m["val/a/maj@4"] == pytest.approx(0.5)
    assert m["val/a/best@4"] == pytest.approx(1.0)
    assert m["val/b/mean@4"] == 0.0 and m["val/b/maj@4"] == 0.0 and m["val/b/best@4"] == 0.0
    assert m["val/mean@4"] == pytest.approx(0.25)
    assert m["val/maj@4"] == pytest.approx(1 / 3)
    assert m["val/best@4"] == pytest.approx(2 / 3)
    # pass@2: p1 1 - C(2,2)/C(4,2) = 5/6, p2 1 - C(3,2)/C(4,2) = 1/2
    assert m["val/a/pass@2"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert m["val/a/pass@1"] == pytest.approx(m["val/a/mean@4"])
    assert "val/a/pass@4" not in m and "val/a/pass@8" not in m  # = best@4 / not estimable
    assert m["val/a/score_mean"] == pytest.approx((0.0 - 0.5) / 2)
    assert m["val/a/num_prompts"] == 2.0 and m["val/num_prompts"] == 3.0


def test_tie_goes_to_first_seen_prediction():
    assert majority_vote(["2", "1", "1", "2"], [False, True, True, False]) == ("2", False)
    assert majority_vote(["1", "2", "2", "1"], [True, False, False, True]) == ("1", True)
    # whitespace does not split a vote
    assert majority_vote([" 3", "4", "3 "], [True, False, True]) == (" 3", True)


def test_responses_of_a_prompt_need_not_be_adjacent():
    rows = _records()
    shuffled = rows[::2] + rows[1::2]
    assert compute_validation_metrics(shuffled) == compute_validation_metrics(rows)


def test_columns_api_matches_records_api_and_scores_default_to_acc():
    rows = _records()
    cols = validation_metrics(
        [r["data_source"] for r in rows],
        [r["uid"] for r in rows],
        [r["acc"] for r in rows],
        [r["pred"] for r in rows],
        prefix="eval",
    )
    assert cols["eval/a/mean@4"] == pytest.approx(0.375)
    assert cols["eval/a/score_mean"] == pytest.approx(0.375)  # no scores: acc as 0/1


@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_pass_at_j_equals_enumeration(k):
    for c in range(k + 1):
        outcomes = [True] * c + [False] * (k - c)
        for j in range(1, k + 1):
            subsets = list(itertools.combinations(outcomes, j))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_j(k, c, j) == pytest.approx(expected)


def test_bad_input_is_refused_with_a_reason():
    rows = _records()
    with pytest.raises(ValueError, match="different numbers of responses"):
        compute_validation_metrics(rows[:-1])
    clash = [*rows, {**rows[0], "data_source": "b"}]
    with pytest.raises(ValueError, match="uids must be unique"):
        compute_validation_metrics(clash)
    with pytest.raises(ValueError, match="lacks"):
        compute_validation_metrics([{"uid": 1, "acc": True}])
    with pytest.raises(ValueError, match="has 1 entries"):
        validation_metrics(["a", "a"], [1, 1], [True], ["x", "x"])
    with pytest.raises(ValueError):
        pass_at_j(3, 1, 4)
    assert compute_validation_metrics([]) == {}
