"""fipo-plot --tokens: a token record file rendered as HTML (parsed here with html.parser,
no browser) and a PNG heat map; the per-position summary; the record file itself."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from fipo_trainer.data.batch import Batch
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.trainer.plot import main as plot_main
from fipo_trainer.trainer.token_plot import (
    HIGH,
    LOW,
    MISSING,
    plot_token_positions,
    position_means,
    render_tokens,
)
from fipo_trainer.trainer.token_record import (
    dump_token_records,
    read_token_records,
    token_record_path,
    token_record_steps,
    write_token_records,
)
from fipo_trainer.trainer.tracking import Tracker


def fipo_record(row: int, tokens: list[str], weights: list[float], **extra) -> dict:
    n = len(tokens)
    record = {
        "step": 4,
        "row": row,
        "uid": f"u{row}",
        "loss": "fipo",
        "mini_batch": 1,
        "score": 1.0,
        "acc": True,
        "advantage": 0.5,
        "response": "".join(tokens),
        "token_ids": list(range(n)),
        "tokens": tokens,
        "ratio": [1.0 + 0.01 * i for i in range(n)],
        "future_kl": [0.05 * (n - i) for i in range(n)],
        "influence_weight": weights,
        "clipped": [False] * n,
        "dual_clipped": [False] * n,
        "dropped": False,
    }
    record.update(extra)
    return record


RECORDS = [
    fipo_record(0, ["Answer", ":", " <4>", "\n"], [1.0, 1.2, 1.1, 1.0]),
    fipo_record(
        5,
        ["x", "y", "z"],
        [0.8, 1.0, 1.0],
        advantage=-0.5,
        dual_clipped=[True, False, True],
        clipped=[False, True, False],
        dropped=True,
    ),
]


class Spans(HTMLParser):
    """Every token span (class, style, title, data-value, text) and response div."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[dict] = []
        self.responses: list[dict] = []
        self._in_tok = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "span" and "tok" in classes:
            self.tokens.append({**a, "classes": classes, "text": ""})
            self._in_tok = True
        elif tag == "div" and "resp" in classes:
            self.responses.append({**a, "classes": classes})
        elif tag in ("script", "link", "img", "iframe"):
            raise AssertionError(f"the page must be self-contained, found <{tag}>")

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_tok = False

    def handle_data(self, data):
        if self._in_tok:
            self.tokens[-1]["text"] += data


def background(token: dict) -> str:
    (style,) = [s for s in token["style"].split(";") if s.startswith("background:")]
    return style.split(":", 1)[1]


def test_html_colours_tokens_by_weight_with_values_in_the_title(tmp_path):
    dump_token_records(tmp_path, 4, RECORDS)
    html_path, png_path = render_tokens(tmp_path)
    assert html_path == tmp_path / "rollouts" / "tokens_step_000004.html"
    parser = Spans()
    parser.feed(html_path.read_text(encoding="utf-8"))
    toks = parser.tokens
    assert [t["text"] for t in toks] == ["Answer", ":", " <4>", "↵\n", "x", "y", "z"]
    # white at weight 1, the scale's ends at the extremes (symmetric: 1 ± 0.2)
    assert [background(t) for t in toks] == [
        "#ffffff", HIGH, background(toks[2]), "#ffffff", LOW, "#ffffff", "#ffffff"
    ]
    assert background(toks[2]) not in ("#ffffff", HIGH, LOW, MISSING)
    assert [float(t["data-value"]) for t in toks] == [1.0, 1.2, 1.1, 1.0, 0.8, 1.0, 1.0]
    title = toks[1]["title"]
    assert "token 1: ':'" in title and "ratio 1.01" in title and "Future-KL 0.15" in title
    assert "influence weight 1.2" in title and "dual-clipped no" in title
    assert "response dropped yes" in toks[4]["title"] and "dual-clipped yes" in toks[4]["title"]
    assert [("dual" in t["classes"], "clip" in t["classes"]) for t in toks[4:]] == [
        (True, False),
        (False, True),
        (True, False),
    ]
    assert [r["id"] for r in parser.responses] == ["row-0", "row-5"]
    assert ["dropped" in r["classes"] for r in parser.responses] == [False, True]
    check_png(png_path, min_height=300)


def check_png(path, min_height: int) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] >= min_height
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # a drawing, not a blank canvas


def test_vanilla_records_colour_by_ratio_and_draw_what_exists(tmp_path):
    rec = fipo_record(1, ["a", "b"], [1.0, 1.0], loss="vanilla", ratio=[1.0, 1.5])
    rec.update(future_kl=None, influence_weight=None, dropped=None)
    dump_token_records(tmp_path, 2, [rec])
    html_path, png_path = render_tokens(tmp_path, step=2, out_html=tmp_path / "out" / "t.html")
    assert png_path == tmp_path / "out" / "t.png"
    text = html_path.read_text(encoding="utf-8")
    assert "ratio (the loss records no influence weights)" in text
    parser = Spans()
    parser.feed(text)
    assert [background(t) for t in parser.tokens] == ["#ffffff", HIGH]
    assert "Future-KL n/a" in parser.tokens[0]["title"]
    assert "response dropped n/a" in parser.tokens[0]["title"]
    check_png(png_path, min_height=100)


