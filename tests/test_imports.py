"""What a worker process imports: not numpy (upipe works on bytes without it, and it costs a
worker's start tens of ms), not the pipe's own module and not psutil. numpy arrives with the
first array; each check runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import upipe


def _run(code: str, **kwargs: object) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(proc.stdout)


@pytest.mark.parametrize("module", ["upipe", "upipe.processor", "upipe.worker"])
def test_import_does_not_import_numpy(module: str) -> None:
    out = _run(f"""
        import sys
        import {module}
        print(sorted(m for m in ("numpy", "psutil", "upipe.pipe") if m in sys.modules))
    """)
    assert out.strip() == "[]", f"import {module} imported {out.strip()}"


def test_pipe_is_imported_on_first_use() -> None:
    out = _run("""
        import sys
        import upipe
        from upipe import *  # noqa: F403
        import upipe.pipe
        assert "upipe.pipe" in sys.modules
        assert Pipe is upipe.Pipe is upipe.pipe.Pipe  # noqa: F405
        assert PipeStatistics is upipe.pipe.PipeStatistics  # noqa: F405
        try:
            upipe.NoSuchThing
        except AttributeError:
            print("ok")
    """)
    assert out.strip() == "ok"


def test_bytes_without_numpy_then_arrays() -> None:
    """A queue moves bytes without numpy; an array put after numpy's import is still an array
    (inline, in a chunk, and from alloc_array), a zero-copy frame is still recognised."""
    out = _run("""
        import sys
        import upipe
        q = upipe.Queue(maxsize=8, max_bytes=1 << 20)
        q.put(b"x")
        q.put(bytes(8192))
        q.put({"a": 1})
        assert q.get() == b"x" and q.get() == bytes(8192) and q.get() == {"a": 1}
        assert "numpy" not in sys.modules
        import numpy as np
        for a in (np.arange(3, dtype=np.int16), np.arange(2000.0)):
            q.put(a)
            b = q.get()
            assert type(b) is np.ndarray and b.dtype == a.dtype and (b == a).all()
            assert not b.flags.writeable
        f = q.alloc_array((64, 32))  # the default dtype: float64
        assert f.dtype == np.float64 and f.shape == (64, 32)
        f[:] = 7
        address = f.__array_interface__["data"][0]
        q.put(f)
        try:
            q.put(f)
        except upipe.NotOwner:  # moved, not copied: the queue knows the array is its own
            pass
        else:
            raise AssertionError("a frame from alloc_array was put twice")
        g = q.get()
        assert g.__array_interface__["data"][0] == address
        assert (g == 7).all() and g.shape == (64, 32)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_array_to_a_process_without_numpy() -> None:
    """The receiver imports numpy when the first array arrives."""
    q = upipe.Queue(maxsize=8)
    token, fds = q.export()
    q.put(np.arange(5, dtype=np.uint32))
    q.put(np.zeros((300, 10)))
    out = _run("""
        import os, sys
        import upipe
        q = upipe.Queue.attach(os.environ["UPIPE_QUEUE"])
        assert "numpy" not in sys.modules
        a = q.get(timeout=10)
        b = q.get(timeout=10)
        print(type(a).__name__, a.dtype, a.tolist(), b.shape, float(b.sum()))
    """, pass_fds=fds, env={**os.environ, "UPIPE_QUEUE": token})
    assert out.split() == ["ndarray", "uint32", "[0,", "1,", "2,", "3,", "4]", "(300,", "10)",
                           "0.0"]
