"""docs/layout.md against the compiled structures: every row, and no field left out."""

from __future__ import annotations

import re
from pathlib import Path

from upipe.segment import layout_offsets

DOC = Path(__file__).resolve().parent.parent / "docs" / "layout.md"
ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \|")


def test_layout_doc_matches_the_compiled_offsets() -> None:
    documented = {m.group(1): int(m.group(2)) for line in DOC.read_text().splitlines()
                  if (m := ROW.match(line))}
    compiled = layout_offsets()
    assert documented == compiled


def test_hot_fields_have_their_own_cache_lines() -> None:
    off = layout_offsets()
    blocks = ["upipe_ring.head", "upipe_ring.tail", "upipe_ring.not_empty", "upipe_ring.not_full",
              "upipe_ring.closed"]
    positions = [off[b] for b in blocks]
    assert all(p % 128 == 0 for p in positions)
    assert all(b - a >= 128 for a, b in zip(positions, positions[1:], strict=False))
