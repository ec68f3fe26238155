"""fipo-eval on AIME prints the paper's published avg/cons/pass@32 (FIPO_SPEC.md §4) beside
the evaluated model's, with both sampling settings; other data gets no such table."""

from __future__ import annotations

import io

from rich.console import Console

from fipo_trainer.trainer.eval_report import paper_comparison, print_paper_comparison
from fipo_trainer.trainer.published import PUBLISHED, benchmark_of


def fake_result(sources: dict[str, tuple[float, float, float]], k: int = 32) -> dict:
    return {
        "k": k,
        "sampling": {"temperature": 1.0, "top_p": 0.7, "top_k": -1, "max_tokens": 20480, "seed": 0},
        "results": {
            ds: {"num_prompts": 30, f"avg@{k}": a, f"cons@{k}": c, f"pass@{k}": p}
            for ds, (a, c, p) in sources.items()
        },
    }


def test_published_numbers_are_the_spec_table():
    by = {(p.method, p.model.split()[0], p.benchmark): (p.avg, p.cons, p.pass_) for p in PUBLISHED}
    assert by[("DAPO", "Qwen2.5-32B", "aime24")] == (50, 60, 80)
    assert by[("FIPO", "Qwen2.5-32B", "aime24")] == (56, 73, 83)
    assert by[("DAPO", "Qwen2.5-32B", "aime25")] == (38, 47, 63)
    assert by[("FIPO", "Qwen2.5-32B", "aime25")] == (43, 50, 67)
    assert by[("FIPO", "Qwen2.5-7B-Math", "aime24")] == (40, None, None)


def test_benchmark_names():
    for name in ("aime24", "aime-2024", "AIME_2024", "aime2024"):
        assert benchmark_of(name) == "aime24", name
    assert benchmark_of("aime25") == benchmark_of("aime-2025") == "aime25"
    assert benchmark_of("math500") is None and benchmark_of("arithmetic") is None
    assert benchmark_of("aime-2026") is None


def test_table_has_this_model_and_the_paper_rows_per_benchmark():
    result = fake_result({"aime24": (0.5333, 0.6667, 0.8), "aime25": (0.4, 0.5, 0.7), "math500": (0.9, 0.9, 0.9)})
    rows = paper_comparison(result)
    assert [r[0] for r in rows] == ["aime24"] * 6 + ["aime25"] * 6  # math500 has no paper row
    assert rows[0][:5] == ["aime24", "this model (aime24)", "53.3", "66.7", "80.0"]
    paper = {tuple(r[1:5]) for r in rows if r[0] == "aime24"}
    assert ("paper: DAPO, Qwen2.5-32B base", "50.0", "60.0", "80.0") in paper
    assert ("paper: FIPO, Qwen2.5-32B base (peak avg@32 58)", "56.0", "73.0", "83.0") in paper
    aime25 = {tuple(r[1:5]) for r in rows if r[0] == "aime25"}
    assert ("paper: FIPO, Qwen2.5-32B base", "43.0", "50.0", "67.0") in aime25
    assert ("paper: DAPO, Qwen2.5-32B base", "38.0", "47.0", "63.0") in aime25
    assert rows[0][5] == "k=32, T=1.0, top_p=0.7, max_tokens=20480"
    assert all(r[5] == "k=32, T=1.0, top_p=0.7, max_tokens=20480" for r in rows[1:6])


def test_printed_table_names_both_sampling_settings_and_warns_about_k():
    out = io.StringIO()
    result = fake_result({"aime24": (0.25, 0.3, 0.5)}, k=4)
    result["sampling"]["max_tokens"] = 1024
    print_paper_comparison(Console(file=out, width=250), result)
    text = out.getvalue()
    assert "this model vs the FIPO paper" in text
    assert "k=4, T=1.0, top_p=0.7, max_tokens=1024" in text  # ours
    assert "k=32, T=1.0, top_p=0.7, max_tokens=20480" in text  # the paper's
    assert "paper: FIPO, Qwen2.5-32B base" in text and "56.0" in text and "73.0" in text
    assert "not comparable with @32" in text
    silent = io.StringIO()
    print_paper_comparison(Console(file=silent), fake_result({"arithmetic": (0.5, 0.5, 0.5)}))
    assert silent.getvalue() == ""
