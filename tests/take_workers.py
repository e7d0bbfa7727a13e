"""Process bodies for tests/test_take.py (module level, so spawn and forkserver find them).

Item ``i`` of a stream is one of four shapes, chosen by ``i % 4`` so that every path is used:
small bytes (inline), large bytes (a chunk), a numpy array (a chunk, zero copy) and a pickled
dict (inline). Each carries its id and a CRC32 of its body, and :func:`check` verifies both.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import zlib
from typing import Any

import numpy as np

from upipe import Closed, Queue

HEADER = struct.Struct("<II")  # id, crc32 of the rest


def make(i: int) -> Any:
    shape = i % 4
    if shape == 3:
        return {"id": i, "body": bytes(range(i % 200))}
    if shape == 2:
        arr = np.full(1000 + i % 50, i, dtype=np.int64)
        return arr
    rng = random.Random(i)
    body = rng.randbytes(40 if shape == 0 else 3000 + i % 1000)
    return HEADER.pack(i, zlib.crc32(body)) + body


def check(item: Any) -> int:
    """The id of a received item; AssertionError if it is damaged."""
    if isinstance(item, dict):
        i = item["id"]
        assert item["body"] == bytes(range(i % 200)), f"item {i}: pickled body damaged"
        return int(i)
    if isinstance(item, np.ndarray):
        i = int(item[0])
        assert item.dtype == np.int64 and item.shape == (1000 + i % 50,), f"item {i}: shape"
        assert bool((item == i).all()), f"item {i}: array damaged"
        return i
    i, crc = HEADER.unpack_from(item)
    assert zlib.crc32(item[HEADER.size:]) == crc, f"item {i}: payload damaged"
    return int(i)


def produce(q: Queue, n: int, start: Any, pace: float = 0.0) -> None:
    start.wait(30)
    for i in range(n):
        q.put(make(i), timeout=60)
        if pace:
            time.sleep(pace)


def take_and_hold(q: Queue, n: int, ready: Any, ids: Any) -> None:
    """Take n items, keep them (views and all) unacked, say so, and wait to be killed."""
    held = []
    for k in range(n):
        item, receipt = q.take(timeout=30)
        ids[k] = check(item)
        held.append((item, receipt))
    ready.set()
    time.sleep(600)


def take_and_exit(q: Queue, n: int) -> None:
    """Take n items and exit normally without acking them (they must be given back)."""
    held = [q.take(timeout=30) for _ in range(n)]
    assert len(held) == n


def take_mark_ack(q: Queue, counts: Any, start: Any, seed: int, slow: float) -> None:
    """Consume the stream with take: take 1-3 items, then for each: work, count it, work, ack;
    until the queue is closed and drained. A kill lands anywhere in this loop: before the count
    (the item comes back once), or between the count and the ack (it comes back, counted twice).
    ``slow``: seconds of "work" per item, at most (a slow worker holds several items at once)."""
    rng = random.Random(seed)
    start.wait(30)
    held: list[tuple[Any, Any]] = []
    while True:
        try:
            held.append(q.take(timeout=60))
            while len(held) < rng.randint(1, 3):
                held.append(q.take(timeout=slow / 2) if slow else q.take(block=False))
        except Closed:
            if not held:
                return
        except Exception as exc:  # Empty: process what we hold
            if exc.__class__.__name__ != "Empty":
                raise
        for item, receipt in held:
            if slow:
                time.sleep(rng.uniform(0, slow / 2))
            counts[check(item)] += 1
            if slow:
                time.sleep(rng.uniform(0, slow / 2))
            q.ack(receipt)
        held.clear()


def take_shared_and_die(q: Any, ready: Any) -> None:
    """Take one (shared, fan-out) chunk item from q, keep it unacked, and die by SIGKILL."""
    item, _receipt = q.take(timeout=30)
    assert not item.flags.writeable
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def fan_out_and_die(queues: list[Any], n: int, ready: Any) -> None:
    """Fan n large frames out to queues, the last of which has room for one only: frame 1 on
    waits for that room, holding its chunk. Then wait to be SIGKILLed with it held."""
    import threading

    import numpy as np

    from upipe.queue import fan_out

    def feed() -> None:
        for i in range(n):
            fan_out(queues, np.full(4096, i, np.int64))

    threading.Thread(target=feed, daemon=True).start()
    time.sleep(0.5)
    ready.set()
    time.sleep(60)