def test_position_summary_by_distance_from_the_end(tmp_path):
    x, y = position_means(RECORDS, "influence_weight")
    # distance 0: last tokens 1.0 and 1.0; 1: 1.1 and 1.0; 2: 1.2 and 0.8; 3: 1.0
    assert x == [0, 1, 2, 3] and y == pytest.approx([1.0, 1.05, 1.0, 1.0])
    assert position_means([{**RECORDS[0], "future_kl": None}], "future_kl") == ([], [])
    assert plot_token_positions(tmp_path) is None  # no records, no picture
    dump_token_records(tmp_path, 4, RECORDS)
    dump_token_records(tmp_path, 8, RECORDS[:1])
    out = plot_token_positions(tmp_path)
    assert out == tmp_path / "tokens_by_position.png"
    check_png(out, min_height=400)


def test_fipo_plot_tokens_cli_and_curves_with_the_position_panel(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot_main(["--tokens", str(tmp_path)])
    assert "no token records" in capsys.readouterr().err
    dump_token_records(tmp_path, 3, RECORDS)
    dump_token_records(tmp_path, 6, RECORDS[:1])
    assert token_record_steps(tmp_path) == [3, 6]
    assert plot_main(["--tokens", str(tmp_path)]) == 0  # the latest step
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "rollouts" / f"tokens_step_000006.{ext}") for ext in ("html", "png")
    ]
    assert plot_main(["--tokens", str(tmp_path), "--step", "3"]) == 0
    assert (tmp_path / "rollouts" / "tokens_step_000003.png").is_file()
    with pytest.raises(SystemExit):
        plot_main(["--tokens", str(tmp_path), "--step", "5"])
    assert "steps with token records: [3, 6]" in capsys.readouterr().err
    with Tracker(["jsonl"], tmp_path, "p", "e", {}, 2) as t:
        t.log({"reward/score_mean": 0.1}, step=1)
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "tokens_by_position.png").is_file()


def test_record_file_from_a_batch_decodes_each_token(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model())
    ids = [tok.encode("12")[:2], tok.encode("a\nb")[:3]]
    width = 4
    responses = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width)
    for i, row in enumerate(ids):
        responses[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    batch = Batch(
        {"responses": responses, "response_mask": mask, "advantages": torch.full((2, width), -0.5)},
        {"uid": ["p", "q"], "score": [1.0, -1.0], "acc": [True, False], "response_text": ["x", "y"]},
    )
    values = {
        1: {"mini_batch": 2, "ratio": [1.0, 0.1 + 0.2, 2.0][: len(ids[1])],
            "future_kl": None, "influence_weight": None,
            "clipped": [False, True, False][: len(ids[1])],
            "dual_clipped": [False] * len(ids[1]), "dropped": None},
    }
    path = write_token_records(tmp_path, 7, batch, values, tok, "vanilla")
    assert path == token_record_path(tmp_path, 7) and path.name == "tokens_step_000007.jsonl"
    step, (rec,) = read_token_records(tmp_path)
    assert step == 7 and rec["row"] == 1 and rec["uid"] == "q" and rec["acc"] is False
    assert rec["tokens"] == [tok.decode([t]) for t in ids[1]] and rec["token_ids"] == ids[1]
    assert rec["ratio"][1] == 0.3  # 7 significant digits: 0.30000000000000004 -> 0.3
    assert rec["advantage"] == -0.5 and rec["mini_batch"] == 2 and rec["future_kl"] is None
    assert json.loads(path.read_text().splitlines()[0])["loss"] == "vanilla"
    values[1]["ratio"] = [1.0]
    with pytest.raises(ValueError, match="1 recorded ratio values for"):
        write_token_records(tmp_path, 7, batch, values, tok)


def test_fipo_plot_tokens_out_is_the_html_page_and_never_a_directory(tmp_path, capsys):
    dump_token_records(tmp_path, 3, RECORDS)
    (tmp_path / "outdir").mkdir()
    with pytest.raises(SystemExit) as exc:
        plot_main(["--tokens", str(tmp_path), "-o", str(tmp_path / "outdir")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "-o/--out" in err and "is a directory" in err
    assert plot_main(["--tokens", str(tmp_path), "-o", str(tmp_path / "page.html")]) == 0
    assert (tmp_path / "page.html").is_file() and (tmp_path / "page.png").is_file()
