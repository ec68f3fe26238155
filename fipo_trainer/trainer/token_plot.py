"""FIPO token by token: token records rendered as HTML and PNG (``fipo-plot --tokens``).

Why: the influence weights act inside a response — where Future-KL builds up, which
tokens are dual-clipped, which responses FIPO drops — and only the tokens themselves show
it. ``render_tokens`` turns one step's ``rollouts/tokens_step_N.jsonl``
(``trainer/token_record.py``) into a self-contained HTML page (each token coloured by its
influence weight, the values in its hover title; no script, nothing fetched) and a PNG
heat map (responses x positions). ``plot_token_positions`` draws, over every recorded
step, mean Future-KL, influence weight and ratio by distance from the end of the response
(``tokens_by_position.png`` beside ``curves.png``). Matplotlib through ``Figure`` only.
Under DAPO's vanilla loss there are no weights: tokens are coloured by their ratio.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fipo_trainer.trainer.token_record import read_token_records, token_record_steps

__all__ = ["colour_field", "main", "plot_token_positions", "position_means", "render_tokens"]

POSITIONS_PNG = "tokens_by_position.png"
MISSING = "#eeeeee"  # past a response's end, and values a loss did not record
LOW, HIGH = "#3b4cc0", "#b40426"  # the colour scale's ends (white in the middle)
CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.legend span { display: inline-block; width: 1.2em; height: 1em; }
.resp { border: 1px solid #ccc; border-radius: 4px; margin: 1em 0; padding: .5em; }
.resp.dropped { border-color: #b00; background: #fff5f5; }
.head { font-size: .85em; color: #555; margin-bottom: .4em; }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.7; }
.tok { border-radius: 2px; }
.tok.dual { outline: 2px solid #000; }
.tok.clip { text-decoration: underline dotted; }
.resp.dropped .tok { text-decoration: line-through; }
"""


def colour_field(records: Sequence[dict[str, Any]]) -> str:
    """``influence_weight`` when the records have it (FIPO), else ``ratio``."""
    has = any(r.get("influence_weight") is not None for r in records)
    return "influence_weight" if has else "ratio"


def _finite(values: Any) -> list[float]:
    return [float(v) for v in values or () if v is not None and math.isfinite(v)]


def _spread(records: Sequence[dict[str, Any]], field: str, centre: float) -> float:
    """Largest |value - centre| over the records (the colour scale is symmetric)."""
    spread = max((abs(v - centre) for r in records for v in _finite(r.get(field))), default=0.0)
    return max(spread, 1e-6)


def _colormap() -> Any:
    """Blue (below 1, or below 0 for Future-KL) - white (the centre) - red (above)."""
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("fipo_tokens", [LOW, "#ffffff", HIGH], N=257)
    return cmap.with_extremes(bad=MISSING)


def _hex(cmap: Any, norm: Any, value: float | None) -> str:
    from matplotlib.colors import to_hex

    if value is None or not math.isfinite(value):
        return MISSING
    return to_hex(cmap(norm(value)))


def _fmt(values: Any, i: int) -> str:
    if values is None or values[i] is None:
        return "n/a"
    return f"{values[i]:.4g}" if isinstance(values[i], float) else str(values[i])


def _yes(values: Any, i: int) -> str:
    return "n/a" if values is None else ("yes" if values[i] else "no")


def _token_title(record: dict[str, Any], i: int) -> str:
    dropped = record.get("dropped")
    return (
        f"token {i}: {record['tokens'][i]!r}\n"
        f"ratio {_fmt(record.get('ratio'), i)}\n"
        f"Future-KL {_fmt(record.get('future_kl'), i)}\n"
        f"influence weight {_fmt(record.get('influence_weight'), i)}\n"
        f"clipped {_yes(record.get('clipped'), i)}\n"
        f"dual-clipped {_yes(record.get('dual_clipped'), i)}\n"
        f"response dropped {'n/a' if dropped is None else ('yes' if dropped else 'no')}"
    )


def _display(token: str) -> str:
    """Visible newlines and tabs; the text keeps its line breaks (pre-wrap)."""
    return html.escape(token.replace("\n", "↵\n").replace("\t", "⇥\t")) or "∅"


