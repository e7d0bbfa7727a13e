"""Per-worker counters in shared memory: each worker bumps its own row, the pipe reads them all.

One small memfd per pipe, created by the pipe and handed to every worker when it joins. A row
is 128 bytes (two cache lines, so workers never share a line) of uint64 words. Who writes what:

====  ================  =======================================================
word  name              written by
====  ================  =======================================================
0     pid               the pipe (when it gives the row to a new worker)
1     node              the pipe: the processor's index in the pipe
2     instance          the pipe
3     state             the pipe (STARTING, RUNNING, EXITED); the worker (RETIRING)
4     frames_in         the worker: frames it got from its input
5     frames_out        the worker: frames it emitted (once per emit, not per downstream)
6     bytes_out         the worker: payload bytes it emitted (bytes-like and arrays)
7     get_wait_ns       the worker: time spent waiting for input (starved)
8     emit_wait_ns      the worker: time spent waiting for room downstream (back-pressure)
9     started_ns        the pipe: CLOCK_MONOTONIC when the worker started
10    wait_since_ns     the worker: CLOCK_MONOTONIC when its current wait began, 0 if none
11    wait_kind         the worker: GET_WAIT or EMIT_WAIT (the word the wait will add to)
====  ================  =======================================================

A wait is added to its counter when it ends; readers add a wait still in progress themselves
(``read(index, now_ns)``), so a worker blocked for a whole second shows a second of waiting.

Words are read without locks: a reader may see a count one frame old, never a torn value
(aligned 8-byte stores and loads are single instructions on the platforms upipe runs on).
"""

from __future__ import annotations

import mmap
import os
from typing import Any

ROW_BYTES = 128
ROW_WORDS = ROW_BYTES // 8
FIELDS = ("pid", "node", "instance", "state", "frames_in", "frames_out", "bytes_out",
          "get_wait_ns", "emit_wait_ns", "started_ns", "wait_since_ns", "wait_kind")
(PID, NODE, INSTANCE, STATE, FRAMES_IN, FRAMES_OUT, BYTES_OUT, GET_WAIT, EMIT_WAIT, STARTED,
 WAIT_SINCE, WAIT_KIND) = range(len(FIELDS))
FREE, STARTING, RUNNING, RETIRING, EXITED = range(5)


class StatsBlock:
    """The pipe's table of worker rows (creator: :meth:`create`; workers: :meth:`attach`)."""

    def __init__(self, fd: int, rows: int, owns_fd: bool) -> None:
        self.fd = fd
        self.rows = rows
        self._owns_fd = owns_fd
        self._map: mmap.mmap | None = mmap.mmap(fd, rows * ROW_BYTES)
        self.words: memoryview = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, rows: int) -> StatsBlock:
        fd = os.memfd_create("upipe-stats", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, rows * ROW_BYTES)
            return cls(fd, rows, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, rows: int) -> StatsBlock:
        """Map a block received from the pipe (the fd stays the caller's)."""
        return cls(fd, rows, owns_fd=False)

    def row(self, index: int) -> memoryview:
        """The words of one row (a worker's own counters)."""
        if not 0 <= index < self.rows:
            raise IndexError(f"stats row {index} out of range (0..{self.rows - 1})")
        return self.words[index * ROW_WORDS:(index + 1) * ROW_WORDS]

    def read(self, index: int, now_ns: int = 0) -> dict[str, int]:
        """A row's words by name; with ``now_ns`` (CLOCK_MONOTONIC), a wait in progress is
        counted up to now."""
        base = index * ROW_WORDS
        w = self.words
        row = {name: int(w[base + i]) for i, name in enumerate(FIELDS)}
        since, kind = row["wait_since_ns"], row["wait_kind"]
        if now_ns and since and now_ns > since and kind in (GET_WAIT, EMIT_WAIT):
            row[FIELDS[kind]] += now_ns - since
        return row

    def claim(self, pid: int, node: int, instance: int, started_ns: int) -> int:
        """Give a free (or exited) row to a new worker: its index. Pipe only."""
        w = self.words
        for i in range(self.rows):
            base = i * ROW_WORDS
            if w[base + STATE] in (FREE, EXITED):
                for j in range(ROW_WORDS):
                    w[base + j] = 0
                w[base + PID], w[base + NODE], w[base + INSTANCE] = pid, node, instance
                w[base + STARTED] = started_ns
                w[base + STATE] = STARTING
                return i
        raise RuntimeError(f"the pipe's stats table is full ({self.rows} workers)")

    def set_pid(self, index: int, pid: int) -> None:
        self.words[index * ROW_WORDS + PID] = pid

    def release(self, index: int) -> None:
        """A row claimed for a worker that never started."""
        self.words[index * ROW_WORDS + STATE] = FREE

    def set_state(self, index: int, state: int) -> None:
        self.words[index * ROW_WORDS + STATE] = state

    def close(self) -> None:
        if self._map is not None:
            self.words.release()
            self._map.close()
            self._map = None
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StatsBlock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
