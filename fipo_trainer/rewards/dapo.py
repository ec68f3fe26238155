"""DAPO's rule-based math grader (the "math_dapo" rule of DAPO / verl).

Users compare accuracy numbers across frameworks, so this module reproduces the published
rule's verdict *and* its normalised prediction on every input:

1. keep the last 300 characters of the response;
2. take the last match of ``(?i)Answer\\s*:\\s*([^\\n]+)`` (``"[INVALID]"`` when none);
3. normalise prediction and ground truth with the Minerva rules (Lewkowycz et al., 2022):
   text after the last ``=``, fixed substitution / removal lists, ``$...$``, ``\\text{}``,
   ``\\textbf{}``, ``\\overline{}``, ``\\boxed{}`` unwrapping, ``\\frac`` / ``\\sqrt``
   shorthand, thousands commas in pure numbers;
4. exact string equality: score +1.0 if equal, -1.0 otherwise.

Optional (``boxed_fallback``, ``reward.dapo_boxed_fallback``; off in the paper recipes): the
rule of later verl releases, which — only when step 2 finds no "Answer:" line — takes the
content of the last balanced ``\\boxed{...}`` within the last 100 characters of the graded
tail and compares it *unnormalised* with the ground truth string (verl's strict-box check).
Without a ``\\boxed{}`` either, the published verdict stands.

Quirks of the published rule are kept on purpose (e.g. an "[INVALID]" prediction equals a
ground truth that normalises to "[INVALID]"; ``"a "`` and ``"an "`` are deleted anywhere).
Only no-op steps are skipped (a regex whose literal anchor is absent cannot match), which
keeps the rule fast without changing any result.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "ANSWER_PATTERN",
    "BOXED_TAIL_CHARS",
    "INVALID_PRED",
    "REMOVED_EXPRESSIONS",
    "SUBSTITUTIONS",
    "TAIL_CHARS",
    "compute_score",
    "extract_answer",
    "last_boxed_content",
    "normalize_final_answer",
]

#: Only this many trailing characters of a response are graded (as published).
TAIL_CHARS = 300
INVALID_PRED = "[INVALID]"
#: The boxed fallback looks at this many trailing characters of the graded tail.
BOXED_TAIL_CHARS = 100
_BOXED = "\\boxed{"
ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Minerva normalisation tables, applied in this order with str.replace.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
REMOVED_EXPRESSIONS: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)

# (literal that must be present for the pattern to match, pattern, replacement)
_MATH_DOLLARS = re.compile(r"(.*?)(\$)(.*?)(\$)(.*)")
_UNWRAP_RULES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("\\text{", re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),
    ("\\textbf{", re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),
    ("\\overline{", re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),
    ("\\boxed{", re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),
)
_FRAC_SHORTHAND = re.compile(r"(frac)([^{])(.)")
_SQRT_SHORTHAND = re.compile(r"(sqrt)([^{])")


def normalize_final_answer(final_answer: str) -> str:
    """Minerva normalisation of one answer string (identical output to the published one)."""
    text = final_answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        text = text.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        text = text.replace(expr, "")

    if text.count("$") >= 2:  # keep only the first $...$ span of each line
        text = _MATH_DOLLARS.sub(r"$\3$", text)
    for anchor, pattern, repl in _UNWRAP_RULES:
        if anchor in text:
            text = pattern.sub(repl, text)

    # \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}
    if "frac" in text:
        text = _FRAC_SHORTHAND.sub(r"frac{\2}{\3}", text)
    if "sqrt" in text:
        text = _SQRT_SHORTHAND.sub(r"sqrt{\2}", text)
    text = text.replace("$", "")

    if text.replace(",", "").isdigit():  # 100,000 -> 100000
        text = text.replace(",", "")
    return text.strip()


@lru_cache(maxsize=8192)
def _normalized_ground_truth(ground_truth: str) -> str:
    # Ground truths repeat n times per prompt (GRPO groups): cache their normalisation.
    return normalize_final_answer(ground_truth)


def extract_answer(response: str) -> str | None:
    """Raw text of the last "Answer:" line within the graded tail, or None."""
    matches = ANSWER_PATTERN.findall(response[-TAIL_CHARS:])
    return matches[-1] if matches else None


def last_boxed_content(text: str) -> str | None:
    """What the last ``\\boxed{`` in ``text`` encloses (braces balanced), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(_BOXED) - 1, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(_BOXED) : i]
    return None  # unbalanced: no boxed answer


def compute_score(response: str, ground_truth: str, *, boxed_fallback: bool = False) -> dict:
    """Grade one response with the DAPO rule (``boxed_fallback``: see the module docstring).

    Returns ``{"score": +1.0 | -1.0, "acc": bool, "pred": prediction}`` (the normalised
    "Answer:" text, or the raw boxed content when the fallback decided).
    """
    extracted = extract_answer(response)
    pred = normalize_final_answer(INVALID_PRED if extracted is None else extracted)
    correct = pred == _normalized_ground_truth(ground_truth)
    if boxed_fallback and pred == INVALID_PRED:
        boxed = last_boxed_content(response[-TAIL_CHARS:][-BOXED_TAIL_CHARS:])
        if boxed is not None:
            pred, correct = boxed, boxed == ground_truth
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
