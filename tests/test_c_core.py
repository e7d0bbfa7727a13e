"""C-level tests of the core in csrc/: warnings-clean compilation and the threaded stress test
(csrc/tests/stress.c) in three builds: plain -O2, ASan+UBSan and TSan (csrc/tests/run.sh).

run.sh exits 0 (pass), 1 (fail) or 77 (skip: e.g. the sanitizer runtime is missing); only 77
skips here, with the script's reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
RUN_SH = CSRC / "tests" / "run.sh"
CC = os.environ.get("CC", "gcc")
SKIP = 77

needs_cc = pytest.mark.skipif(shutil.which(CC) is None, reason=f"no C compiler ({CC})")


def _run(args: list[str], build: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UPIPE_TEST_BUILD=str(build))
    return subprocess.run(
        ["bash", str(RUN_SH), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def _skip_reason(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if "SKIP" in ln]
    return lines[-1] if lines else "run.sh exited 77"


@needs_cc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.c")))
def test_compiles_warning_free(source: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            CC,
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-c",
            str(CSRC / source),
            "-o",
            str(tmp_path / "out.o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "", _output(proc)


@needs_cc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", ["plain", "asan", "tsan"])
def test_stress(config: str, tmp_path: Path) -> None:
    proc = _run([config], tmp_path, timeout=280)
    if proc.returncode == SKIP:
        pytest.skip(_skip_reason(proc))
    assert proc.returncode == 0, _output(proc)
    assert "passed" in proc.stdout, _output(proc)
