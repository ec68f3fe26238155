"""Symbolic grader built on Hugging Face's ``math-verify`` (MATH-style ``\\boxed{}`` answers).

The final answer is whichever comes last in the response: the last ``\\boxed{...}`` (or
``\\fbox{...}``) or the last ``Answer:`` line. It is parsed in math mode (``$...$``) unless it
already has ``$`` or ``\\[`` or contains English words. A lead-in ("The answer is") and trailing
words and ``\\text{...}`` groups (units: "3\\sqrt{13} meters", "of the pie") are dropped and the
rest parsed in math mode, as is an answer without words (less one sentence-ending period, which
math mode reads as the end of the expression: ``4\\sqrt{2}.`` is not 4); only answers that are
still wordy fall back to plain-text extraction, which skips words but often keeps just a leading
piece (``3`` of ``3\\sqrt{13}``). The ground truth is parsed as LaTeX (wrapped in ``\\boxed{}``
unless it already carries ``$`` or ``\\boxed``), then compared with ``math_verify.verify``. An
escaped ``\\$`` is currency, not a math delimiter. math-verify's own timeouts use
``signal.alarm``, which only works on the main thread, so they are disabled here:
:class:`~fipo_trainer.rewards.pool.RewardPool` enforces time limits by killing the worker.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .config import SCORE_FORMATS
from .dapo import ANSWER_PATTERN, INVALID_PRED

__all__ = ["compute_score", "extract_final_answer"]

_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())
_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_BRACES = re.compile(r"[{}]")
# Real answers never nest this deep; sympy's parser takes minutes on such input.
_MAX_BRACE_DEPTH = 64
_MAX_PRED_CHARS = 1000
# An English word (not a \command, not a one/two-letter variable): "5 dollars", "The answer is 7".
_WORD = re.compile(r"(?<![\\A-Za-z])(?!and\b)[A-Za-z]{3,}")
# A "$" that opens or closes math; "\\$" is a literal dollar sign ("\\$18.90").
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")
# Math delimiters in an answer: "$" and "\\[" (wrapped in "$...$", "\\[...\\]" does not parse).
_MATH_DELIM = re.compile(r"(?<!\\)(?:\$|\\\[)")
# Trailing unit words / text groups: "3\\sqrt{13} square meters", "\\frac{1}{4}\\pi \\text{ units}".
# Words of 2+ letters and groups holding 2+ letters, so "2\\mathrm{e}" or a variable x is kept.
_SPACING = r"(?:\\[,;:! ]|\\q?quad\b|[\s.,;:!~])*"
_TAIL = re.compile(
    _SPACING + r"(?:(?:\\(?:text(?:rm|bf|it)?|mbox|mathrm)\s*\{(?=[^{}]*[A-Za-z]{2})[^{}]*\}"
    r"|(?<![\\A-Za-z])[A-Za-z]{2,}(?:-[A-Za-z]+)*\b)" + _SPACING + r")+$"
)
# Only the end of the answer is searched for the tail: an end-anchored search is quadratic.
_MAX_TAIL_CHARS = 256
# A lead-in of prose words before the math: "The answer is", "Thus, we get:". Function names
# ("log 8") are math, and a word followed by an operator ("abc + 1") is a variable, not prose.
_LEAD = re.compile(
    r"(?:(?!(?:arc)?(?:(?:sin|cos|tan|cot|sec|csc)h?|log|ln|exp|max|min|gcd|lcm|det)\b)"
    r"[A-Za-z]{2,}(?:['-][A-Za-z]+)*[\s.,;:!?]+)+(?!\s*(?:[+*/^_=<>|]|-\s))"
)
# Only the start of the answer is searched for the lead-in: a long run of separators makes the
# lookahead's backtracking quadratic.
_MAX_LEAD_CHARS = 256
# Prose left in the core of an answer that has an English word ("The value of x is 3"): a word
# after a space ("x is 3", "6 cm^2") or a label ("C: 5"). Such an answer goes to plain-text
# extraction, which reads it better than math mode ("x*i*s*3"). One without a 3+-letter word
# ("x is 3" alone) is math mode's, as it always was.
_PROSE_LEFT = re.compile(r"\s[A-Za-z]{2,}(?![A-Za-z])|[A-Za-z]\s*:")
# One sentence-ending period ("4\\sqrt{2}." reads as 4 in math mode); "1, 2, ..." keeps its dots.
_FULL_STOP = re.compile(r"(?<!\.)\.\s*$")


class _DropTimeoutDisabledWarning(logging.Filter):
    # We disable math-verify's signal timeouts on purpose; its warning about that is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start index, content) of the last balanced \\boxed{...} / \\fbox{...}, or None."""
    start, opener = max((text.rfind(o), o) for o in _BOX_OPENERS)
    if start < 0:
        return None
    depth = 0
    for match in _BRACES.finditer(text, start + len(opener) - 1):
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return start, text[start + len(opener) : match.start()]
    return None  # unbalanced: the model was cut off inside the box


