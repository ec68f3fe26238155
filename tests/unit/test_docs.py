"""docs/architecture.md stays true to the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

from fipo_trainer.data.schema import FIELDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `([a-z_]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [c.strip().strip("`") for c in match.group(2).split("|")]
    return rows


def test_batch_table_lists_every_declared_field_as_declared():
    rows = table_rows()
    assert set(rows) == set(FIELDS), (
        f"docs/architecture.md batch table vs data/schema.py: missing "
        f"{sorted(set(FIELDS) - set(rows))}, extra {sorted(set(rows) - set(FIELDS))}"
    )
    for name, field in FIELDS.items():
        kind, shape, dtype, producer, readers = rows[name][:5]
        assert (kind, shape, dtype, producer) == (
            field.kind,
            field.shape,
            field.dtype,
            field.producer,
        ), name
        assert [r.strip() for r in readers.split(",")] == list(field.readers), name


def test_modules_the_doc_names_exist():
    root = DOC.parents[1]
    named = set(
        re.findall(
            r"`((?:actor|rollout|cluster|trainer|data|rewards)/[a-z_/]+\.py)", DOC.read_text()
        )
    )
    missing = [m for m in named if not (root / "fipo_trainer" / m).exists()]
    assert named and not missing, f"docs/architecture.md names missing modules: {missing}"
