"""The uPipe README (the seed users copy from) runs as written, with `from upipe import ...`.

Its code blocks are read from the seed file itself and assembled, verbatim, into pipe scripts
and processor scripts (the blocks are fragments: each is placed in an ``async def main()``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

# CI checks the repository out with ../shared beside it, which holds the seed documents.
SEED = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_eef557d9cce10290.txt"


def seed_blocks() -> dict[str, str]:
    """The seed's python blocks, keyed by a word from each that tells them apart."""
    text = SEED.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    keyed: dict[str, str] = {}
    for b in blocks:
        for key, marker in (("pipe", "entry='./a.py'"), ("declare", "func=processor_a"),
                            ("chain", "Pipe('some-pipe')"), ("get", "get_sync()"),
                            ("emit", "emit_sync()"), ("terminate", "terminate()"),
                            ("start", "await pipe.start()\nawait pipe.wait")):
            if marker in b and key not in keyed:
                keyed[key] = b
                break
    return keyed


def program(body: str, prelude: str = "") -> str:
    return (
        "import asyncio\nfrom upipe import Processor, Pipe\n\n"
        + textwrap.dedent(prelude)
        + "\n\nasync def main():\n"
        + textwrap.indent(body, "    ")
        + "\n\nif __name__ == '__main__':\n    asyncio.run(main())\n"
    )


A_PY = program('proc = Processor("a")\nawait proc.join()\nawait proc.emit_sync(b"frame")\n')


def write_b(tmp: Path, blocks: dict[str, str]) -> None:
    # b: the seed's get block (it joins), then its emit block without the repeated join
    emit_lines = [ln for ln in blocks["emit"].splitlines()
                  if "Processor(" not in ln and "join()" not in ln]
    (tmp / "b.py").write_text(program(blocks["get"] + "\n".join(emit_lines) + "\n"))


def run_script(tmp: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp / "pipe_script.py").write_text(source)
    return subprocess.run([sys.executable, "pipe_script.py"], cwd=tmp, capture_output=True,
                          text=True, timeout=60)


def test_the_seed_has_the_blocks_we_run() -> None:
    assert set(seed_blocks()) == {"pipe", "declare", "chain", "get", "emit", "terminate",
                                  "start"}


def test_seed_pipe_with_entry_scripts(tmp_path: Path, no_leaks: None) -> None:
    blocks = seed_blocks()
    (tmp_path / "a.py").write_text(A_PY)
    write_b(tmp_path, blocks)
    out = run_script(tmp_path, program(blocks["pipe"], prelude="config = {'greeting': 'hi'}"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "Running"


def test_seed_declaration_with_an_inline_function(tmp_path: Path, no_leaks: None) -> None:
    blocks = seed_blocks()
    write_b(tmp_path, blocks)
    prelude = """
        async def processor_a(proc):
            await proc.emit_sync(b"from A")
    """
    body = blocks["declare"] + blocks["chain"] + blocks["start"]
    out = run_script(tmp_path, program(body, prelude=prelude))
    assert out.returncode == 0, out.stdout + out.stderr


def test_seed_terminate(tmp_path: Path, no_leaks: None) -> None:
    blocks = seed_blocks()
    (tmp_path / "a.py").write_text(A_PY)
    write_b(tmp_path, blocks)
    body = blocks["pipe"].replace("await pipe.wait_for_completion()\n", "") + blocks["terminate"]
    out = run_script(tmp_path, program(body, prelude="config = {}"))
    assert out.returncode == 0, out.stdout + out.stderr