def extract_final_answer(response: str) -> str | None:
    """Text of the final answer (box content or "Answer:" line), whichever is later; or None."""
    boxed = _last_boxed(response)
    answer = None
    for answer in ANSWER_PATTERN.finditer(response):  # noqa: B007 - keep the last match
        pass
    if answer is not None and (boxed is None or answer.start() > boxed[0]):
        return answer.group(1).strip()
    return None if boxed is None else boxed[1].strip()


@lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str) -> tuple:
    # n responses per prompt share one ground truth: parse it once.
    text = (
        ground_truth
        if (_MATH_DOLLAR.search(ground_truth) or "\\boxed" in ground_truth)
        else ("\\boxed{" + ground_truth + "}")
    )
    return tuple(parse(text, _EXTRACTION, parsing_timeout=None))


def _too_deep(text: str) -> bool:
    depth = 0
    for match in _BRACES.finditer(text):
        depth += 1 if match.group() == "{" else -1
        if depth > _MAX_BRACE_DEPTH:
            return True
    return False


def _math_core(answer: str) -> str | None:
    """The math between a prose lead-in and trailing words, if that is word-free; else None.

    Plain-text extraction skips words but keeps only a leading piece ("The answer is 3\\sqrt{13}
    meters" gives 3, right against a ground truth of 3): without the words the math parses whole.
    """
    lead = _LEAD.match(answer, 0, _MAX_LEAD_CHARS)
    body = answer[lead.end() :] if lead else answer
    tail = _TAIL.search(body, max(0, len(body) - _MAX_TAIL_CHARS))
    core = (body[: tail.start()] if tail else body).strip()
    if not core or _WORD.search(core) or _PROSE_LEFT.search(core):
        return None
    return core


def _parse_math(text: str) -> list:
    """Parse ``text`` in math mode (``$...$``), less a sentence-ending period."""
    return parse("$" + _FULL_STOP.sub("", text) + "$", _EXTRACTION, parsing_timeout=None)


def _parse_answer(answer: str) -> list:
    """Parse the extracted answer: math mode unless it carries math delimiters or prose."""
    if _MATH_DELIM.search(answer):
        return parse(answer, _EXTRACTION, parsing_timeout=None)
    if _WORD.search(answer):
        core = _math_core(answer)
        parsed = _parse_math(core) if core is not None else []
        if parsed:
            return parsed
        parsed = parse(answer, _EXTRACTION, parsing_timeout=None)  # skips words: "Monday", "x or y"
        if parsed:
            return parsed
    return _parse_math(answer)


def compute_score(response: str, ground_truth: str, *, score_format: str = "pm1") -> dict:
    """Grade one response with math-verify.

    Returns ``{"score", "acc", "pred"}``; score is +1/-1 (``score_format="pm1"``) or 1/0
    (``"binary"``); ``pred`` is the parsed answer in sympy's form (``\\frac{1}{2}``, ``1/2`` and
    ``0.5`` are all ``1/2``, so cons@k votes by value, as DAPO's normalised ``pred`` does), else
    the extracted text (first 1000 characters), ``"[INVALID]"`` when there is none. Answers
    nesting braces more than 64 deep are wrong without parsing.
    """
    if score_format not in SCORE_FORMATS:
        raise ValueError(f"score_format={score_format!r}; use one of {list(SCORE_FORMATS)}")
    right, wrong = SCORE_FORMATS[score_format]
    answer = extract_final_answer(response)
    if not answer:
        return {"score": wrong, "acc": False, "pred": INVALID_PRED}
    pred = answer[:_MAX_PRED_CHARS]
    if _too_deep(answer):
        return {"score": wrong, "acc": False, "pred": pred}
    parsed = _parse_answer(answer)
    gold = _parse_gold(str(ground_truth))
    correct = bool(parsed) and bool(gold) and verify(list(gold), parsed, timeout_seconds=None)
    if parsed:
        pred = str(parsed[0])[:_MAX_PRED_CHARS]
    return {"score": right if correct else wrong, "acc": correct, "pred": pred}
