"""Every bad input gets a clear error that names the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import upipe
from upipe import Queue


def test_unpicklable_object() -> None:
    q = Queue(maxsize=2)
    with pytest.raises(TypeError, match="cannot be pickled"):
        q.put(lambda: 1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        q.put(threading.Lock())
    assert q.qsize() == 0  # nothing half-put


def test_alloc_arguments() -> None:
    q = Queue(maxsize=2)
    with pytest.raises(ValueError, match="nbytes"):
        q.alloc(-1)
    with pytest.raises(ValueError, match="nbytes"):
        q.alloc(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plain dtype"):
        q.alloc_array(4, dtype=object)
    with pytest.raises(upipe.MessageTooLarge, match="max_message_size"):
        q.alloc_array((1 << 30,), np.uint8)


def test_release_of_something_else() -> None:
    q = Queue(maxsize=2)
    with pytest.raises(upipe.NotOwner, match="alloc"):
        q.release(b"bytes")
    other = Queue(maxsize=2)
    buf = other.alloc(100)
    with pytest.raises(upipe.NotOwner):
        q.release(buf)  # held, but in another queue
    other.release(buf)


def test_too_many_processes_attached() -> None:
    q = Queue(maxsize=2)
    token, _ = q.export()
    attached = []
    with pytest.raises(upipe.TooManyProcesses, match="64 processes"):
        for _ in range(70):
            attached.append(Queue.attach(token))  # each attachment takes a table entry
    assert len(attached) == 63  # plus the creator's
    for a in attached:
        a.detach()
    Queue.attach(token).detach()  # entries come back on detach


@pytest.mark.timeout(120)
def test_memory_budget_too_large_is_shm_exhausted() -> None:
    # In a child whose address space is capped, a 2 GiB queue cannot be mapped.
    code = textwrap.dedent("""
        import resource, upipe
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        try:
            upipe.Queue(maxsize=4, max_bytes=2 << 30)
        except upipe.ShmExhausted as exc:
            assert "max_bytes" in str(exc), exc
            print("ShmExhausted")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=100)
    assert "ShmExhausted" in proc.stdout, proc.stdout + proc.stderr


def test_put_many_rejects_a_non_iterable() -> None:
    q = Queue(maxsize=2)
    with pytest.raises(TypeError):
        q.put_many(5)  # type: ignore[arg-type]


def test_a_queue_larger_than_memory_is_refused_before_reserving_anything() -> None:
    with pytest.raises(upipe.ShmExhausted, match="lower max_bytes, maxsize or slot_size"):
        Queue(maxsize=1 << 30, slot_size=65536)  # 64 TiB of slots


def test_geometry_beyond_the_core_limits() -> None:
    with pytest.raises(ValueError, match="chunks is more than"):
        Queue(max_bytes=1 << 40, chunk_sizes=[64])
    with pytest.raises(ValueError, match="spin"):
        Queue(spin=-1)


def test_a_detached_queue_says_so_everywhere_and_views_survive() -> None:
    code = textwrap.dedent("""
        import upipe
        q = upipe.Queue(maxsize=4)
        a = q.alloc(100_000)
        a[:3] = b"abc"
        q.detach()
        assert bytes(a[:3]) == b"abc"  # the view keeps the mapping alive
        for call in (q.qsize, q.close, q.statistics, lambda: q.put(b"x" * 5000),
                     lambda: q.get(), lambda: q.alloc(10)):
            try:
                call()
            except upipe.UpipeError as exc:
                assert "detached" in str(exc), exc
            else:
                raise AssertionError("expected UpipeError")
        del a
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_an_interrupted_blocking_put_gives_its_chunk_back() -> None:
    import signal

    q = Queue(maxsize=1, max_bytes=1 << 20, chunk_sizes={65536: 4})
    q.put(b"x" * 60000)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            q.put(b"y" * 60000, timeout=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert q.statistics().chunk_classes[0][2] == 3  # only the queued item's chunk is out


def test_get_many_keeps_what_it_has_when_another_consumer_wins_the_race(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = Queue(maxsize=8)
    q.put_many([b"a", b"b", np.arange(3)])
    real_get = q.get
    calls = []

    def racing_get(block: bool = True, timeout: float | None = None) -> object:
        calls.append(block)
        real_get(False)  # "another consumer" takes the array first
        raise upipe.Empty("taken")

    monkeypatch.setattr(q, "get", racing_get)
    assert q.get_many(10) == [b"a", b"b"]
    assert calls == [False]
