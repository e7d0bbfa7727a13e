"""Shared fixtures: every test must leave no fd, child process or /dev/shm entry behind."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _dev_shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves fds, /dev/shm entries or live child processes behind."""
    import gc

    gc.collect()
    fds_before, shm_before = _open_fds(), _dev_shm()
    yield
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra_fds = _open_fds() - fds_before
        kids = [p for p in _children() if "forkserver" not in " ".join(p.cmdline())
                and "resource_tracker" not in " ".join(p.cmdline())]
        if not extra_fds and not kids:
            break
        time.sleep(0.05)
        gc.collect()
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - fds_before
              if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"leaked fds: {leaked}"
    assert not kids, f"leaked child processes: {[(p.pid, p.cmdline()) for p in kids]}"
    assert _dev_shm() - shm_before == set(), "leaked /dev/shm entries"
