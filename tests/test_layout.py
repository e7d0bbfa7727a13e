"""docs/layout.md against the compiled structures: every row, and no field left out."""

from __future__ import annotations

import re
from pathlib import Path

from upipe.segment import layout_offsets

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \|")


def _rows(name: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for line in (DOCS / name).read_text().splitlines()
            if (m := ROW.match(line))}


def test_layout_doc_matches_the_compiled_offsets() -> None:
    assert _rows("layout.md") == layout_offsets()  # every field, and nothing else


def test_design_doc_table_matches_the_compiled_offsets() -> None:
    rows = _rows("design.md")
    compiled = layout_offsets()
    assert len(rows) >= 20
    assert {k: compiled.get(k) for k in rows} == rows


def test_hot_fields_have_their_own_cache_lines() -> None:
    off = layout_offsets()
    blocks = ["upipe_ring.head", "upipe_ring.tail", "upipe_ring.not_empty", "upipe_ring.not_full",
              "upipe_ring.closed"]
    positions = [off[b] for b in blocks]
    assert all(p % 128 == 0 for p in positions)
    assert all(b - a >= 128 for a, b in zip(positions, positions[1:], strict=False))
