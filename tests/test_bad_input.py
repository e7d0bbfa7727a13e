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
