"""DAPO rule: pinned verdicts and predictions of the published math_dapo rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fipo_trainer.rewards import dapo

# (response, ground truth, acc, pred). Expected values were checked against the published rule;
# quirks are kept on purpose (see comments): users compare numbers across frameworks.
PINNED = [
    ("Answer: 42", "42", True, "42"),
    ("answer: 42", "42", True, "42"),
    ("ANSWER :   42", "42", True, "42"),
    ("Answer: $42$", "42", True, "42"),
    ("Answer: \\boxed{42}", "42", True, "42"),
    ("Answer: $\\boxed{42}$", "42", True, "42"),
    # units and words
    ("Answer: 5 dollars", "5", True, "5"),
    ("Answer: 10 \\text{ cm}", "10", True, "10"),
    ("Answer: 12 students", "12", True, "12"),
    ("Answer: 30^\\circ", "30", True, "30"),
    ("Answer: 30^{\\circ}", "30", True, "30"),
    ("Answer: \\$5", "5", True, "5"),
    ("Answer: a 5", "5", True, "5"),
    # \text{} / \textbf{} / \overline{}
    ("Answer: \\text{(C)}", "C", False, "(C)"),
    ("Answer: \\textbf{7}", "7", True, "7"),
    ("Answer: \\overline{AB}", "AB", True, "AB"),
    ("Answer: 1 \\text{and} 2", "1,2", True, "12"),
    # thousands commas (pure digits only; "1,2" is a published quirk)
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: 1,000,000", "1000000", True, "1000000"),
    ("Answer: 1,2", "12", True, "12"),
    ("Answer: (1,2)", "(1,2)", True, "(1,2)"),
    # \frac / \sqrt shorthand; no numeric equivalence
    ("Answer: \\frac12", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("Answer: \\frac{1}{2}", "1/2", False, "\\frac{1}{2}"),
    ("Answer: \\sqrt2", "\\sqrt{2}", True, "\\sqrt{2}"),
    ("Answer: 3\\sqrt{2}", "3\\sqrt2", True, "3\\sqrt{2}"),
    ("Answer: 0.5", "\\frac{1}{2}", False, "0.5"),
    ("Answer: \\dfrac{3}{4}", "\\frac{3}{4}", False, "\\dfrac{3}{4}"),
    # text after the last "="
    ("Answer: x = 5", "5", True, "5"),
    ("Answer: 3 \\cdot 4 = 12", "12", True, "12"),
    # spacing, signs, trailing punctuation
    ("Answer:\n42", "42", True, "42"),  # \s* after the colon crosses the newline
    ("Answer: 42\r", "42", True, "42"),
    ("Answer: -3", "-3", True, "-3"),
    ("Answer: 2\\pi", "2\\pi", True, "2\\pi"),
    ("Answer: 5.", "5", False, "5."),
    ("Answer: $5.$", "5", True, "5"),
    ("Answer: 5", "$5$", True, "5"),
    # only a literal "Answer:" counts
    ("The answer is 42.", "42", False, "[INVALID]"),
    ("**Answer:** 42", "42", False, "**42"),
    ("Final Answer: The final answer is 9", "9", False, "Thefinalansweris9"),
    ("", "7", False, "[INVALID]"),
    # published quirk: a missing answer equals a ground truth that normalises to [INVALID]
    ("no answer line here", "[INVALID]", True, "[INVALID]"),
    # lone surrogates are just characters
    ("Answer: \ud800", "\ud800", True, "\ud800"),
]


@pytest.mark.parametrize(("response", "ground_truth", "acc", "pred"), PINNED)
def test_pinned(response: str, ground_truth: str, acc: bool, pred: str) -> None:
    out = dapo.compute_score(response, ground_truth)
    assert out == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}
    assert type(out["score"]) is float


def test_last_answer_line_wins() -> None:
    text = "Answer: 3\nWait, let me recheck.\nAnswer: 4"
    assert dapo.compute_score(text, "4")["acc"]
    assert dapo.compute_score(text, "3") == {"score": -1.0, "acc": False, "pred": "4"}


def test_only_last_300_characters_are_graded() -> None:
    head = "Answer: 7\n"  # 10 characters
    assert dapo.compute_score(head + "y" * 290, "7")["acc"]  # exactly 300: still visible
    assert dapo.compute_score(head + "y" * 291, "7")["pred"] == "[INVALID]"  # "A" cut off
    assert dapo.compute_score(head + "y" * 5000, "7")["pred"] == "[INVALID]"


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("$x$ and $y$", "x"),  # first $...$ span of the line
        ("\\text{m}^2", ""),  # "\text{m}" -> "\text{}", then "\text{}^2" is removed
        ("\\fracab", "\\frac{a}{b}"),
        ("\\fracabc", "\\frac{a}{b}c"),
        ("\\sqrtab", "\\sqrt{a}b"),
        ("100,000", "100000"),
        ("1,000.5", "1,000.5"),
        ("  7 ", "7"),
        ("x=y=3", "3"),
        ("5 \\mbox{ inches}", "5"),
        ("\\{1,2\\}", "\\{1,2\\}"),
    ],
)
def test_normalize_final_answer(raw: str, normalized: str) -> None:
    assert dapo.normalize_final_answer(raw) == normalized


def test_extract_answer() -> None:
    assert dapo.extract_answer("bla\nAnswer: $3$ \nmore") == "$3$ "
    assert dapo.extract_answer("nothing") is None


_TOKENS = [*"Answer: $\\{}=,.0123456789xa\n", "Answer:", "\\frac", "\\boxed{", "\\text{"]
_text = st.lists(st.sampled_from(_TOKENS), max_size=200).map("".join)


@settings(max_examples=300, deadline=None)
@given(prefix=_text, body=_text, gt=_text)
def test_prefix_beyond_300_chars_never_matters(prefix: str, body: str, gt: str) -> None:
    body = (body + "y" * 300)[-300:] if len(body) < 300 else body
    assert dapo.compute_score(prefix + body, gt) == dapo.compute_score(body, gt)


@settings(max_examples=300, deadline=None)
@given(response=st.text(max_size=500), gt=st.text(max_size=50))
def test_total_on_arbitrary_text(response: str, gt: str) -> None:
    out = dapo.compute_score(response, gt)
    assert out["score"] in (1.0, -1.0)
    assert out["acc"] == (out["pred"] == dapo.normalize_final_answer(gt))


# --------------------------------------------------------------------------- boxed fallback
# verl's later rule (reward.dapo_boxed_fallback): only without an "Answer:" line, the last
# balanced \boxed{} in the last 100 characters decides, compared unnormalised.


def test_boxed_fallback_is_off_by_default() -> None:
    out = dapo.compute_score("so the result is \\boxed{5}", "5")
    assert out == {"score": -1.0, "acc": False, "pred": dapo.INVALID_PRED}


def test_boxed_fallback_grades_the_last_boxed_answer() -> None:
    out = dapo.compute_score("first \\boxed{3}, finally \\boxed{5}", "5", boxed_fallback=True)
    assert out == {"score": 1.0, "acc": True, "pred": "5"}
    nested = dapo.compute_score("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", boxed_fallback=True)
    assert nested["acc"] and nested["pred"] == "\\frac{1}{2}"
    wrong = dapo.compute_score("\\boxed{4}", "5", boxed_fallback=True)
    assert wrong == {"score": -1.0, "acc": False, "pred": "4"}


def test_boxed_fallback_never_overrides_an_answer_line() -> None:
    out = dapo.compute_score("Answer: 4\nbut \\boxed{5}", "5", boxed_fallback=True)
    assert out == dapo.compute_score("Answer: 4\nbut \\boxed{5}", "5")
    assert out["pred"] == "4" and not out["acc"]


def test_boxed_fallback_compares_unnormalised_within_the_last_100_characters() -> None:
    # The strict-box check does not normalise: "$5$" is not "5" (the Answer rule would say yes).
    assert not dapo.compute_score("\\boxed{$5$}", "5", boxed_fallback=True)["acc"]
    assert dapo.compute_score("Answer: $5$", "5")["acc"]
    far = "\\boxed{5}" + "x" * 100  # the box starts more than 100 characters from the end
    assert dapo.compute_score(far, "5", boxed_fallback=True)["pred"] == dapo.INVALID_PRED
    unbalanced = dapo.compute_score("\\boxed{5", "5", boxed_fallback=True)
    assert unbalanced["pred"] == dapo.INVALID_PRED and not unbalanced["acc"]


def test_last_boxed_content() -> None:
    assert dapo.last_boxed_content("a \\boxed{1} b \\boxed{{2}+3} c") == "{2}+3"
    assert dapo.last_boxed_content("no box") is None
    assert dapo.last_boxed_content("\\boxed{open") is None


@settings(max_examples=300, deadline=None)
@given(response=_text, gt=_text)
def test_boxed_fallback_changes_only_invalid_predictions(response: str, gt: str) -> None:
    published = dapo.compute_score(response, gt)
    fallback = dapo.compute_score(response, gt, boxed_fallback=True)
    if published["pred"] != dapo.INVALID_PRED:
        assert fallback == published
    elif fallback != published:
        assert fallback["acc"] == (fallback["pred"] == gt)
