"""Process bodies for the multi-process tests (module level, so spawn and forkserver find them).

Every item a producer sends is stamped: 1 byte producer id, 4 bytes sequence number, 4 bytes
CRC32 of the rest; the rest's size varies so both the inline and the chunk paths are used.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import time
import zlib
from typing import Any

import numpy as np

from upipe import Closed, Queue

HEADER = struct.Struct("<BII")
SIZES = (0, 20, 80, 500, 5000, 40000)


def make_item(producer: int, seq: int, rng: random.Random, arrays: bool) -> Any:
    if arrays and seq % 7 == 3:
        arr = np.full(2048 + seq % 100, seq, dtype=np.int64)
        arr[0] = producer
        return arr
    size = SIZES[rng.randrange(len(SIZES))]
    body = rng.randbytes(size)
    return HEADER.pack(producer, seq, zlib.crc32(body)) + body


def check_item(item: Any) -> tuple[int, int]:
    """(producer, seq) of a received item; raises AssertionError if it is damaged."""
    if isinstance(item, np.ndarray):
        producer, seq = int(item[0]), int(item[1])
        assert item.dtype == np.int64 and item.shape == (2048 + seq % 100,), "array shape"
        assert bool((item[1:] == seq).all()), "array payload damaged"
        return producer, seq
    producer, seq, crc = HEADER.unpack_from(item)
    assert zlib.crc32(item[HEADER.size:]) == crc, f"payload damaged: producer {producer} seq {seq}"
    return producer, seq


def producer(q: Queue, producer_id: int, n: int, start: Any, arrays: bool = True) -> None:
    rng = random.Random(producer_id)
    start.wait(30)
    for seq in range(n):
        q.put(make_item(producer_id, seq, rng, arrays), timeout=60)


def sync_consumer(q: Queue, results: Any, start: Any, slow: float = 0.0) -> None:
    start.wait(30)
    seen: dict[int, list[int]] = {}
    try:
        while True:
            try:
                item = q.get(timeout=60)
            except Closed:
                break
            p, s = check_item(item)
            seen.setdefault(p, []).append(s)
            if slow:
                time.sleep(slow)
        results.put(("ok", os.getpid(), seen))
    except BaseException as exc:  # report, do not hang the parent
        results.put(("error", os.getpid(), repr(exc)))


def async_consumer(q: Queue, results: Any, start: Any) -> None:
    async def main() -> dict[int, list[int]]:
        seen: dict[int, list[int]] = {}
        async for item in q:
            p, s = check_item(item)
            seen.setdefault(p, []).append(s)
        return seen

    start.wait(30)
    try:
        results.put(("ok", os.getpid(), asyncio.run(main())))
    except BaseException as exc:
        results.put(("error", os.getpid(), repr(exc)))


def marking_consumer(q: Queue, seen: Any, n_per_producer: int, start: Any) -> None:
    """Marks each item in a shared table as soon as it has it (so a SIGKILL loses at most the
    one item between get() and the mark). Table cell = times received."""
    start.wait(30)
    while True:
        try:
            item = q.get(timeout=60)
        except Closed:
            return
        p, s = check_item(item)
        seen[p * n_per_producer + s] += 1


def abandon_and_die(q: Queue, what: int) -> None:
    """Leave a half-done slot, then die by SIGKILL (white-box crash test)."""
    rc = q._seg.debug_abandon(what)
    if rc != 0:
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def hold_arrays_and_die(q: Queue, n: int, ready: Any) -> None:
    """Take n zero-copy items, keep them, and die holding them."""
    held = [q.get(timeout=30) for _ in range(n)]
    buf = q.alloc(1000)  # and one fresh buffer never put
    ready.set()
    time.sleep(60)
    del held, buf


def attach_from_token_and_echo(token_in: str, token_out: str, count: int) -> None:
    """A plain subprocess child: attach by token, echo count items back doubled."""
    inq, outq = Queue.attach(token_in), Queue.attach(token_out)
    for _ in range(count):
        item = inq.get(timeout=30)
        outq.put(item * 2)