def _response_html(record: dict[str, Any], field: str, cmap: Any, norm: Any) -> str:
    values = record.get(field)
    clipped, dual = record.get("clipped"), record.get("dual_clipped")
    spans = []
    for i, token in enumerate(record["tokens"]):
        value = None if values is None else values[i]
        classes = ["tok"]
        if dual is not None and dual[i]:
            classes.append("dual")
        if clipped is not None and clipped[i]:
            classes.append("clip")
        spans.append(
            f'<span class="{" ".join(classes)}" style="background:{_hex(cmap, norm, value)}" '
            f'data-value="{"" if value is None else value}" '
            f'title="{html.escape(_token_title(record, i), quote=True)}">{_display(token)}</span>'
        )
    dropped = bool(record.get("dropped"))
    head = " · ".join(
        html.escape(part)
        for part in (
            f"row {record.get('row')}",
            f"uid {record.get('uid')}",
            f"score {record.get('score')}",
            f"acc {record.get('acc')}",
            f"advantage {_fmt([record.get('advantage')], 0)}",
            f"mini-batch {record.get('mini_batch')}",
            f"{len(record['tokens'])} tokens",
            *(["DROPPED (FIPO: more than one dual-clipped token)"] if dropped else []),
        )
    )
    return (
        f'<div class="resp{" dropped" if dropped else ""}" id="row-{record.get("row")}">'
        f'<div class="head">{head}</div><div class="text">{"".join(spans)}</div></div>'
    )


def _scale(records: Sequence[dict[str, Any]], field: str) -> tuple[Any, Any, float]:
    from matplotlib.colors import Normalize

    spread = _spread(records, field, 1.0)
    return _colormap(), Normalize(1.0 - spread, 1.0 + spread), spread


def tokens_html(records: Sequence[dict[str, Any]], title: str) -> str:
    """The self-contained page for one step's records."""
    field = colour_field(records)
    cmap, norm, spread = _scale(records, field)
    ramp = "".join(
        f'<span style="background:{_hex(cmap, norm, 1.0 - spread + 2 * spread * k / 10)}"></span>'
        for k in range(11)
    )
    label = "influence weight" if field == "influence_weight" else "ratio (the loss records no influence weights)"
    losses = sorted({str(r.get("loss") or "?") for r in records})
    legend = (
        f'<p class="legend">colour: {html.escape(label)} — {1 - spread:.4g} {ramp} '
        f"{1 + spread:.4g} (white = 1). Outlined: dual-clipped; dotted underline: "
        "PPO-clipped; struck through: response dropped. Hover a token for its values "
        f"(from the last mini-batch that saw it). Loss: {html.escape(', '.join(losses))}.</p>"
    )
    body = "\n".join(_response_html(r, field, cmap, norm) for r in records)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{legend}\n{body}\n</body></html>\n"
    )


def _matrix(records: Sequence[dict[str, Any]], field: str) -> Any:
    import numpy as np

    width = max((len(r["tokens"]) for r in records), default=0)
    out = np.full((len(records), max(width, 1)), np.nan)
    for i, r in enumerate(records):
        values = r.get(field)
        if values is not None:
            out[i, : len(values)] = [np.nan if v is None else v for v in values]
    return out


def _row_label(record: dict[str, Any]) -> str:
    adv = record.get("advantage")
    parts = [f"row {record.get('row')}", f"mb {record.get('mini_batch')}"]
    parts.append("A n/a" if adv is None else f"A {adv:+.2f}")
    return " · ".join(parts) + (" DROPPED" if record.get("dropped") else "")


