"""``timeline.png``: a few steps of a run's timeline (``trainer/timeline.py``), one lane per
worker and driver thread, each remote call or stage a bar coloured by what it does.

Why a window of steps, not the whole run: a step is a fraction of a second on the CPU
quickstart, so 250 of them on one axis are a smear; four steps from the middle of the run
show what overlaps and where a lane waits. Each lane's label says how busy it was there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fipo_trainer.fsutil import atomic_file
from fipo_trainer.trainer.timeline import DRIVER, STAGE_CATEGORY, TIMELINE_FILE, TIMELINE_PNG

TASK = "task::"  # Ray's category of a whole remote call: task::Class.method
STEPS_SHOWN = 4
# What a stage or remote method does, by the first keyword its name contains (in this order:
# update_weights is a weight sync, not an update).
GROUPS = (
    ("weight sync", ("weight", "sync")),
    ("generation", ("gen",)),
    ("old log-probs", ("log_prob",)),
    ("update", ("update", "adv")),
    ("grading", ("reward",)),
    ("validation", ("valid",)),
    ("checkpoint", ("save", "export", "checkpoint")),
    ("waiting for a batch", ("wait",)),
)
COLORS = {"generation": "tab:blue", "old log-probs": "tab:orange", "update": "tab:red",
          "weight sync": "tab:green", "grading": "tab:olive", "validation": "tab:purple",
          "checkpoint": "tab:brown", "waiting for a batch": "lightgray",
          "other": "tab:gray"}  # fmt: skip


def stage_group(name: str) -> str:
    """The group a stage or remote method belongs to (``other`` when none matches)."""
    lowered = name.lower()
    return next((g for g, words in GROUPS if any(w in lowered for w in words)), "other")


@dataclass
class Lane:
    """One worker (Ray's tid) or driver thread: spans (start s, end s, name) from the trace's
    first event."""

    label: str
    spans: list[tuple[float, float, str]] = field(default_factory=list)

    def busy(self, a: float, b: float) -> float:
        """Fraction of [a, b] covered by at least one span (driver stages nest)."""
        covered, reach = 0.0, a
        for s, e, _ in sorted(self.spans):
            s, e = max(s, reach), min(e, b)
            if e > s:
                covered, reach = covered + e - s, e
        return covered / (b - a) if b > a else 0.0


def load_lanes(events: list[dict[str, Any]]) -> list[Lane]:
    """Driver threads first, then workers by class and first call (``RolloutWorker 0``)."""
    calls = [e for e in events if e.get("ph") == "X" and "dur" in e and (
        e.get("cat") == STAGE_CATEGORY or str(e.get("cat", "")).startswith(TASK))]  # fmt: skip
    if not calls:
        raise ValueError("the timeline holds no remote calls or driver stages")
    t0 = min(float(e["ts"]) for e in calls)
    keyed: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    kind: dict[tuple[str, str], str] = {}
    for e in calls:
        driver = e.get("pid") == DRIVER and e.get("cat") == STAGE_CATEGORY
        key = (DRIVER if driver else "worker", str(e["tid"]))
        start = (float(e["ts"]) - t0) / 1e6
        keyed.setdefault(key, []).append((start, start + float(e["dur"]) / 1e6, str(e["name"])))
        if not driver:
            kind.setdefault(key, str(e["cat"])[len(TASK) :].split(".")[0])
    lanes, counts = [], {}
    order = sorted(keyed, key=lambda k: (k[0] != DRIVER, kind.get(k, ""), min(keyed[k])[0]))
    for key in order:
        if key[0] == DRIVER:
            label = "driver: loop" if key[1] == "MainThread" else f"driver: {key[1]}"
        else:
            cls = kind[key]
            label, counts[cls] = f"{cls} {counts.get(cls, 0)}", counts.get(cls, 0) + 1
        lanes.append(Lane(label, sorted(keyed[key])))
    return lanes


def update_ends(lanes: list[Lane]) -> list[float]:
    """When each of the driver's ``update`` stages ended: the steps' boundaries."""
    return sorted(e for lane in lanes if lane.label.startswith(DRIVER)
                  for _, e, name in lane.spans if name == "update")  # fmt: skip


def default_window(lanes: list[Lane], steps: int = STEPS_SHOWN) -> tuple[float, float]:
    """``steps`` whole steps from the middle of the run, from the end of one driver
    ``update`` stage to the end of the ``steps``-th after it; the nearest such window without
    a validation or checkpoint, when there is one (the whole trace when the run had too few
    steps)."""
    driver = [span for lane in lanes if lane.label.startswith(DRIVER) for span in lane.spans]
    updates = update_ends(lanes)
    if len(updates) <= steps:
        return min(s for lane in lanes for s, _, _ in lane.spans), max(
            e for lane in lanes for _, e, _ in lane.spans)  # fmt: skip
    pauses = [(s, e) for s, e, name in driver if stage_group(name) in ("validation", "checkpoint")]
    middle = len(updates) // 2 - steps // 2
    firsts = sorted(range(len(updates) - steps), key=lambda i: (abs(i - middle), i))
    quiet = (i for i in firsts if not any(
        s < updates[i + steps] and e > updates[i] for s, e in pauses))  # fmt: skip
    first = next(quiet, min(firsts, key=lambda i: abs(i - middle)))
    return updates[first], updates[first + steps]


def idle_by_role(lanes: list[Lane]) -> dict[str, float] | None:
    """``rollout_idle`` and ``actor_idle``: the share of the steady state (the first driver
    ``update``'s end to the last's) in which a role's worker ran no call, mean over the
    role's workers; None without two updates."""
    updates = update_ends(lanes)
    if len(updates) < 2:
        return None
    out = {}
    for key, cls in (("rollout_idle", "RolloutWorker"), ("actor_idle", "DeepSpeedActorWorker")):
        busy = [lane.busy(updates[0], updates[-1]) for lane in lanes
                if lane.label.rsplit(" ", 1)[0] == cls]  # fmt: skip
        if busy:
            out[key] = 1 - sum(busy) / len(busy)
    return out


def nesting(spans: list[tuple[float, float, str]]) -> list[int]:
    """How many other spans of the lane hold each one (driver stages nest: ``validate``
    holds its ``gen``); a nested bar is drawn thinner, on top."""
    return [sum(1 for j, (s2, e2, _) in enumerate(spans) if j != i and s2 <= s and e <= e2
                and (s2, e2) != (s, e)) for i, (s, e, _) in enumerate(spans)]  # fmt: skip


def parse_window(text: str) -> tuple[float, float]:
    """``A:B`` (seconds from the trace's first event) as (A, B)."""
    try:
        a, b = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--window wants START:END in seconds, e.g. 30:34; got {text!r}") from None
    if b <= a:
        raise ValueError(f"--window {text}: END must be after START")
    return a, b


def describe(lanes: list[Lane], window: tuple[float, float]) -> list[str]:
    """One line per lane: how busy it was in the window, and with what."""
    a, b = window
    lines = []
    for lane in lanes:
        by_group: dict[str, float] = {}
        shown = [span for span in lane.spans if span[1] > a and span[0] < b]
        for depth, (s, e, name) in zip(nesting(shown), shown):
            if depth == 0:  # a nested stage is part of the one holding it
                group = stage_group(name)
                by_group[group] = by_group.get(group, 0.0) + min(e, b) - max(s, a)
        parts = ", ".join(f"{g} {v / (b - a):.0%}" for g, v in
                          sorted(by_group.items(), key=lambda kv: -kv[1]))  # fmt: skip
        lines.append(f"{lane.label}: busy {lane.busy(a, b):.0%}" + (f" ({parts})" if parts else ""))
    return lines


def plot_timeline(trace: Path, out: Path, window: tuple[float, float] | None = None) -> Path:
    """Draw ``window`` (default: ``default_window``) of ``trace`` to ``out`` (PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lanes = load_lanes(json.loads(Path(trace).read_text()))
    a, b = window or default_window(lanes)
    fig = Figure(figsize=(12, 1.2 + 0.55 * len(lanes)))
    ax = fig.add_subplot()
    used = set()
    for row, lane in enumerate(reversed(lanes)):
        shown = [span for span in lane.spans if span[1] > a and span[0] < b]
        for depth, (s, e, name) in sorted(zip(nesting(shown), shown)):
            group, height = stage_group(name), 0.7 * 0.6**depth
            used.add(group)
            ax.broken_barh([(s, e - s)], (row - height / 2, height), color=COLORS[group])
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{lane.label}  ({lane.busy(a, b):.0%} busy)" for lane in reversed(lanes)])
    ax.set_xlim(a, b)
    ax.set_xlabel("seconds since the trace's first event")
    ax.set_title(f"{Path(trace).name}: {b - a:.2f} s from t = {a:.1f} s")
    legend = [Patch(color=COLORS[g], label=g) for g in COLORS if g in used]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(legend))
    fig.tight_layout()
    with atomic_file(out, "wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=110)
    return Path(out)


def main(path: Path, out: Path | None, window: str | None) -> int:
    """``fipo-plot --timeline RUN_DIR_or_TRACE [--window A:B] [-o out.png]``."""
    trace = path / TIMELINE_FILE if path.is_dir() else path
    if not trace.is_file():
        raise FileNotFoundError(
            f"{trace} does not exist: train with trainer.timeline_json_file=timeline.json "
            "(written when the run ends), or pass the trace file itself"
        )
    lanes = load_lanes(json.loads(trace.read_text()))
    span = parse_window(window) if window else default_window(lanes)
    print("\n".join(describe(lanes, span)))
    print(plot_timeline(trace, out or trace.with_name(TIMELINE_PNG), span))
    return 0
