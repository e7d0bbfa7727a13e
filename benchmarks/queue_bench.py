#!/usr/bin/env python3
"""Throughput and latency of upipe.Queue against other ways to move data between processes.

Run ``python benchmarks/queue_bench.py [--quick] [--out FILE]``; see benchmarks/README.md.

Every case runs a producer and a consumer (or a pinger and a ponger) in two fresh ``spawn``
processes. Both set up, meet at a barrier, exchange a warm-up share that is verified but not
timed, and then the timed part runs. The consumer verifies everything it receives (count, order
and full content); any mismatch, exception or timeout is reported and makes the script exit
non-zero after the remaining cases have run.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import functools
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py, beside this script
import numpy as np

import upipe

# -- workload ----------------------------------------------------------------------------------

MSG_SIZE = 64  # bytes: 8-byte little-endian sequence number + 56 bytes of fixed padding
PAD_WORDS = np.frombuffer(bytes(range(8, MSG_SIZE)), dtype="<u8")
BATCH = 256  # messages per batch in the batched scenario
VERIFY_BLOCK = 1024  # the consumer verifies messages in blocks of this many (64 KiB: no mmap)
FRAME_ELEMS = 262144  # float32 elements: 1 MiB frames
FRAME_BYTES = FRAME_ELEMS * 4

MSG_DEPTH = 1024  # items a message queue holds (where the transport lets us bound it)
FRAME_DEPTH = 8  # frames in flight per frame transport: the same for all, = RING_SLOTS_FEW
RING_SLOTS_MSG = 1024  # shared_memory baseline: slots per scenario
RING_SLOTS_FEW = 8

MSG_WARMUP = 8192  # messages, untimed (a multiple of BATCH)
FRAME_WARMUP = 100  # frames, untimed (touches every chunk/slot page before timing)
RTT_WARMUP = 1000  # round trips, untimed

SETUP_TIMEOUT = 60.0  # seconds for the two processes to reach the start barrier
END_TIMEOUT = 30.0  # seconds to wait for the end-of-stream marker
JOIN_TIMEOUT = 10.0  # seconds for a finished child to exit before it is terminated
RING_STALL_TIMEOUT = 60.0  # seconds a shared_memory ring waits for its peer before giving up
BG_LOAD_WARN = 0.15  # CPUs of other processes' work during a run that make it "noisy"

PRETTY = {
    "msg": "64 B messages, one at a time",
    "batch": f"64 B messages, batches of {BATCH}",
    "frames": "1 MiB float32 frames",
    "rtt": "64 B ping-pong round trip",
}


class VerificationError(Exception):
    """What a consumer received is not what the producer sent."""


def make_messages(start: int, count: int) -> bytes:
    """Messages ``start .. start+count-1``, concatenated (``count * MSG_SIZE`` bytes)."""
    words = np.empty((count, MSG_SIZE // 8), dtype="<u8")
    words[:, 0] = np.arange(start, start + count, dtype="<u8")
    words[:, 1:] = PAD_WORDS
    return words.tobytes()


def split_messages(blob: bytes) -> list[bytes]:
    return [blob[j : j + MSG_SIZE] for j in range(0, len(blob), MSG_SIZE)]


def _describe(obj: Any) -> str:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        seq = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else None
        return f"{type(obj).__name__} of {len(raw)} B (seq field {seq})"
    if isinstance(obj, np.ndarray):
        return f"ndarray {obj.dtype}{list(obj.shape)}"
    return f"{type(obj).__name__} {obj!r:.80}"


class StreamVerifier:
    """Checks a stream of messages, block by block, against what the producer generates: every
    byte of every message, hence count and order; also sums the sequence numbers (a checksum
    the parent re-checks)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.next = 0
        self.seq_sum = 0

    def check(self, msgs: list[Any]) -> None:
        k = len(msgs)
        if self.next + k > self.total:
            raise VerificationError(
                f"received more than the {self.total} messages that were sent "
                f"({self.next + k} so far)"
            )
        want = make_messages(self.next, k)
        try:
            got = b"".join(msgs)
        except TypeError:
            got = b""
        if got != want:
            raise VerificationError(self._first_mismatch(msgs, want))
        self.seq_sum += int(np.frombuffer(got, dtype="<u8")[:: MSG_SIZE // 8].sum())
        self.next += k

    def _first_mismatch(self, msgs: list[Any], want: bytes) -> str:
        for j, m in enumerate(msgs):
            exp = want[j * MSG_SIZE : (j + 1) * MSG_SIZE]
            ok = isinstance(m, (bytes, bytearray, memoryview)) and bytes(m) == exp
            if not ok:
                where = ""
                if isinstance(m, (bytes, bytearray, memoryview)) and len(bytes(m)) == MSG_SIZE:
                    at = next(i for i, (a, b) in enumerate(zip(bytes(m), exp, strict=True))
                              if a != b)
                    where = f", first differing byte at offset {at}"
                return (
                    f"message #{self.next + j}: expected {MSG_SIZE} B with seq {self.next + j}, "
                    f"got {_describe(m)}{where}"
                )
        return f"messages #{self.next}..: content differs"  # pragma: no cover

    def finish(self) -> None:
        if self.next != self.total:
            raise VerificationError(f"received {self.next} messages, expected {self.total}")


def check_frame(x: Any, i: int) -> None:
    """Frame i must be float32[FRAME_ELEMS] with every element == i (reads every element)."""
    if (
        not isinstance(x, np.ndarray)
        or x.dtype != np.float32
        or x.shape != (FRAME_ELEMS,)
    ):
        raise VerificationError(f"frame #{i}: expected float32[{FRAME_ELEMS}], got {_describe(x)}")
    v = float(i)
    lo, hi = x.min(), x.max()
    if x[0] != v or x[-1] != v or lo != v or hi != v:
        raise VerificationError(
            f"frame #{i}: expected every element == {i}, got first={x[0]} last={x[-1]} "
            f"min={lo} max={hi}"
        )


# -- transports --------------------------------------------------------------------------------
#
# A Channel is one direction of one transport. It is created in the parent, pickled into the
# child processes (spawn), and opened there as a Tx (sending end) or an Rx (receiving end).
# Hot-path methods are plain attributes bound to the transport's own methods where possible, so
# the timed loops call the library directly.


class Tx:
    send: Callable[[bytes], Any]
    send_batch: Callable[[list[bytes]], Any]
    send_frame: Callable[[np.ndarray], Any]

    def __init__(self) -> None:
        self._frame = np.empty(FRAME_ELEMS, dtype=np.float32)

    def frame_buffer(self) -> np.ndarray:
        """The array to fill for the next frame."""
        return self._frame

    def finish(self) -> None:
        """Send the end-of-stream marker (the consumer may still be reading: do not close)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


class Rx:
    recv: Callable[[], Any]
    recv_batch: Callable[[], list[Any]]
    recv_frame: Callable[[], Any]

    def frame_done(self) -> None:
        """The consumer dropped the last frame it got."""

    def expect_end(self) -> None:
        """Receive the end-of-stream marker; VerificationError if something else comes."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Channel:
    def open_tx(self) -> Tx:
        raise NotImplementedError

    def open_rx(self) -> Rx:
        raise NotImplementedError

    def destroy(self) -> None:
        """Parent side clean-up, after both children are gone."""


# upipe ----------------------------------------------------------------------------------------


class UpipeChannel(Channel):
    def __init__(self, kind: str, zero_copy: bool = False) -> None:
        if kind == "frames":
            self.q = upipe.Queue(
                maxsize=FRAME_DEPTH, max_bytes=256 << 20, chunk_sizes={FRAME_BYTES: FRAME_DEPTH}
            )
        else:
            self.q = upipe.Queue(maxsize=MSG_DEPTH)
        self.zero_copy = zero_copy

    def open_tx(self) -> Tx:
        return UpipeTx(self.q, self.zero_copy)

    def open_rx(self) -> Rx:
        return UpipeRx(self.q)

    def destroy(self) -> None:
        self.q.detach()


class UpipeTx(Tx):
    def __init__(self, q: upipe.Queue, zero_copy: bool) -> None:
        super().__init__()
        self.q = q
        self.zero_copy = zero_copy
        self.send = q.put
        self.send_batch = q.put_many
        self.send_frame = q.put

    def frame_buffer(self) -> np.ndarray:
        if not self.zero_copy:
            return self._frame
        return self.q.alloc_array(FRAME_ELEMS, np.float32)  # waits for a chunk the consumer frees

    def finish(self) -> None:
        self.q.close()



class UpipeRx(Rx):
    def __init__(self, q: upipe.Queue) -> None:
        self.q = q
        self.recv = q.get
        self.recv_frame = q.get
        self.recv_batch = functools.partial(q.get_many, BATCH)

    def expect_end(self) -> None:
        try:
            item = self.q.get(timeout=END_TIMEOUT)
        except upipe.Closed:
            return
        except upipe.Empty:
            raise VerificationError(f"no end of stream (Closed) within {END_TIMEOUT} s") from None
        raise VerificationError(f"extra item after the last message: {_describe(item)}")


# multiprocessing.Queue ------------------------------------------------------------------------


class MpQueueChannel(Channel):
    def __init__(self, ctx: Any, maxsize: int) -> None:
        self.q = ctx.Queue(maxsize=maxsize)

    def open_tx(self) -> Tx:
        return MpQueueTx(self.q)

    def open_rx(self) -> Rx:
        return MpQueueRx(self.q)

    def destroy(self) -> None:
        self.q.close()
        self.q.join_thread()


class MpQueueTx(Tx):
    def __init__(self, q: Any) -> None:
        super().__init__()
        self.q = q
        self.send = q.put
        self.send_batch = q.put
        self.send_frame = q.put

    def frame_buffer(self) -> np.ndarray:
        # The feeder thread pickles the array later: reusing one array would race with it.
        return np.empty(FRAME_ELEMS, dtype=np.float32)

    def finish(self) -> None:
        self.q.put(None)

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


class MpQueueRx(Rx):
    def __init__(self, q: Any) -> None:
        self.q = q
        self.recv = q.get
        self.recv_batch = q.get
        self.recv_frame = q.get

    def expect_end(self) -> None:
        import queue

        try:
            item = self.q.get(timeout=END_TIMEOUT)
        except queue.Empty:
            raise VerificationError(f"no end marker within {END_TIMEOUT} s") from None
        if item is not None:
            raise VerificationError(f"extra item after the last message: {_describe(item)}")


# multiprocessing.Pipe -------------------------------------------------------------------------


class PipeChannel(Channel):
    def __init__(self, ctx: Any) -> None:
        self.reader, self.writer = ctx.Pipe(duplex=False)

    def open_tx(self) -> Tx:
        return PipeTx(self.writer)

    def open_rx(self) -> Rx:
        return PipeRx(self.reader)

    def destroy(self) -> None:
        self.reader.close()
        self.writer.close()


class PipeTx(Tx):
    def __init__(self, conn: Any) -> None:
        super().__init__()
        self.conn = conn
        self.send = conn.send_bytes
        self.send_batch = conn.send  # a pickled list
        self.send_frame = conn.send_bytes

    def finish(self) -> None:
        self.conn.send_bytes(b"")

    def close(self) -> None:
        self.conn.close()


class PipeRx(Rx):
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.recv = conn.recv_bytes
        self.recv_batch = conn.recv
        self._buf = bytearray(FRAME_BYTES)

    def recv_frame(self) -> np.ndarray:  # type: ignore[override]
        n = self.conn.recv_bytes_into(self._buf)
        return np.frombuffer(self._buf, dtype=np.float32, count=n // 4)

    def expect_end(self) -> None:
        if not self.conn.poll(END_TIMEOUT):
            raise VerificationError(f"no end marker within {END_TIMEOUT} s")
        item = self.conn.recv_bytes()
        if item != b"":
            raise VerificationError(f"extra item after the last message: {_describe(item)}")


# faster-fifo ----------------------------------------------------------------------------------


def _ff_identity(obj: bytes) -> bytes:
    return obj


class FasterFifoChannel(Channel):
    """Raw bytes (identity dumps, loads=bytes) for messages; default pickling for frames."""

    def __init__(self, max_size_bytes: int, raw: bool) -> None:
        import faster_fifo

        if raw:
            self.q = faster_fifo.Queue(max_size_bytes, loads=bytes, dumps=_ff_identity)
        else:
            self.q = faster_fifo.Queue(max_size_bytes)
        self.end: bytes | None = b"" if raw else None

    def open_tx(self) -> Tx:
        return FasterFifoTx(self.q, self.end)

    def open_rx(self) -> Rx:
        return FasterFifoRx(self.q, self.end)


class FasterFifoTx(Tx):
    def __init__(self, q: Any, end: bytes | None) -> None:
        super().__init__()
        self.q = q
        self.end = end
        self.send = functools.partial(q.put, timeout=1e9)
        self.send_batch = functools.partial(q.put_many, timeout=1e9)
        self.send_frame = self.send

    def finish(self) -> None:
        self.q.put(self.end, timeout=END_TIMEOUT)


class FasterFifoRx(Rx):
    def __init__(self, q: Any, end: bytes | None) -> None:
        self.q = q
        self.end = end
        self.recv = functools.partial(q.get, timeout=1e9)
        self.recv_frame = self.recv
        self._get_many = functools.partial(q.get_many, timeout=1e9, max_messages_to_get=BATCH)
        self._ended = False

    def recv_batch(self) -> list[Any]:  # type: ignore[override]
        if self._ended:
            raise VerificationError("end of stream before every message arrived")
        items: list[Any] = self._get_many()
        if items[-1] == self.end:  # get_many may take the end marker along with the last batch
            items.pop()
            self._ended = True
        return items

    def expect_end(self) -> None:
        import queue

        if self._ended:
            return
        try:
            item = self.q.get(timeout=END_TIMEOUT)
        except queue.Empty:
            raise VerificationError(f"no end marker within {END_TIMEOUT} s") from None
        if item != self.end:
            raise VerificationError(f"extra item after the last message: {_describe(item)}")


# pyzmq ----------------------------------------------------------------------------------------


class ZmqChannel(Channel):
    """PUSH (connect) -> PULL (bind) over ipc:// in a private temp dir."""

    def __init__(self, hwm: int) -> None:
        import zmq  # noqa: F401  (fail here, in the parent, if pyzmq is missing)

        self.dir = tempfile.mkdtemp(prefix="upipe-bench-zmq-")
        self.addr = f"ipc://{self.dir}/s.sock"
        self.hwm = hwm

    def open_tx(self) -> Tx:
        return ZmqTx(self.addr, self.hwm)

    def open_rx(self) -> Rx:
        return ZmqRx(self.addr, self.hwm)

    def destroy(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ZmqTx(Tx):
    def __init__(self, addr: str, hwm: int) -> None:
        import zmq

        super().__init__()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, int(END_TIMEOUT * 1000))
        self.sock.connect(addr)
        self.send = self.sock.send
        self.send_batch = self.sock.send_multipart
        self.send_frame = self.sock.send  # copy=True: the array is reused for the next frame

    def finish(self) -> None:
        self.sock.send(b"")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class ZmqRx(Rx):
    def __init__(self, addr: str, hwm: int) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(addr)
        self.recv = self.sock.recv
        self.recv_batch = self.sock.recv_multipart

    def recv_frame(self) -> np.ndarray:  # type: ignore[override]
        frame = self.sock.recv(copy=False)
        return np.frombuffer(frame.buffer, dtype=np.float32)

    def expect_end(self) -> None:
        if not self.sock.poll(int(END_TIMEOUT * 1000)):
            raise VerificationError(f"no end marker within {END_TIMEOUT} s")
        item = self.sock.recv()
        if item != b"":
            raise VerificationError(f"extra item after the last message: {_describe(item)}")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


# shared_memory + one memcpy: the reference --------------------------------------------------

RING_HEADER = 128  # head (items published) at byte 0, tail (items consumed) at byte 64


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


class ShmRingChannel(Channel):
    """A single-producer single-consumer ring of fixed slots in one SharedMemory block.

    Layout: two uint64 counters on separate cache lines (head = items published, tail = items
    consumed), a uint64 length per slot, then the slots. The producer copies a payload into slot
    ``head % nslots`` (the one memcpy), stores its length, then publishes ``head + 1``; the
    consumer reads the slot (in place, or copies it out for bytes) and publishes ``tail + 1``.
    Both sides busy-poll the other's counter (yielding the CPU every 256 polls).

    Ordering relies on x86-64 (TSO): stores become visible in program order and loads are not
    reordered with other loads, and CPython stores/loads an aligned uint64 item of a memoryview
    with one instruction. On weakly ordered CPUs this ring would need fences, so the baseline is
    skipped there. A zero-length item is the end-of-stream marker.
    """

    def __init__(self, nslots: int, slot_bytes: int) -> None:
        if nslots & (nslots - 1):
            raise ValueError("nslots must be a power of two")
        self.nslots = nslots
        self.slot_bytes = slot_bytes
        self.stride = _align64(slot_bytes)
        self.lens_off = RING_HEADER
        self.data_off = RING_HEADER + _align64(8 * nslots)
        size = self.data_off + nslots * self.stride
        self._shm: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
            create=True, size=size
        )
        self._shm.buf[: self.data_off] = bytes(self.data_off)
        self.name = self._shm.name

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shm"] = None
        return state

    def open_tx(self) -> Tx:
        return ShmRingTx(RingWriter(self))

    def open_rx(self) -> Rx:
        return ShmRingRx(RingReader(self))

    def destroy(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None


class _RingEnd:
    def __init__(self, ch: ShmRingChannel) -> None:
        self._shm = shared_memory.SharedMemory(name=ch.name)
        self._buf: memoryview = self._shm.buf
        self._ctr = self._buf[:RING_HEADER].cast("Q")  # [0] head, [8] tail
        self._lens = self._buf[ch.lens_off : ch.lens_off + 8 * ch.nslots].cast("Q")
        self._n = ch.nslots
        self._mask = ch.nslots - 1
        self._stride = ch.stride
        self._data_off = ch.data_off
        self._slot_bytes = ch.slot_bytes

    def _wait(self, index: int, target: int) -> int:
        """Busy-poll counter ``index`` until it reaches ``target``; return its value."""
        ctr = self._ctr
        spins = 0
        deadline = 0.0
        while True:
            value: int = ctr[index]
            if value >= target:
                return value
            spins += 1
            if not spins & 255:
                os.sched_yield()
                if not spins & 0xFFFF:
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + RING_STALL_TIMEOUT
                    elif now > deadline:
                        raise TimeoutError(f"shm ring: no progress from the peer in "
                                           f"{RING_STALL_TIMEOUT} s")

    def close(self) -> None:
        self._ctr.release()
        self._lens.release()
        del self._buf
        self._shm.close()


class RingWriter(_RingEnd):
    def __init__(self, ch: ShmRingChannel) -> None:
        super().__init__(ch)
        self._head = 0
        self._tail_seen = 0

    def send(self, data: Any) -> None:
        """Copy ``data`` (bytes, or any 1-D unsigned-byte buffer) into the next slot."""
        head = self._head
        if head - self._tail_seen >= self._n:
            self._tail_seen = self._wait(8, head - self._n + 1)
        n = len(data)
        if n > self._slot_bytes:
            raise ValueError(f"{n} B does not fit a {self._slot_bytes} B slot")
        i = head & self._mask
        off = self._data_off + i * self._stride
        self._buf[off : off + n] = data
        self._lens[i] = n
        self._head = head = head + 1
        self._ctr[0] = head


class RingReader(_RingEnd):
    def __init__(self, ch: ShmRingChannel) -> None:
        super().__init__(ch)
        self._tail = 0
        self._head_seen = 0

    def peek(self) -> memoryview:
        """The next item, in place in its slot (valid until :meth:`advance`)."""
        tail = self._tail
        if tail >= self._head_seen:
            self._head_seen = self._wait(0, tail + 1)
        i = tail & self._mask
        off = self._data_off + i * self._stride
        return self._buf[off : off + self._lens[i]]

    def advance(self) -> None:
        self._tail = tail = self._tail + 1
        self._ctr[8] = tail

    def recv_bytes(self) -> bytes:
        data = self.peek().tobytes()
        self.advance()
        return data


class ShmRingTx(Tx):
    def __init__(self, w: RingWriter) -> None:
        super().__init__()
        self.w = w
        self.send = w.send

    def send_batch(self, batch: list[bytes]) -> None:  # type: ignore[override]
        self.w.send(b"".join(batch))

    def send_frame(self, arr: np.ndarray) -> None:  # type: ignore[override]
        self.w.send(arr.view(np.uint8))

    def finish(self) -> None:
        self.w.send(b"")

    def close(self) -> None:
        self.w.close()


class ShmRingRx(Rx):
    def __init__(self, r: RingReader) -> None:
        self.r = r
        self.recv = r.recv_bytes
        self.frame_done = r.advance  # type: ignore[method-assign]

    def recv_batch(self) -> list[bytes]:  # type: ignore[override]
        return split_messages(self.r.recv_bytes())

    def recv_frame(self) -> np.ndarray:  # type: ignore[override]
        return np.frombuffer(self.r.peek(), dtype=np.float32)

    def expect_end(self) -> None:
        item = self.r.recv_bytes()
        if item != b"":
            raise VerificationError(f"extra item after the last message: {_describe(item)}")

    def close(self) -> None:
        self.r.close()


# -- cases -------------------------------------------------------------------------------------

PEERS = ["upipe", "upipe-zerocopy", "upipe-asyncio", "mp.Queue", "mp.Pipe", "faster-fifo",
         "pyzmq", "shm+memcpy"]


@dataclass
class Case:
    scenario: str  # msg | batch | frames | rtt
    peer: str
    note: str
    make: Callable[[Any], list[Channel]]  # (spawn context) -> channels, in the parent
    params: dict[str, Any] = field(default_factory=dict)


def _ring_ok() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def build_cases(sizes: dict[str, int]) -> list[Case]:
    ff_msg_bytes = MSG_DEPTH * (MSG_SIZE + 8)  # faster-fifo stores a size_t before each message
    ff_frame_bytes = FRAME_DEPTH * (FRAME_BYTES + 4096)
    cases: list[Case] = []

    def add(scenario: str, peer: str, note: str, make: Callable[[Any], list[Channel]],
            **params: Any) -> None:
        cases.append(Case(scenario, peer, note, make, params))

    for sc in ("msg", "batch"):
        one = sc == "msg"
        add(sc, "upipe",
            "put(bytes) / get()" if one else f"put_many(list) / get_many({BATCH})",
            lambda ctx: [UpipeChannel("msg")])
        add(sc, "mp.Queue",
            "put / get (pickled by the feeder thread)" if one
            else "put(list) / get(): one pickled list per batch",
            lambda ctx, one=one: [MpQueueChannel(ctx, MSG_DEPTH if one else MSG_DEPTH // BATCH)])
        add(sc, "mp.Pipe",
            "send_bytes / recv_bytes, Pipe(duplex=False)" if one
            else "send(list) / recv(): one pickled list per batch",
            lambda ctx: [PipeChannel(ctx)])
        add(sc, "faster-fifo",
            "put / get, raw bytes (identity dumps, loads=bytes)" if one
            else f"put_many(list) / get_many(max_messages_to_get={BATCH}), raw bytes",
            lambda ctx: [FasterFifoChannel(ff_msg_bytes, raw=True)])
        add(sc, "pyzmq",
            "PUSH/PULL ipc://, send / recv" if one
            else "PUSH/PULL ipc://, send_multipart / recv_multipart (one part per message)",
            lambda ctx: [ZmqChannel(MSG_DEPTH)])
        if _ring_ok():
            add(sc, "shm+memcpy",
                f"SPSC ring, {RING_SLOTS_MSG} x 64 B slots, one memcpy in, bytes copy out" if one
                else f"SPSC ring, {RING_SLOTS_FEW} x {BATCH * MSG_SIZE // 1024} KiB slots: one "
                "joined batch per slot, consumer slices 64 B messages",
                lambda ctx, one=one: [
                    ShmRingChannel(RING_SLOTS_MSG, MSG_SIZE) if one
                    else ShmRingChannel(RING_SLOTS_FEW, BATCH * MSG_SIZE)
                ])

    add("frames", "upipe", "put(ndarray) copies into a chunk; get() returns a read-only view",
        lambda ctx: [UpipeChannel("frames")])
    add("frames", "upipe-zerocopy",
        "alloc_array + fill in place + put (descriptor only); get() returns a view",
        lambda ctx: [UpipeChannel("frames", zero_copy=True)])
    if _ring_ok():
        add("frames", "shm+memcpy",
            f"fill a private array, one memcpy into one of {RING_SLOTS_FEW} slots, "
            "consumer reads the slot in place",
            lambda ctx: [ShmRingChannel(RING_SLOTS_FEW, FRAME_BYTES)])
    add("frames", "mp.Queue", "put(ndarray) / get(), pickled; a fresh array per frame (the "
        "feeder thread pickles later)", lambda ctx: [MpQueueChannel(ctx, FRAME_DEPTH)])
    add("frames", "mp.Pipe", "send_bytes(ndarray) / recv_bytes_into(preallocated buffer)",
        lambda ctx: [PipeChannel(ctx)])
    add("frames", "faster-fifo", "put(ndarray) / get(), default pickling",
        lambda ctx: [FasterFifoChannel(ff_frame_bytes, raw=False)])
    add("frames", "pyzmq", "send(ndarray) (copied) / recv(copy=False) + np.frombuffer",
        lambda ctx: [ZmqChannel(FRAME_DEPTH)])

    add("rtt", "upipe", "put / get on two queues", lambda ctx: [UpipeChannel("msg") for _ in "ab"])
    add("rtt", "upipe-asyncio", "await put_async / get_async on two queues",
        lambda ctx: [UpipeChannel("msg") for _ in "ab"], asyncio=True)
    add("rtt", "mp.Queue", "two queues", lambda ctx: [MpQueueChannel(ctx, MSG_DEPTH)
                                                    for _ in "ab"])
    add("rtt", "mp.Pipe", "two one-way pipes, send_bytes / recv_bytes",
        lambda ctx: [PipeChannel(ctx) for _ in "ab"])
    add("rtt", "faster-fifo", "two queues, raw bytes",
        lambda ctx: [FasterFifoChannel(ff_msg_bytes, raw=True) for _ in "ab"])
    add("rtt", "pyzmq", "two PUSH/PULL pairs over ipc://",
        lambda ctx: [ZmqChannel(MSG_DEPTH) for _ in "ab"])
    if _ring_ok():
        add("rtt", "shm+memcpy", "two rings, busy-polled",
            lambda ctx: [ShmRingChannel(RING_SLOTS_FEW, MSG_SIZE) for _ in "ab"])

    for c in cases:
        c.params.update(sizes)
    return cases


# -- the child processes -----------------------------------------------------------------------

@dataclass
class Sync:
    """The two processes' handshakes: start together, end of warm-up, consumer done."""

    barrier: Any  # multiprocessing.synchronize.Barrier(2)
    warm: Any  # Event: the consumer verified the warm-up share; the producer starts the clock
    done: Any  # Event: the consumer has everything; the producer may close its end

    def start(self) -> None:
        self.barrier.wait(SETUP_TIMEOUT)

    def wait_warm(self) -> None:
        if not self.warm.wait(SETUP_TIMEOUT):
            raise TimeoutError("the consumer did not finish the warm-up")

    def wait_done(self) -> None:
        # Some transports (zmq) drop what the reader has not read yet when the writer closes.
        if not self.done.wait(END_TIMEOUT + 60):
            raise TimeoutError("the consumer did not report completion")


def _stream_producer(chs: list[Channel], p: dict[str, Any], sync: Sync) -> dict[str, Any]:
    tx = chs[0].open_tx()
    warmup, n = p["msg_warmup"], p["messages"]
    msgs = split_messages(make_messages(0, warmup + n))
    if p["scenario"] == "batch":
        parts: list[Any] = [msgs[j : j + BATCH] for j in range(0, len(msgs), BATCH)]
        send: Callable[[Any], Any] = tx.send_batch
        first_timed = warmup // BATCH
    else:
        parts, send, first_timed = msgs, tx.send, warmup
    del msgs
    sync.start()
    for part in parts[:first_timed]:
        send(part)
    sync.wait_warm()
    timed = parts[first_timed:]
    t0 = time.monotonic_ns()
    for part in timed:
        send(part)
    t_sent = time.monotonic_ns()
    tx.finish()
    sync.wait_done()
    tx.close()
    return {"t0_ns": t0, "t_sent_ns": t_sent, **tx.stats()}


def _consume_single(recv: Callable[[], Any], v: StreamVerifier, count: int) -> None:
    left = count
    while left:
        k = min(left, VERIFY_BLOCK)
        v.check([recv() for _ in range(k)])
        left -= k


def _consume_batches(recv_batch: Callable[[], list[Any]], v: StreamVerifier, count: int) -> None:
    got = 0
    pending: list[Any] = []
    while got < count:
        batch = recv_batch()
        got += len(batch)
        pending += batch
        if len(pending) >= VERIFY_BLOCK:
            v.check(pending)
            pending = []
    if pending:
        v.check(pending)
    if got != count:
        raise VerificationError(f"received {got} messages where {count} were expected")


def _stream_consumer(chs: list[Channel], p: dict[str, Any], sync: Sync) -> dict[str, Any]:
    rx = chs[0].open_rx()
    warmup, n = p["msg_warmup"], p["messages"]
    v = StreamVerifier(warmup + n)
    consume: Any = (functools.partial(_consume_batches, rx.recv_batch)
                    if p["scenario"] == "batch" else functools.partial(_consume_single, rx.recv))
    sync.start()
    consume(v, warmup)
    sync.warm.set()
    consume(v, n)
    t_end = time.monotonic_ns()
    v.finish()
    rx.expect_end()
    sync.done.set()
    rx.close()
    return {"t_end_ns": t_end, "received": v.next, "seq_sum": v.seq_sum}


def _frame_producer(chs: list[Channel], p: dict[str, Any], sync: Sync) -> dict[str, Any]:
    tx = chs[0].open_tx()
    warmup, n = p["frame_warmup"], p["frames"]
    frame_buffer, send_frame = tx.frame_buffer, tx.send_frame
    sync.start()
    t0 = 0
    for i in range(warmup + n):
        if i == warmup:
            sync.wait_warm()
            t0 = time.monotonic_ns()
        arr = frame_buffer()
        arr[:] = i
        send_frame(arr)
        del arr
    t_sent = time.monotonic_ns()
    tx.finish()
    sync.wait_done()
    tx.close()
    return {"t0_ns": t0, "t_sent_ns": t_sent, **tx.stats()}


def _frame_consumer(chs: list[Channel], p: dict[str, Any], sync: Sync) -> dict[str, Any]:
    rx = chs[0].open_rx()
    warmup, n = p["frame_warmup"], p["frames"]
    recv_frame, frame_done = rx.recv_frame, rx.frame_done
    ids = 0
    sync.start()
    for i in range(warmup + n):
        if i == warmup:
            sync.warm.set()
        x = recv_frame()
        check_frame(x, i)
        ids += i
        del x
        frame_done()
    t_end = time.monotonic_ns()
    rx.expect_end()
    sync.done.set()
    rx.close()
    return {"t_end_ns": t_end, "received": warmup + n, "frame_id_sum": ids}


def _latency_summary(samples_ns: list[int]) -> dict[str, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    pct = np.percentile(us, [50, 90, 99, 99.9])
    return {
        "p50_us": float(pct[0]), "p90_us": float(pct[1]), "p99_us": float(pct[2]),
        "p999_us": float(pct[3]), "min_us": float(us.min()), "max_us": float(us.max()),
        "mean_us": float(us.mean()),
    }


def _rtt_ping(chs: list[Channel], p: dict[str, Any], sync: Sync) -> dict[str, Any]:
    """Send message i, wait for it to come back, check it; time each round trip."""
    warmup, n = p["rtt_warmup"], p["rounds"]
    msgs = split_messages(make_messages(0, warmup + n))
    lat: list[int] = []
    if p.get("asyncio"):
        a, b = _upipe_queue(chs[0]), _upipe_queue(chs[1])
        sync.start()
        asyncio.run(_ping_async(a, b, msgs, warmup, lat))
        a.close()
        sync.wait_done()
    else:
        tx, rx = chs[0].open_tx(), chs[1].open_rx()
        sync.start()
        send, recv, clock = tx.send, rx.recv, time.perf_counter_ns
        append = lat.append
        for i, m in enumerate(msgs):
            t = clock()
            send(m)
            r = recv()
            dt = clock() - t
            if r != m:
                raise VerificationError(f"round trip #{i}: sent seq {i}, got back {_describe(r)}")
            if i >= warmup:
                append(dt)
        tx.finish()
        sync.wait_done()
        tx.close()
        rx.close()
    return {"rounds": len(lat), **_latency_summary(lat)}


async def _ping_async(a: upipe.Queue, b: upipe.Queue, msgs: list[bytes], warmup: int,
                      lat: list[int]) -> None:
    put, get, clock = a.put_async, b.get_async, time.perf_counter_ns
    for i, m in enumerate(msgs):
        t = clock()
        await put(m)
        r = await get()
        dt = clock() - t
        if r != m:
            raise VerificationError(f"round trip #{i}: sent seq {i}, got back {_describe(r)}")
        if i >= warmup:
            lat.append(dt)


def _rtt_pong(chs: list[Channel], p: dict[str, Any], sync: Sync) -> dict[str, Any]:
    """Echo every message back at once; verify the stream (in blocks, after echoing)."""
    total = p["rtt_warmup"] + p["rounds"]
    v = StreamVerifier(total)
    if p.get("asyncio"):
        a, b = _upipe_queue(chs[0]), _upipe_queue(chs[1])
        sync.start()
        asyncio.run(_pong_async(a, b, v, total))
        sync.done.set()
    else:
        rx, tx = chs[0].open_rx(), chs[1].open_tx()
        sync.start()
        send, recv = tx.send, rx.recv
        left = total
        while left:
            block = []
            for _ in range(min(left, VERIFY_BLOCK)):
                m = recv()
                send(m)
                block.append(m)
            v.check(block)
            left -= len(block)
        v.finish()
        rx.expect_end()
        sync.done.set()
        rx.close()
        tx.close()
    return {"echoed": v.next, "seq_sum": v.seq_sum}


async def _pong_async(a: upipe.Queue, b: upipe.Queue, v: StreamVerifier, total: int) -> None:
    put, get = b.put_async, a.get_async
    left = total
    while left:
        block = []
        for _ in range(min(left, VERIFY_BLOCK)):
            m = await get()
            await put(m)
            block.append(m)
        v.check(block)
        left -= len(block)
    v.finish()
    try:
        item = await asyncio.wait_for(get(), END_TIMEOUT)
    except upipe.Closed:
        return
    raise VerificationError(f"extra item after the last message: {_describe(item)}")


def _upipe_queue(ch: Channel) -> upipe.Queue:
    assert isinstance(ch, UpipeChannel)
    return ch.q


ROLES: dict[tuple[str, str], Callable[[list[Channel], dict[str, Any], Sync], dict[str, Any]]] = {
    ("msg", "producer"): _stream_producer,
    ("msg", "consumer"): _stream_consumer,
    ("batch", "producer"): _stream_producer,
    ("batch", "consumer"): _stream_consumer,
    ("frames", "producer"): _frame_producer,
    ("frames", "consumer"): _frame_consumer,
    ("rtt", "producer"): _rtt_ping,
    ("rtt", "consumer"): _rtt_pong,
}


def _die_with_parent() -> None:
    """Have the kernel kill this process if the benchmark's parent process dies."""
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child_main(role: str, chs: list[Channel], params: dict[str, Any], sync: Sync, conn: Any,
                parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(3)
    # A hang shows where it is: dump every thread's stack shortly before the parent gives up.
    faulthandler.dump_traceback_later(max(1.0, params["timeout"] - 5.0), exit=False)
    try:
        result = ROLES[(params["scenario"], role)](chs, params, sync)
        conn.send(("ok", {**result, "cpu_s": _own_cpu()}))
    except VerificationError as exc:
        conn.send(("verification", f"{role}: {exc}"))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        conn.send(("error", f"{role}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        faulthandler.cancel_dump_traceback_later()
        conn.close()


# -- the parent --------------------------------------------------------------------------------


class CaseFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "verification" | "error" | "timeout"


def case_timeout(case: Case) -> float:
    p = case.params
    if p.get("case_timeout"):
        return float(p["case_timeout"])
    if case.scenario in ("msg", "batch"):
        return 120.0 + (p["messages"] + p["msg_warmup"]) * 50e-6
    if case.scenario == "frames":
        return 120.0 + (p["frames"] + p["frame_warmup"]) * 20e-3
    return 120.0 + (p["rounds"] + p["rtt_warmup"]) * 2e-3


def _stop(proc: Any, grace: float) -> None:
    """Make sure proc is gone: join (up to grace seconds), then terminate, then kill."""
    proc.join(grace)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def run_case(ctx: Any, case: Case) -> dict[str, dict[str, Any]]:
    """Run one case; the children's results by role. Raises CaseFailed."""
    timeout = case_timeout(case)
    params = {**case.params, "scenario": case.scenario, "timeout": timeout}
    channels = case.make(ctx)
    procs: dict[str, Any] = {}
    conns: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    busy0, steal0, own0, wall0 = *_machine_cpu(), _family_cpu(), time.monotonic()
    grace = 0.5  # seconds for the children to exit by themselves; JOIN_TIMEOUT once all is well
    try:
        sync = Sync(ctx.Barrier(2), ctx.Event(), ctx.Event())
        for role in ("consumer", "producer"):
            r, w = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child_main, args=(role, channels, params, sync, w, os.getpid()),
                name=f"bench-{case.scenario}-{case.peer}-{role}", daemon=True,
            )
            proc.start()
            w.close()
            procs[role], conns[role] = proc, r
        deadline = time.monotonic() + timeout
        waiting = dict(conns)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CaseFailed("timeout", f"no result from {', '.join(waiting)} within "
                                 f"{timeout:.0f} s (hang?)")
            watched = [*waiting.values(), *(procs[role].sentinel for role in waiting)]
            ready = mp.connection.wait(watched, remaining)
            for role, conn in list(waiting.items()):
                exited = procs[role].sentinel in ready
                if conn in ready or (exited and conn.poll(1.0)):
                    try:
                        status, payload = conn.recv()
                    except EOFError:
                        status, payload = "error", f"{role} died without a result"
                    del waiting[role]
                    if status != "ok":
                        raise CaseFailed(status, payload)
                    results[role] = payload
                elif exited:
                    raise CaseFailed("error", f"{role} died without a result "
                                     f"(exit code {procs[role].exitcode})")
        grace = JOIN_TIMEOUT
    finally:
        for proc in procs.values():
            _stop(proc, grace)
        for conn in conns.values():
            conn.close()
        for ch in channels:
            ch.destroy()
    busy1, steal1 = _machine_cpu()
    wall = time.monotonic() - wall0
    ours = _family_cpu() - own0  # this process and its reaped children, exit work included
    results["load"] = {"wall_s": wall, "foreign_cpu_s": max(0.0, busy1 - busy0 - ours),
                       "steal_cpu_s": steal1 - steal0}
    return results


def _machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _family_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _seq_sum(total: int) -> int:
    return total * (total - 1) // 2


def summarize(case: Case, res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The metrics of one case; also cross-checks the consumer's checksum."""
    p = case.params
    prod, cons, load = res["producer"], res["consumer"], res["load"]
    # Other processes' CPU use meanwhile, in CPUs (2.0 = both cores of a 2-core machine): the
    # machine is shared, and a busy neighbour skews a run (it is reported, not corrected).
    out: dict[str, Any] = {
        "bg_load_cpus": load["foreign_cpu_s"] / load["wall_s"],
        "steal_cpus": load["steal_cpu_s"] / load["wall_s"],
        "cpu_s": {"producer": prod.pop("cpu_s"), "consumer": cons.pop("cpu_s")},
    }
    if case.scenario in ("msg", "batch", "frames"):
        seconds = (cons["t_end_ns"] - prod["t0_ns"]) / 1e9
        out["seconds"] = seconds
        out["producer_seconds"] = (prod["t_sent_ns"] - prod["t0_ns"]) / 1e9
    if case.scenario in ("msg", "batch"):
        n, total = p["messages"], p["messages"] + p["msg_warmup"]
        if cons["received"] != total or cons["seq_sum"] != _seq_sum(total):
            raise CaseFailed("verification", f"consumer got {cons['received']} messages with "
                             f"seq sum {cons['seq_sum']}, expected {total} and {_seq_sum(total)}")
        out.update(messages=n, msgs_per_s=n / out["seconds"], seq_sum=cons["seq_sum"])
    elif case.scenario == "frames":
        n, total = p["frames"], p["frames"] + p["frame_warmup"]
        if cons["frame_id_sum"] != _seq_sum(total):
            raise CaseFailed("verification", "frame id checksum mismatch")
        out.update(frames=n, frames_per_s=n / out["seconds"],
                   gb_per_s=n * FRAME_BYTES / out["seconds"] / 1e9,
                   frame_id_sum=cons["frame_id_sum"])
    else:
        total = p["rounds"] + p["rtt_warmup"]
        if cons["echoed"] != total or cons["seq_sum"] != _seq_sum(total):
            raise CaseFailed("verification", "ponger checksum mismatch")
        out.update(prod)
    return out


PRIMARY = {  # the metric that ranks runs, and whether higher is better
    "msg": ("msgs_per_s", True),
    "batch": ("msgs_per_s", True),
    "frames": ("frames_per_s", True),
    "rtt": ("p50_us", False),
}


def make_entry(case: Case, runs: list[dict[str, Any]],
               failure: dict[str, Any] | None) -> dict[str, Any]:
    """One table row: the median run's metrics, every run's, and the spread; or the failure.

    Runs during which other processes kept the CPUs busy are left out when there are quiet ones.
    """
    entry: dict[str, Any] = {"scenario": case.scenario, "peer": case.peer, "note": case.note}
    if failure is not None:
        return {**entry, "ok": False, **failure, "runs": runs}
    key, higher = PRIMARY[case.scenario]
    quiet = [r for r in runs if r["bg_load_cpus"] <= BG_LOAD_WARN] or runs
    ranked = sorted(quiet, key=lambda r: r[key], reverse=higher)
    median = ranked[len(ranked) // 2]
    return {**entry, "ok": True, **median, "primary": key,
            "primary_all": [r[key] for r in quiet],
            "bg_load_max": max(r["bg_load_cpus"] for r in quiet),
            "runs_used": len(quiet), "runs": runs}


# -- report ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return _common.machine_info(("upipe", "numpy", "pyzmq", "faster-fifo", "cffi"))


def _fmt_rate(x: float | None, unit: float, digits: int = 2) -> str:
    return "-" if x is None else f"{x / unit:.{digits}f}"


def _spread(e: dict[str, Any], unit: float, digits: int) -> str:
    values = e.get("primary_all") or []
    if len(values) < 2:
        return ""
    return f"{min(values) / unit:.{digits}f}-{max(values) / unit:.{digits}f}"


def print_tables(entries: list[dict[str, Any]]) -> None:
    """One table per scenario; "range" is the spread of the main metric over the repeats."""
    for sc in ("msg", "batch", "frames", "rtt"):
        rows = [e for e in entries if e["scenario"] == sc]
        if not rows:
            continue
        print(f"\n== {PRETTY[sc]} ==")
        if sc in ("msg", "batch"):
            ref = next((e.get("msgs_per_s") for e in rows if e["peer"] == "upipe"), None)
            print(f"{'peer':<16}{'M msg/s':>9}{'range':>14}{'seconds':>9}{'upipe is':>10}  notes")
            for e in rows:
                rate = e.get("msgs_per_s")
                rel = f"{ref / rate:.2f}x" if rate and ref else "-"
                print(f"{e['peer']:<16}{_fmt_rate(rate, 1e6, 3):>9}{_spread(e, 1e6, 3):>14}"
                      f"{_fmt_rate(e.get('seconds'), 1, 3):>9}{rel:>10}  {_status(e)}")
        elif sc == "frames":
            print(f"{'peer':<16}{'frames/s':>9}{'range':>14}{'GB/s':>7}{'seconds':>9}  notes")
            for e in rows:
                print(f"{e['peer']:<16}{_fmt_rate(e.get('frames_per_s'), 1, 0):>9}"
                      f"{_spread(e, 1, 0):>14}{_fmt_rate(e.get('gb_per_s'), 1):>7}"
                      f"{_fmt_rate(e.get('seconds'), 1, 3):>9}  {_status(e)}")
        else:
            print(f"{'peer':<16}{'p50 us':>8}{'range':>12}{'p90 us':>8}{'p99 us':>8}"
                  f"{'mean us':>9}{'max us':>8}  notes")
            for e in rows:
                print(f"{e['peer']:<16}{_fmt_rate(e.get('p50_us'), 1, 1):>8}"
                      f"{_spread(e, 1, 1):>12}{_fmt_rate(e.get('p90_us'), 1, 1):>8}"
                      f"{_fmt_rate(e.get('p99_us'), 1, 1):>8}{_fmt_rate(e.get('mean_us'), 1, 1):>9}"
                      f"{_fmt_rate(e.get('max_us'), 1, 0):>8}  {_status(e)}")


def _status(e: dict[str, Any]) -> str:
    if e["ok"]:
        if e["bg_load_max"] > BG_LOAD_WARN:
            return f"{e['note']} [background load up to {e['bg_load_max']:.2f} CPU]"
        return e["note"]
    return f"FAILED ({e['failure']}): {e['error'].splitlines()[0][:120]}"


def evaluate_targets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def get(sc: str, peer: str, key: str) -> float | None:
        for e in entries:
            if e["scenario"] == sc and e["peer"] == peer and e["ok"]:
                value = e.get(key)
                return None if value is None else float(value)
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    up1, zmq1 = get("msg", "upipe", "msgs_per_s"), get("msg", "pyzmq", "msgs_per_s")
    zc, ring = get("frames", "upipe-zerocopy", "frames_per_s"), get("frames", "shm+memcpy",
                                                                    "frames_per_s")
    targets = [
        ("one at a time >= 2 M msg/s", up1, 2e6, "msg/s"),
        ("one at a time >= 2x pyzmq", ratio(up1, zmq1), 2.0, "x"),
        ("batched >= 10 M msg/s", get("batch", "upipe", "msgs_per_s"), 10e6, "msg/s"),
        ("1 MiB zero-copy >= 1.5x shm+memcpy", ratio(zc, ring), 1.5, "x"),
        ("round trip p50 <= 15 us (blocking)", get("rtt", "upipe", "p50_us"), 15.0, "us"),
        ("round trip p50 <= 30 us (asyncio)", get("rtt", "upipe-asyncio", "p50_us"), 30.0, "us"),
    ]
    out = []
    for name, value, goal, unit in targets:
        lower_is_better = unit == "us"
        met = None if value is None else (value <= goal if lower_is_better else value >= goal)
        out.append({"target": name, "value": value, "goal": goal, "unit": unit, "met": met})
    return out


def print_targets(targets: list[dict[str, Any]]) -> None:
    print("\n== targets (informative, not asserted) ==")
    for t in targets:
        v = t["value"]
        if v is None:
            shown = "n/a"
        elif t["unit"] == "msg/s":
            shown = f"{v / 1e6:.2f} M msg/s"
        elif t["unit"] == "x":
            shown = f"{v:.2f}x"
        else:
            shown = f"{v:.1f} us"
        status = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"  {t['target']:<40}{shown:>16}   {status}")


# -- main --------------------------------------------------------------------------------------


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a quick smoke run)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "queue_bench.json",
                    help="JSON results file (default: %(default)s)")
    ap.add_argument("--scenarios", default="msg,batch,frames,rtt",
                    help="comma-separated subset of: msg,batch,frames,rtt")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="comma-separated subset of: " + ",".join(PEERS))
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per case; the median run is reported (default: %(default)s)")
    ap.add_argument("--case-timeout", type=float, default=0.0,
                    help="seconds before a case counts as hung (default: scaled to its size)")
    args = ap.parse_args(argv)

    sizes = {
        "messages": 100_000 if args.quick else 1_000_000,
        "frames": 300 if args.quick else 10_000,
        "rounds": 5_000 if args.quick else 20_000,
        "msg_warmup": MSG_WARMUP,
        "frame_warmup": FRAME_WARMUP,
        "rtt_warmup": RTT_WARMUP // 2 if args.quick else RTT_WARMUP,
    }
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` reaps the children
    scenarios = set(args.scenarios.split(","))
    peers = set(args.peers.split(","))
    unknown = (scenarios - set(PRETTY)) | (peers - set(PEERS))
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if unknown:
        ap.error(f"unknown scenario/peer: {', '.join(sorted(unknown))}")
    cases = [c for c in build_cases(sizes) if c.scenario in scenarios and c.peer in peers]
    for c in cases:
        c.params["case_timeout"] = args.case_timeout

    info = machine_info()
    print(f"upipe queue benchmark ({'quick' if args.quick else 'full'}): "
          f"{info['cpu_count']} CPUs ({info['cpu_model']}), Python {info['python']}, "
          f"{info['platform']}")
    print(f"sizes: {sizes}")
    if not _ring_ok():
        print("note: the shared_memory baseline needs x86-64 ordering; skipped on this machine")

    ctx = mp.get_context("spawn")
    started = time.monotonic()
    runs: dict[int, list[dict[str, Any]]] = {id(c): [] for c in cases}
    failed: dict[int, dict[str, Any]] = {}
    # Repeats go round-robin over the cases, so slow drifts of the machine hit every peer alike.
    # A run during which other processes were busy is repeated (up to --repeat extra rounds).
    def quiet_runs(case: Case) -> int:
        return sum(r["bg_load_cpus"] <= BG_LOAD_WARN for r in runs[id(case)])

    for rnd in range(2 * args.repeat):
        todo = [c for c in cases if id(c) not in failed
                and (len(runs[id(c)]) < args.repeat if rnd < args.repeat
                     else quiet_runs(c) < args.repeat)]
        if not todo:
            break
        for case in todo:
            label = f"round {rnd + 1}" + (" (extra: background load)" if rnd >= args.repeat else "")
            print(f"{label} [{case.scenario}] {case.peer} ...", end=" ", flush=True)
            t = time.monotonic()
            try:
                runs[id(case)].append(summarize(case, run_case(ctx, case)))
                bg = runs[id(case)][-1]["bg_load_cpus"]
                print(f"ok ({time.monotonic() - t:.1f} s"
                      + (f", background load {bg:.2f} CPU" if bg > BG_LOAD_WARN else "") + ")",
                      flush=True)
            except ImportError as exc:
                failed[id(case)] = {"failure": "unavailable", "error": str(exc)}
                print(f"skipped: {exc}", flush=True)
            except CaseFailed as exc:
                failed[id(case)] = {"failure": exc.kind, "error": str(exc)}
                print(f"FAILED ({exc.kind}): {str(exc).splitlines()[0]}", flush=True)
            except Exception as exc:
                failed[id(case)] = {"failure": "error", "error": f"{type(exc).__name__}: "
                                    f"{exc}\n{traceback.format_exc()}"}
                print(f"FAILED (error: {type(exc).__name__}: {exc})", flush=True)
    entries = [make_entry(c, runs[id(c)], failed.get(id(c))) for c in cases]

    print_tables(entries)
    targets = evaluate_targets(entries)
    print_targets(targets)
    noisy = [e for e in entries if e["ok"] and e["bg_load_max"] > BG_LOAD_WARN]
    if noisy:
        print(f"\nnote: other processes used the CPUs during {len(noisy)} case(s) (see "
              "'background load'): those numbers are pessimistic; re-run on a quiet machine")
    digest_after = machine_info()["upipe_source_sha256"]
    if digest_after != info["upipe_source_sha256"]:
        print("\nWARNING: upipe's sources changed during the run: results mix two versions")

    failures = [e for e in entries if not e["ok"] and e["failure"] != "unavailable"]
    report = {
        "machine": info,
        "mode": "quick" if args.quick else "full",
        "repeat": args.repeat,
        "sizes": sizes,
        "constants": {"msg_size": MSG_SIZE, "batch": BATCH, "frame_bytes": FRAME_BYTES,
                      "msg_depth": MSG_DEPTH, "frame_depth": FRAME_DEPTH},
        "wall_seconds": time.monotonic() - started,
        "upipe_source_sha256_after": digest_after,
        "results": entries,
        "targets": targets,
        "failures": [{k: e[k] for k in ("scenario", "peer", "failure", "error")}
                     for e in failures],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nresults written to {args.out}")

    if failures:
        print(f"\n{len(failures)} case(s) FAILED:", file=sys.stderr)
        for e in failures:
            print(f"  [{e['scenario']}] {e['peer']}: {e['failure']}: {e['error']}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
