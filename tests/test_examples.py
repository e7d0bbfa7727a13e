"""Every example in examples/ runs, exits 0 and says what it did; the README and CI agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Scripts in examples/, and the pipe script of each multi-file example (examples/<name>/pipe.py).
EXAMPLES = sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "examples").glob("*/pipe.py"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_example_runs(path: Path, no_leaks: None) -> None:
    assert path.read_text().lstrip().startswith('"""'), "every example starts with a docstring"
    args = [sys.executable, str(path)]
    if path.name == "queue_demo.py":
        args += ["--frames", "300"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip(), "an example prints what it did"


def test_every_example_is_tested() -> None:
    names = {str(p.relative_to(ROOT / "examples")) for p in EXAMPLES}
    assert names >= {"queue_demo.py", "zero_copy_frames.py", "async_queue.py",
                     "subprocess_attach.py", "inline.py", "plus_one/pipe.py", "demo.py",
                     "numpy_frames.py", "request_response.py", "fan_out.py"}


def _shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```shell\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmds = [b for b in _shell_blocks(readme) if "pytest" in b]
    assert len(test_cmds) == 1, "the README has one test command"
    assert test_cmds[0] in ci.splitlines()


def test_readme_demo_command_names_a_real_example() -> None:
    readme = (ROOT / "README.md").read_text()
    demo = [b for b in _shell_blocks(readme) if "examples/" in b]
    assert demo, "the README has a demo command"
    script = re.search(r"(examples/\S+\.py)", demo[0])
    assert script and (ROOT / script.group(1)).exists()
