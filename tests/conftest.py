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
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        # multiprocessing.heap keeps its arenas (behind ctx.Array/Value) open for the life of
        # the process, as a cache: not a per-test leak.
        if target.startswith("/dev/shm/pym-") and target.endswith("(deleted)"):
            continue
        fds.add(int(name))
    return fds


def _dev_shm() -> set[str]:
    # upipe itself never names anything in /dev/shm (its segments are memfds). Names made by
    # multiprocessing's semaphores (sem.mp-*) and shared_memory (psm_*) come and go with other
    # processes on the machine (a benchmark running beside the tests): not counted here;
    # test_queue_creates_no_dev_shm_entry checks upipe on its own.
    try:
        return {n for n in os.listdir("/dev/shm") if not n.startswith(("sem.mp-", "psm_"))}
    except FileNotFoundError:
        return set()


def _shm_mappings() -> set[str]:
    with open("/proc/self/maps") as maps:
        # (multiprocessing.heap's arenas, /dev/shm/pym-*, are a process-wide cache: see above)
        return {line.split(None, 5)[-1].strip() for line in maps
                if "/dev/shm/" in line and "/dev/shm/pym-" not in line}


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]


@pytest.fixture(scope="session", autouse=True)
def _process_wide_helpers() -> None:
    """multiprocessing's resource tracker and forkserver are per-process singletons holding a
    pipe each for the life of the process: start them up front so they never look like leaks."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    forkserver.ensure_running()


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves fds, /dev/shm entries or live child processes behind."""
    import gc

    gc.collect()
    fds_before, shm_before, maps_before = _open_fds(), _dev_shm(), _shm_mappings()
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
    assert _shm_mappings() - maps_before == set(), "a /dev/shm file is still mapped"