def _heat_panel(fig: Any, ax: Any, records: Sequence[dict[str, Any]], field: str, label: str) -> None:
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    centre = 0.0 if field == "future_kl" else 1.0
    spread = _spread(records, field, centre)
    image = ax.imshow(
        _matrix(records, field),
        aspect="auto",
        interpolation="nearest",
        cmap=_colormap(),
        norm=Normalize(centre - spread, centre + spread),
    )
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label(label, fontsize=8)
    marks = [(t, i) for i, r in enumerate(records) for t, d in enumerate(r.get("dual_clipped") or ()) if d]
    if marks:
        ax.scatter(*zip(*marks), marker="x", s=14, color="black", linewidths=0.8, label="dual-clipped")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title(label, fontsize=10)
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels([_row_label(r) for r in records], fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position in the response (tokens)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def heat_map(records: Sequence[dict[str, Any]], out_png: Path, title: str) -> Path:
    """Responses x positions, one panel per recorded field (weight, Future-KL, ratio)."""
    from matplotlib.figure import Figure

    fields = [
        (name, label)
        for name, label in (
            ("influence_weight", "influence weight"),
            ("future_kl", "Future-KL"),
            ("ratio", "ratio"),
        )
        if any(r.get(name) is not None for r in records)
    ]
    if not fields:
        raise ValueError("the token records hold no per-token values to draw")
    panel_h = 1.2 + 0.3 * len(records)
    fig = Figure(figsize=(12, panel_h * len(fields) + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(len(fields), 1, squeeze=False)[:, 0]
    for ax, (name, label) in zip(axes, fields):
        _heat_panel(fig, ax, records, name, label)
    fig.suptitle(title, fontsize=12)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def render_tokens(
    run_dir: str | Path, step: int | None = None, out_html: str | Path | None = None
) -> tuple[Path, Path]:
    """HTML page + PNG heat map of ``step``'s token records (default: the latest step).

    Written beside the record (``rollouts/tokens_step_N.html`` / ``.png``) unless
    ``out_html`` names the page; the PNG then takes its name with ``.png``."""
    run_dir = Path(run_dir)
    step, records = read_token_records(run_dir, step)
    if not records:
        raise ValueError(f"the token record of step {step} under {run_dir} is empty")
    title = f"{run_dir.resolve().name} — step {step}: {len(records)} responses token by token"
    html_path = (
        Path(out_html) if out_html else run_dir / "rollouts" / f"tokens_step_{step:06d}.html"
    )
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(tokens_html(records, title), encoding="utf-8")
    return html_path, heat_map(records, html_path.with_suffix(".png"), title)


def position_means(
    records: Sequence[dict[str, Any]], field: str
) -> tuple[list[int], list[float]]:
    """(distance from the end, mean ``field`` there) over the records; 0 = the last token."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r in records:
        values = r.get(field)
        if values is None:
            continue
        n = len(values)
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                continue
            sums[n - 1 - i] = sums.get(n - 1 - i, 0.0) + float(v)
            counts[n - 1 - i] = counts.get(n - 1 - i, 0) + 1
    distances = sorted(sums)
    return distances, [sums[d] / counts[d] for d in distances]


def plot_token_positions(run_dir: str | Path, out_png: str | Path | None = None) -> Path | None:
    """Mean Future-KL, influence weight and ratio by distance from the end of the response,
    one line per recorded step; None (nothing written) when the run has no token records."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    steps = token_record_steps(run_dir)
    if not steps:
        return None
    per_step = {s: read_token_records(run_dir, s)[1] for s in steps}
    fig = Figure(figsize=(15, 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    colours = colormaps["viridis"]
    fields = (("future_kl", "Future-KL"), ("influence_weight", "influence weight"), ("ratio", "ratio"))
    for ax, (field, label) in zip(axes, fields):
        ax.set_title(f"mean {label} by distance from the end", fontsize=10)
        ax.set_xlabel("tokens before the response's end (0 = last)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        drawn = 0
        for k, (step, records) in enumerate(per_step.items()):
            x, y = position_means(records, field)
            if x:
                colour = colours(k / max(len(per_step) - 1, 1))
                ax.plot(x, y, "-", color=colour, linewidth=1, label=f"step {step}")
                drawn += 1
        if drawn:
            if drawn <= 10:
                ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, f"no data\n(the loss records no {label})", ha="center",
                    va="center", fontsize=8, color="gray", transform=ax.transAxes)
    fig.suptitle(f"{run_dir.resolve().name} — token records, steps {steps[0]}..{steps[-1]}", fontsize=12)
    out = Path(out_png) if out_png else run_dir / POSITIONS_PNG
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def main(run_dir: Path, step: int | None = None, out: Path | None = None) -> int:
    """``fipo-plot --tokens RUN_DIR [--step N] [-o page.html]``: print the two paths."""
    for path in render_tokens(run_dir, step, out):
        print(path)
    return 0
