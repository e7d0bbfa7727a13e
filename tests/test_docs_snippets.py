"""Every runnable snippet in the docs runs, in a fresh interpreter, and exits 0.

Convention: a fenced ```python block whose first line is exactly ``# runnable`` is a complete,
self-contained program. It is written to a temporary ``.py`` file (named after the doc and the
line of its fence) and run with ``sys.executable <file>`` from the repository root, in its own
session, with a timeout; it must exit 0 and leave no process behind. Running a file rather than
``python -c`` matters to pipes: a ``func=`` worker (and any ``spawn`` child) imports the
functions it runs from the main script, which must therefore be a file. Other ```python blocks
are illustrations and are not run.
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
SNIPPET_TIMEOUT = 30  # seconds; each snippet takes well under 3 s on an idle machine
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _blocks(rel: str) -> list[tuple[int, str]]:
    """(line number of the fence, code) of every ```python block in a doc."""
    text = (ROOT / rel).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _runnable(rel: str) -> list[tuple[int, str]]:
    return [(line, code) for line, code in _blocks(rel)
            if code.splitlines() and code.splitlines()[0].strip() == MARK]


def _file_name(rel: str, line: int) -> str:
    """docs/basics.md, line 42 -> basics_md_line42.py (what tracebacks will show)."""
    return re.sub(r"\W", "_", Path(rel).name) + f"_line{line}.py"


SNIPPETS = [pytest.param(_file_name(rel, line), code, id=f"{rel}:{line}")
            for rel in DOCS for line, code in _runnable(rel)]


def _session_members(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes still in the snippet's session.

    The session, not the process group: pipe workers move to process groups of their own (so
    that Ctrl-C in a terminal reaches only the pipe), but they stay in the session."""
    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _kill_session(sid: int) -> None:
    for p in _session_members(sid):
        try:
            p.kill()
        except psutil.Error:
            continue


@pytest.mark.parametrize("rel", DOCS)
def test_docs_have_runnable_snippets(rel: str) -> None:
    assert len(_runnable(rel)) >= 5, f"{rel} should keep its runnable snippets"


@pytest.mark.parametrize("rel", DOCS)
def test_runnable_marker_is_only_used_on_first_lines(rel: str) -> None:
    # A marker anywhere but the first line would silently not run: catch the typo.
    for line, code in _blocks(rel):
        assert MARK not in code.splitlines()[1:], f"{rel}:{line}: '{MARK}' must be the first line"


@pytest.mark.timeout(SNIPPET_TIMEOUT + 30)
@pytest.mark.parametrize(("name", "code"), SNIPPETS)
def test_snippet_runs(name: str, code: str) -> None:
    # Output goes to files, not pipes: a process the snippet left behind would hold a pipe open.
    with tempfile.TemporaryDirectory(prefix="upipe-snippet-") as tmp, \
            tempfile.TemporaryFile("w+") as out:
        script = Path(tmp) / name
        script.write_text(code)
        proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        try:
            proc.wait(timeout=SNIPPET_TIMEOUT)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _kill_session(proc.pid)
            proc.wait()
            timed_out = True
        # Whatever the snippet started must be gone too (its own session: sid = its pid).
        deadline = time.monotonic() + 5
        left = _session_members(proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _session_members(proc.pid)
        names = []
        for p in left:
            try:
                names.append(" ".join(p.cmdline()))
            except psutil.Error:
                continue
        if left:
            _kill_session(proc.pid)
        out.seek(0)
        output = out.read()
    assert not timed_out, f"snippet did not finish within {SNIPPET_TIMEOUT} s\n{output}"
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{output}"
    assert not left, f"snippet left processes behind: {names}\n{output}"
