"""Every runnable snippet in the docs runs, in a fresh interpreter, and exits 0.

Convention: a fenced ```python block whose first line is exactly ``# runnable`` is a complete,
self-contained program. It is run with ``sys.executable -c <block>`` from the repository root,
in its own session, with a timeout; it must exit 0 and leave no process behind. Other
```python blocks are illustrations and are not run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("docs/basics.md", "docs/api.md")
MARK = "# runnable"
SNIPPET_TIMEOUT = 30  # seconds; each snippet takes well under 2 s on an idle machine
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _blocks(rel: str) -> list[tuple[int, str]]:
    """(line number of the fence, code) of every ```python block in a doc."""
    text = (ROOT / rel).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _runnable(rel: str) -> list[tuple[int, str]]:
    return [(line, code) for line, code in _blocks(rel)
            if code.splitlines() and code.splitlines()[0].strip() == MARK]


SNIPPETS = [pytest.param(code, id=f"{rel}:{line}") for rel in DOCS for line, code in _runnable(rel)]


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes still in the snippet's process group."""
    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


@pytest.mark.parametrize("rel", DOCS)
def test_docs_have_runnable_snippets(rel: str) -> None:
    assert len(_runnable(rel)) >= 5, f"{rel} should keep its runnable snippets"


@pytest.mark.parametrize("rel", DOCS)
def test_runnable_marker_is_only_used_on_first_lines(rel: str) -> None:
    # A marker anywhere but the first line would silently not run: catch the typo.
    for line, code in _blocks(rel):
        assert MARK not in code.splitlines()[1:], f"{rel}:{line}: '{MARK}' must be the first line"


@pytest.mark.timeout(SNIPPET_TIMEOUT + 30)
@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code: str) -> None:
    # Output goes to files, not pipes: a process the snippet left behind would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        try:
            proc.wait(timeout=SNIPPET_TIMEOUT)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        # Whatever the snippet started must be gone too (its own session: pgid = its pid).
        deadline = time.monotonic() + 5
        left = _group_members(proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _group_members(proc.pid)
        names = [" ".join(p.cmdline()) for p in left]
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        output = out.read()
    assert not timed_out, f"snippet did not finish within {SNIPPET_TIMEOUT} s\n{output}"
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{output}"
    assert not left, f"snippet left processes behind: {names}\n{output}"
