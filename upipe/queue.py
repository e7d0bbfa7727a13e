"""``upipe.Queue``: a bounded multi-producer multi-consumer queue in shared memory.

It has the names and the behaviour of :class:`queue.Queue` (``put``/``get`` with ``block`` and
``timeout``, ``put_nowait``/``get_nowait``, ``qsize``/``empty``/``full``) and of
:class:`asyncio.Queue` (``await put_async``/``get_async``), works across processes, and moves
payloads through shared memory instead of pipes. See docs/api.md.
"""

from __future__ import annotations

import math
import os
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import aio, codec
from .errors import (
    Closed,
    Empty,
    Full,
    MessageTooLarge,
    NotOwner,
    ShmExhausted,
    TooManyTakes,
    UpipeError,
)
from .segment import (
    EAGAIN,
    EBADMSG,
    EBUSY,
    EDQUOT,
    EINTR,
    EMSGSIZE,
    ENOBUFS,
    ENOENT,
    EPERM,
    EPIPE,
    ESTALE,
    ETIMEDOUT,
    MAX_HOLDS,
    MAX_RINGS,
    NO_CHUNK,
    WAIT_CHUNK,
    WAIT_READABLE,
    WAIT_WRITABLE,
    Lease,
    Segment,
    SegmentConfig,
    segment_size,
)

if TYPE_CHECKING:
    import numpy as np  # imported where arrays are made: a worker that moves bytes never needs it

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_MAXSIZE = 1024
DEFAULT_MAX_BYTES = 64 * MiB
DEFAULT_SLOT_SIZE = 128
DEFAULT_SPIN = 20e-6
MAX_CLASSES = 8
TOKEN_PREFIX = "upipe-queue:1:"

__all__ = ["Queue", "QueueStatistics", "Receipt"]

_BYTES_NO_META = codec.KIND_BYTES << 16  # rc >> 32 of an item of kind bytes without meta
_NOTHING: Any = object()  # "no item yet" from Queue._try_get (None is a valid item)


@dataclass(frozen=True)
class QueueStatistics:
    """A snapshot of a queue, shared by every attached process.

    ``lost_items`` counts items a consumer took and never finished because it died: taken
    mid-``get`` (an inline item), or held as a zero-copy view when it died (``lost_leases``).
    ``aborted_puts`` counts puts a producer died in the middle of (nothing was delivered).
    ``redelivered`` counts items of :meth:`Queue.take` put back into the queue because their
    taker died or detached before its :meth:`Queue.ack` (they are not lost).
    """

    maxsize: int
    qsize: int
    closed: bool
    inline_max: int
    max_message_size: int
    chunk_classes: tuple[tuple[int, int, int], ...]  # (chunk bytes, chunks, free chunks)
    attached_processes: int
    recoveries: int
    reclaimed_chunks: int
    lost_items: int
    lost_leases: int
    aborted_puts: int
    segment_bytes: int
    redelivered: int = 0


class Receipt:
    """Proof of one :meth:`Queue.take`: hand it to :meth:`Queue.ack` once the item is done.

    Valid in the process and for the queue that took the item, once: acking it twice, on
    another queue, or in another process raises :class:`NotOwner`. It cannot be pickled.
    """

    __slots__ = ("_seg", "_token", "_pid")

    def __init__(self, seg: Segment, token: int) -> None:
        self._seg = seg
        self._token = token
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<upipe.Receipt {self._token:#x}>"

    def __reduce__(self) -> Any:
        raise TypeError("a upipe Receipt is only valid in the process that took the item")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        kind = type(timeout).__name__
        raise TypeError(f"timeout must be a number of seconds or None, not {kind}")
    if timeout < 0 or math.isnan(timeout):
        raise ValueError("'timeout' must be a non-negative number")
    return float(timeout)


def _check_options(maxsize: Any, max_bytes: Any, max_message_size: Any, slot_size: Any,
                   spin: Any) -> None:
    """Queue()'s argument checks (ring_group's members get the same ones)."""
    if isinstance(maxsize, int) and not isinstance(maxsize, bool) and maxsize <= 0:
        raise ValueError(
            f"maxsize must be >= 1, got {maxsize}: a upipe Queue is bounded because its "
            "shared memory is reserved up front (queue.Queue's maxsize=0 means unbounded)"
        )
    _check_positive_int("maxsize", maxsize)
    _check_positive_int("max_bytes", max_bytes)
    _check_positive_int("slot_size", slot_size)
    if slot_size < 64 or slot_size > 65536 or slot_size % 8:
        raise ValueError(f"slot_size must be a multiple of 8 in [64, 65536], got {slot_size}")
    if max_message_size is not None:
        _check_positive_int("max_message_size", max_message_size)
        if max_message_size > max_bytes:
            raise ValueError(
                f"max_message_size={max_message_size} is larger than max_bytes={max_bytes}: "
                "raise max_bytes"
            )
    if not isinstance(spin, (int, float)) or isinstance(spin, bool) or not spin >= 0:
        raise ValueError(f"spin must be a number of seconds >= 0, got {spin!r}")
    if maxsize > 1 << 30:
        raise ValueError(f"maxsize must be at most {1 << 30}, got {maxsize}")


def _check_memory(needed: int, maxsize: int, slot_size: int, max_bytes: int) -> None:
    """Refuse a segment larger than the memory available now: reserving it would wake the
    kernel's OOM killer (which picks a victim, maybe not us) instead of failing cleanly."""
    import psutil  # here: a worker attaches queues, it never creates one

    available = psutil.virtual_memory().available
    if needed > available:
        raise ShmExhausted(
            f"this queue needs {needed / MiB:,.0f} MiB of shared memory (about maxsize x "
            f"slot_size = {maxsize * slot_size / MiB:,.0f} MiB of slots plus max_bytes = "
            f"{max_bytes / MiB:,.0f} MiB of chunks) but only {available / MiB:,.0f} MiB are "
            "available: lower max_bytes, maxsize or slot_size"
        )


def plan_chunks(
    max_bytes: int,
    max_message_size: int | None,
    chunk_sizes: Sequence[int] | Mapping[int, int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Size classes and chunk counts for a queue's pool of ``max_bytes``.

    Default classes go from 4 KiB up in steps of 16x to ``max_message_size`` (default: a quarter
    of ``max_bytes``, at most 16 MiB); the budget is split evenly between classes. An explicit
    ``{size: count}`` mapping is taken as is.
    """
    if isinstance(chunk_sizes, Mapping):
        pairs = sorted((int(s), int(c)) for s, c in chunk_sizes.items())
        sizes = [s for s, _ in pairs]
        counts = [c for _, c in pairs]
        if any(c < 1 for c in counts):
            raise ValueError(f"chunk_sizes: every count must be >= 1, got {dict(pairs)}")
    else:
        if chunk_sizes is None:
            top = min(16 * MiB, max_bytes // 4) if max_message_size is None else max_message_size
            top = max(top, 4 * KiB)
            sizes = []
            size = 4 * KiB
            while size < top and len(sizes) < MAX_CLASSES - 1:
                sizes.append(size)
                size *= 16
            sizes.append(top)
        else:
            sizes = sorted(int(s) for s in chunk_sizes)
        share = max_bytes // max(1, len(sizes))
        counts = [max(1, share // s) if s else 0 for s in sizes]
    if not sizes:
        return (), ()
    if len(sizes) > MAX_CLASSES:
        raise ValueError(f"chunk_sizes: at most {MAX_CLASSES} size classes, got {len(sizes)}")
    if len(set(sizes)) != len(sizes) or sizes[0] < 64:
        raise ValueError(f"chunk_sizes must be distinct sizes of at least 64 bytes, got {sizes}")
    rounded = [(s + 63) // 64 * 64 for s in sizes]
    if rounded[-1] >= 1 << 32:
        raise ValueError(f"chunk sizes must be below 4 GiB, got {rounded[-1]}")
    if sum(counts) > 1 << 24:
        raise ValueError(
            f"{sum(counts):,} chunks is more than the {1 << 24:,} a queue can track: use larger "
            "chunk_sizes or a smaller max_bytes"
        )
    if max_message_size is not None and rounded[-1] < max_message_size:
        raise ValueError(
            f"max_message_size={max_message_size} is larger than the largest chunk size "
            f"{rounded[-1]}: add a larger entry to chunk_sizes"
        )
    return tuple(rounded), tuple(counts)


_SPENT = ("this buffer's chunk was already put or released (a put moves a zero-copy buffer "
          "into the queue): put a copy instead, e.g. arr.copy()")


def _movable_lease(seg: Segment, obj: Any, enc: codec.Encoded) -> Lease | None:
    """The lease of obj if a put would move it (a zero-copy buffer of this segment, whole, from
    its chunk's first byte), None if a put copies it. A shared chunk still held (a fan-out's
    frame) is copied, never moved. Raises NotOwner for a buffer already put or released."""
    lease = seg.lease_for(obj)
    if lease is None or len(enc.parts) != 1 or not seg.starts_chunk(enc.parts[0], lease):
        return None
    held = Segment.lease_is_held(lease)
    if lease.shared and held:
        return None
    if not held:
        raise NotOwner(_SPENT)
    return lease


class _PendingPut:
    """One item on its way in: encoded once, then tried until it fits (no re-encode, no re-copy)."""

    __slots__ = ("q", "enc", "chunk", "lease", "klass")

    def __init__(self, q: Queue, obj: Any) -> None:
        self.q = q
        self.enc = codec.encode(obj, q._seg.inline_max)
        self.chunk = -1
        self.lease = None
        self.klass = -1
        enc = self.enc
        if enc.nbytes + len(enc.meta) <= q._seg.inline_max:
            return
        if enc.nbytes > q._max_message_size:
            raise MessageTooLarge(
                f"item of {enc.nbytes} bytes is larger than this queue's max_message_size of "
                f"{q._max_message_size} bytes: create the Queue with a larger max_message_size "
                "(and max_bytes to hold it)"
            )
        lease = _movable_lease(q._seg, obj, enc)
        if lease is not None:
            self.lease = lease
            self.chunk = lease.chunk
            return
        self.klass = q._seg.class_for(enc.nbytes)
        if self.klass < 0:
            raise MessageTooLarge(
                f"item of {enc.nbytes} bytes fits no chunk class of this queue (largest "
                f"{q._max_message_size} bytes): create the Queue with a larger max_message_size"
            )

    def attempt(self) -> tuple[int, int] | None:
        """Try once. None when the item is in; else (what, arg) to wait for. Raises Closed."""
        q, enc = self.q, self.enc
        seg = q._seg
        if self.chunk < 0 and self.klass < 0:
            rc = seg.put_inline(enc.joined(), enc.kind, enc.meta, q._ring)
            if rc == 0:
                return None
            return self._failed(rc, (WAIT_WRITABLE, q._ring))
        if self.chunk < 0:
            chunk = seg.alloc(enc.nbytes)
            if chunk < 0:
                if seg.is_closed(q._ring):
                    raise Closed("put on a closed queue")
                if chunk in (-ENOBUFS, -EAGAIN):
                    return (WAIT_CHUNK, self.klass)
                return self._failed(chunk, (WAIT_CHUNK, self.klass))
            offset = 0
            for part in enc.parts:
                n = memoryview(part).nbytes
                seg.copy_into_chunk(chunk, part, n, offset)
                offset += n
            self.chunk = chunk
        lease = self.lease
        if lease is not None and not seg.begin_move(lease):
            self.chunk = -1
            raise NotOwner(_SPENT)
        rc = seg.put_chunk(self.chunk, enc.nbytes, enc.kind, enc.meta, q._ring)
        if lease is not None:
            seg.end_move(lease, moved=rc == 0)
            if rc == -EBUSY and q._copy_held:
                return self._copy_instead()
        if rc == 0:
            self.chunk = -1
            self.klass = -2  # done
            return None
        return self._failed(rc, (WAIT_WRITABLE, q._ring))

    def _copy_instead(self) -> tuple[int, int] | None:
        """The buffer is an unacked take's (a processor forwarding the frame it is working on
        into a ring of the same segment): put a copy of it instead."""
        self.lease, self.chunk = None, -1
        self.klass = self.q._seg.class_for(self.enc.nbytes)
        return self.attempt()

    def _failed(self, rc: int, wait: tuple[int, int]) -> tuple[int, int]:
        if rc == -ENOBUFS or rc == -EAGAIN:
            return wait
        self.abandon()
        if rc == -EPIPE:
            raise Closed("put on a closed queue")
        if rc == -EMSGSIZE:
            raise MessageTooLarge(f"item of {self.enc.nbytes} bytes does not fit this queue")
        if rc == -EPERM:
            raise NotOwner("this buffer is not held by this process (already put or released)")
        if rc == -EBUSY:
            raise NotOwner(
                "this buffer is an item from take() that is not acked yet (its slot still names "
                "it): ack() it first, or put a copy"
            )
        raise UpipeError(f"put failed: {os.strerror(-rc)}")

    def abandon(self) -> None:
        """Give back a chunk allocated for a copy that never went in."""
        if self.chunk >= 0 and self.lease is None:
            self.q._seg.free_chunk(self.chunk)
        self.chunk = -1


class _FanOut:
    """One item on its way into several queues that are rings of one segment (see
    :func:`ring_group`): encoded once; a small item is copied into each ring's slot, a large one
    goes into one chunk that every ring's slot names (upipe_put_shared: no copy, the chunk is
    freed when the last consumer lets go of it). Tried until every ring has it."""

    def __init__(self, queues: Sequence[Queue], obj: Any) -> None:
        first = queues[0]
        seg = first._seg
        if any(q._seg is not seg for q in queues):
            raise ValueError("a fan-out needs queues of one ring group (ring_group())")
        self.seg = seg
        self.rings = {q._ring: q for q in queues}
        self.todo = 0
        for q in queues:
            self.todo |= 1 << q._ring
        self.closed = 0
        self.chunk = -1
        self.own_chunk = False  # allocated here for a copy: our hold goes when we are done
        self.sent = False  # some ring has the chunk
        self.lease: Lease | None = None
        self.enc = enc = codec.encode(obj, seg.inline_max)
        self.inline = enc.nbytes + len(enc.meta) <= seg.inline_max
        if self.inline:
            return
        if enc.nbytes > first._max_message_size:
            raise MessageTooLarge(
                f"item of {enc.nbytes} bytes is larger than the queues' max_message_size of "
                f"{first._max_message_size} bytes"
            )
        self.klass = seg.class_for(enc.nbytes)
        lease = _movable_lease(seg, obj, enc)
        if lease is not None:  # a buffer from alloc(): it is the chunk (no copy at all)
            if not seg.begin_move(lease):  # another thread's put took it meanwhile
                raise NotOwner(_SPENT)
            self.lease = lease
            self.chunk = lease.chunk

    def attempt(self) -> tuple[int, int] | None:
        """Try once for every ring still to do: None when all have it, else (what, arg) to wait
        for. Raises Closed at the end if a ring was closed."""
        if not self.todo:
            return None  # done already
        seg, enc = self.seg, self.enc
        if self.inline:
            data = enc.joined()
            for ring in _bits(self.todo):
                rc = seg.put_inline(data, enc.kind, enc.meta, ring)
                if rc == 0 or rc == -EPIPE:
                    self.todo &= ~(1 << ring)
                    self.closed |= (1 << ring) if rc == -EPIPE else 0
                elif rc not in (-ENOBUFS, -EAGAIN):
                    raise UpipeError(f"put failed: {os.strerror(-rc)}")
        else:
            if self.chunk < 0:
                chunk = seg.alloc(enc.nbytes)
                if chunk < 0:
                    if all(seg.is_closed(r) for r in _bits(self.todo)):
                        self.closed |= self.todo  # nothing left that would take it
                        self.todo = 0
                        raise Closed("put on a closed queue")
                    if chunk in (-ENOBUFS, -EAGAIN):
                        return (WAIT_CHUNK, self.klass)
                    raise UpipeError(f"alloc failed: {os.strerror(-chunk)}")
                offset = 0
                for part in enc.parts:
                    n = memoryview(part).nbytes
                    seg.copy_into_chunk(chunk, part, n, offset)
                    offset += n
                self.chunk, self.own_chunk = chunk, True
            rc, done, closed = seg.put_shared(self.todo, self.chunk, enc.nbytes, enc.kind,
                                              enc.meta)
            if rc == -EBUSY and self.lease is not None and not (done | closed):
                # an unacked take's buffer (the frame in hand): put a copy of it instead
                self.seg.end_move(self.lease, moved=False)
                self.lease, self.chunk = None, -1
                return self.attempt()
            if rc < 0:
                raise UpipeError(f"fan-out put failed: {os.strerror(-rc)}")
            if self.lease is not None:
                self.lease.shared = True  # shared from now on: never moved by a put again
            self.sent |= done != 0
            self.todo &= ~(done | closed)
            self.closed |= closed
        if self.todo:
            return (WAIT_WRITABLE, next(iter(_bits(self.todo))))
        self.finish()
        if self.closed:
            raise Closed("put on a closed queue")
        return None

    def finish(self) -> None:
        """Let go of our own hold on the chunk (the rings keep theirs). A buffer from alloc()
        that went into a ring moved there, as a put moves it: our reference goes now (not when
        its views die: a producer allocating its next buffer while the last one is still bound
        to its variable must not hold two), and its views must not be written again."""
        if self.lease is not None:
            self.seg.end_move(self.lease, moved=self.sent)
            if self.sent:
                self.seg.free_chunk(self.chunk)  # the sharing's reference (the lease's no more)
            self.lease = None
        elif self.own_chunk:  # our copy: its reference (shared or not) goes now
            self.seg.free_chunk(self.chunk)
        self.chunk = -1
        self.own_chunk = False

    def block(self, timeout: float | None) -> None:
        """:meth:`attempt` until done, sleeping on the segment in between."""
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        q = next(iter(self.rings.values()))
        try:
            while True:
                wait = self.attempt()
                if wait is None:
                    return
                if not q._block(wait, deadline):
                    if self.attempt() is None:  # one last try past the deadline
                        return
                    raise Full(f"{_full_reason(wait)} after {timeout} s")
        finally:
            self.finish()

    async def wait(self, timeout: float | None) -> None:
        """:meth:`attempt` until done, waiting on the event loop in between."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = self.attempt()
                if wait is None:
                    return
                if not await aio.wait_for_condition(self.seg, wait[0], deadline, wait[1]):
                    if self.attempt() is None:
                        return
                    raise Full(f"{_full_reason(wait)} after {timeout} s")
        finally:
            self.finish()


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _by_segment(queues: Sequence[Queue]) -> list[list[Queue]]:
    """The queues grouped by the segment they are rings of (in order of first appearance)."""
    if not queues:
        raise ValueError("fan-out to no queue at all: give at least one")
    groups: dict[int, list[Queue]] = {}
    for q in queues:
        groups.setdefault(id(q._seg), []).append(q)
    return list(groups.values())


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def fan_out(queues: Sequence[Queue], obj: Any, timeout: float | None = None) -> None:
    """Put obj into every queue, waiting for room (up to ``timeout`` in all). The queues that
    are rings of one segment (a :func:`ring_group`) get one chunk for all of them, not a copy
    each; other segments get a copy each. Raises Full, or Closed once the open ones have it."""
    timeout = _check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    closed = None
    for group in _by_segment(queues):
        try:
            _FanOut(group, obj).block(_remaining(deadline))
        except Closed as exc:
            closed = exc  # the others still get it
    if closed is not None:
        raise closed


async def fan_out_async(queues: Sequence[Queue], obj: Any, timeout: float | None = None) -> None:
    """:func:`fan_out` on the event loop."""
    timeout = _check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    closed = None
    for group in _by_segment(queues):
        try:
            await _FanOut(group, obj).wait(_remaining(deadline))
        except Closed as exc:
            closed = exc
    if closed is not None:
        raise closed


class Queue:
    """A bounded MPMC queue in shared memory, for threads, processes and asyncio alike.

    :param maxsize: most items the queue holds (it is bounded: shared memory is reserved up front).
    :param max_bytes: the pool for items that do not fit in a slot (larger than ``inline_max``,
        about 96 bytes by default), reserved up front.
    :param max_message_size: the largest item; default a quarter of ``max_bytes``, at most 16 MiB.
    :param chunk_sizes: the pool's size classes, or a ``{size: count}`` mapping.
    :param slot_size: bytes per slot (32 of them are the slot's header; the rest holds small items
        inline, with no chunk at all).
    :param spin: seconds a blocking call busy-waits before it sleeps on the futex.
    :raises ShmExhausted: the memory could not be reserved.
    """

    def __init__(
        self,
        maxsize: int = DEFAULT_MAXSIZE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        max_message_size: int | None = None,
        chunk_sizes: Sequence[int] | Mapping[int, int] | None = None,
        slot_size: int = DEFAULT_SLOT_SIZE,
        spin: float = DEFAULT_SPIN,
    ) -> None:
        _check_options(maxsize, max_bytes, max_message_size, slot_size, spin)
        sizes, counts = plan_chunks(max_bytes, max_message_size, chunk_sizes)
        config = SegmentConfig(_capacity_for(maxsize), maxsize, slot_size, sizes, counts)
        _check_memory(segment_size(config), maxsize, slot_size, max_bytes)
        self._setup(Segment.create(config), maxsize, spin)

    def _setup(self, seg: Segment, maxsize: int, spin: float, ring: int = 0) -> None:
        self._seg = seg
        self._ring = ring  # which of the segment's data rings is this queue
        # put() of a buffer that is an unacked take of this segment copies it instead of
        # raising NotOwner (set on a processor's outputs: its input may share their segment).
        self._copy_held = False
        self._maxsize = maxsize
        self._spin = spin
        seg.set_spin(spin)
        self._inline_max = seg.inline_max
        sizes = seg.config.chunk_sizes
        self._max_message_size = sizes[-1] if sizes else seg.inline_max
        self._bufs: list[tuple[Any, Any]] = []
        self._bind_fast_paths()
        seg.on_reattach(self._bind_fast_paths)

    def _bind_fast_paths(self) -> None:
        if self._seg._h is None:  # re-attaching in a fork child failed
            reason = self._seg.broken or UpipeError("this Queue is not attached in this process")
            self._make_unusable(reason)
            return
        self._put_b, self._get_b = self._seg.bytes_fast_paths(self._ring)
        self._bufs = []
        self._take_b, self._ack_b = self._seg.take_fast_paths()
        self._tbufs: list[tuple[Any, Any]] = []

    def _make_unusable(self, reason: Exception) -> None:
        unusable = _Unusable(reason)
        self._put_b = self._get_b = self._take_b = self._ack_b = unusable
        self._bufs = []
        self._tbufs = []
        self._seg = unusable  # type: ignore[assignment]

    # -- sharing with other processes ---------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing.reduction import DupFd

        return (
            _rebuild_queue,
            (tuple(DupFd(fd) for fd in self._seg.fds()), self._seg.config, self._maxsize,
             self._spin, self._ring),
        )

    def export(self) -> tuple[str, tuple[int, int, int]]:
        """A token and the fds a ``subprocess`` child needs to attach with :meth:`attach`.

        Pass the fds with ``subprocess.Popen(..., pass_fds=fds)`` and the token by argument or
        environment variable; the child calls ``upipe.Queue.attach(token)``.
        """
        fds = self._seg.fds()
        c = self._seg.config
        if len(fds) != 3:
            raise UpipeError("export(): only a queue of its own (from Queue()) can be exported")
        sizes = ",".join(f"{s}x{n}" for s, n in zip(c.chunk_sizes, c.nchunks, strict=True))
        token = (
            f"{TOKEN_PREFIX}{fds[0]}:{fds[1]}:{fds[2]}:{self._maxsize}:{c.capacity}:"
            f"{c.slot_size}:{sizes}"
        )
        return token, fds

    @classmethod
    def attach(cls, token: str, spin: float = DEFAULT_SPIN) -> Queue:
        """Attach to a queue from :meth:`export`'s token, in a process that holds its fds."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            raise ValueError(
                f"not a upipe queue token: {token!r}; get one from Queue.export() in the parent"
            )
        try:
            fields = token[len(TOKEN_PREFIX):].split(":")
            memfd, efd_data, efd_space, maxsize, capacity, slot_size = map(int, fields[:6])
            classes = [tuple(map(int, p.split("x"))) for p in fields[6].split(",") if p]
        except (ValueError, IndexError) as exc:
            raise ValueError(f"malformed upipe queue token: {token!r}") from exc
        for fd in (memfd, efd_data, efd_space):
            try:
                os.fstat(fd)
            except OSError:
                raise UpipeError(
                    f"fd {fd} of the queue token is not open in this process: the parent must "
                    "pass the fds, e.g. subprocess.Popen(..., pass_fds=fds) with "
                    "(token, fds) = queue.export()"
                ) from None
        config = SegmentConfig(
            capacity, maxsize, slot_size, tuple(c[0] for c in classes), tuple(c[1] for c in classes)
        )
        q = cls.__new__(cls)
        q._setup(Segment.attach((memfd, efd_data, efd_space), config), maxsize, spin)
        return q

    # -- sync face ----------------------------------------------------------------------------

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put obj, waiting for room if ``block`` (up to ``timeout`` seconds).

        :raises Full: no room (at once if not ``block``, else after ``timeout``).
        :raises Closed: the queue is closed.
        :raises MessageTooLarge: obj is larger than ``max_message_size``.
        """
        if obj.__class__ is bytes and len(obj) <= self._inline_max:
            rc = self._put_b(obj, len(obj))
            if rc == 0:
                return
            if rc == -EPIPE:
                raise Closed("put on a closed queue")
        timeout = _check_timeout(timeout) if block else None
        pending = _PendingPut(self, obj)
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        try:
            while True:
                wait = pending.attempt()
                if wait is None:
                    return
                if not block:
                    raise Full(_full_reason(wait))
                if not self._block(wait, deadline):
                    wait = pending.attempt()
                    if wait is None:
                        return
                    raise Full(f"{_full_reason(wait)} after {timeout} s")
        finally:
            pending.abandon()  # a copy that never went in (Full, Ctrl-C): its chunk goes back

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""
        self.put(obj, False)

    def _block(self, wait: tuple[int, int], deadline: int | None) -> bool:
        """Sleep until the condition may hold. False once the deadline has passed."""
        what, arg = wait
        while True:
            rc = self._seg.wait(what, -1 if deadline is None else deadline, arg)
            if rc == -ETIMEDOUT:
                return False
            if rc == -EINTR:
                continue  # a signal handler ran (and did not raise): keep waiting
            # Ready, or a recovery slice. Past the deadline the caller makes one last try.
            return deadline is None or time.monotonic_ns() < deadline

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an item, waiting for one if ``block`` (up to ``timeout`` seconds).

        :raises Empty: no item (at once if not ``block``, else after ``timeout``).
        :raises Closed: the queue is closed and drained.
        """
        # The small-bytes fast path, inlined here because it is most of the calls; the rest is
        # _try_get's.
        bufs = self._bufs  # one private out-buffer per concurrent caller: threads may share a queue
        out, view = bufs.pop() if bufs else self._seg.new_out_buffer(self._ring)
        n = self._get_b(out)
        if n >= 0:
            data = view[16:16 + n]  # Segment.OUT_DATA
            bufs.append((out, view))
            return data
        bufs.append((out, view))
        item = self._try_get(n)
        if item is not _NOTHING:
            return item
        if not block:
            raise Empty("queue is empty")
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        while True:
            waited = self._block((WAIT_READABLE, self._ring), deadline)
            item = self._try_get()
            if item is not _NOTHING:
                return item
            if not waited:
                raise Empty(f"no item within {timeout} s")

    def _try_get(self, fast_rc: int | None = None) -> Any:
        """One attempt: the item, or _NOTHING if there is none yet. ``fast_rc`` is the result
        of a fast-path attempt the caller already made (so none is made here)."""
        if fast_rc is None:
            bufs = self._bufs
            out, view = bufs.pop() if bufs else self._seg.new_out_buffer(self._ring)
            fast_rc = self._get_b(out)
            if fast_rc >= 0:
                data = view[16:16 + fast_rc]
                bufs.append((out, view))
                return data
            bufs.append((out, view))
        rc = fast_rc
        if rc == -EBADMSG:  # the next item is not small bytes: the general path decodes it
            rc, kind, meta, payload = self._seg.get(self._ring)
            if rc >= 0:
                if kind == codec.KIND_BYTES and payload.__class__ is bytes:
                    return payload
                return codec.decode(kind, meta, payload)
        if rc == -EPIPE:
            raise Closed("the queue is closed and drained")
        if rc not in (-ENOENT, -EAGAIN):
            raise UpipeError(f"get failed: {os.strerror(-rc)}")
        return _NOTHING

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(False)

    # -- at-least-once: take and ack ----------------------------------------------------------

    def take(self, block: bool = True, timeout: float | None = None) -> tuple[Any, Receipt]:
        """Remove and return an item like :meth:`get`, with a receipt: ``(item, receipt)``.
        The item stays in the queue's memory until :meth:`ack` of the receipt; if this process
        dies (or detaches) before that, the item is put back into the queue for another consumer
        (at-least-once delivery: an item is never lost, and may come out twice).

        Every unacked take keeps one of the queue's slots busy (``maxsize`` rounded up to a power
        of two slots in all; 32 unacked takes per process at most), and producers wait once the
        ring wraps round to the slot of an item still held. Ack promptly (docs/api.md, "Take and
        ack").

        :raises Empty: no item (at once if not ``block``, else after ``timeout``).
        :raises Closed: the queue is closed and drained, and no item held by another consumer
            can still come back.
        :raises TooManyTakes: this process already holds 32 unacked takes of this queue.
        """
        got = self._try_take()
        if got is not None:
            return got
        if not block:
            raise Empty("queue is empty")
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        while True:
            waited = self._block((WAIT_READABLE, self._ring), deadline)
            got = self._try_take()
            if got is not None:
                return got
            if not waited:
                raise Empty(f"no item within {timeout} s")

    def _take_token(self) -> tuple[Any, int] | None:
        """:meth:`take` without a wait and without a Receipt object: (item, raw receipt) or
        None if there is no item yet; ack with :meth:`_ack_token`. The pipe's processors read
        their input this way (one C call for small bytes)."""
        tbufs = self._tbufs  # one private buffer per concurrent caller, as get()'s
        buf, view = tbufs.pop() if tbufs else self._seg.new_take_buffer(self._ring)
        rc = self._take_b(buf)  # a C call: it does not raise
        if rc >= 0 and rc >> 32 == _BYTES_NO_META and buf.chunk == NO_CHUNK:
            got = view[48:48 + (rc & 0xFFFFFFFF)], buf.receipt  # Segment.TAKE_DATA
            tbufs.append((buf, view))
            return got
        if rc >= 0:
            try:
                token = int(buf.receipt)
                rc, kind, meta, payload = self._seg.taken_item(rc, buf)
            finally:
                tbufs.append((buf, view))
        else:
            tbufs.append((buf, view))
        if rc < 0:
            return self._take_failed(rc)
        return self._decode_taken(kind, meta, payload, token), token

    @staticmethod
    def _take_failed(rc: int) -> None:
        """A take's error: None for "no item yet" (-ENOENT, -EAGAIN), else raised."""
        if rc == -EPIPE:
            raise Closed("the queue is closed and drained")
        if rc == -EDQUOT:
            raise TooManyTakes(
                f"this process holds {MAX_HOLDS} unacked takes of this queue: ack() some "
                "before taking more"
            )
        if rc not in (-ENOENT, -EAGAIN):
            raise UpipeError(f"take failed: {os.strerror(-rc)}")
        return None

    def _decode_taken(self, kind: int, meta: bytes, payload: Any, token: int) -> Any:
        """A taken item, decoded. One that cannot be decoded is consumed (acked) as get() would
        have; an interrupted decode (Ctrl-C) gives the item back. Either way it is no longer
        held when this raises."""
        try:
            return codec.decode(kind, meta, payload)
        except Exception:
            self._ack_b(token)
            raise
        except BaseException:
            self._seg.nack(token)  # (if there is no room, detach gives it back)
            raise

    def _ack_token(self, token: int) -> None:
        """Ack a raw receipt from :meth:`_take_token`. An item recovery already moved away
        (this process was taken for dead) will come again: nothing to do."""
        rc = self._ack_b(token)
        if rc not in (0, -ESTALE):
            raise UpipeError(f"ack failed: {os.strerror(-rc)}")

    def _try_take(self) -> tuple[Any, Receipt] | None:
        """One attempt: (item, receipt), or None if there is no item yet."""
        got = self._take_token()
        return None if got is None else (got[0], Receipt(self._seg, got[1]))

    async def take_async(self, timeout: float | None = None) -> tuple[Any, Receipt]:
        """:meth:`take`, waiting on the event loop. Cancel-safe: a cancelled take took nothing.

        :raises Empty: no item within ``timeout`` seconds.
        :raises Closed: the queue is closed and drained (as :meth:`take`).
        :raises TooManyTakes: this process already holds 32 unacked takes of this queue.
        """
        got = self._try_take()
        if got is not None:
            return got
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._spin > 0 and self._seg.spin(WAIT_READABLE, min(self._spin, 10e-6), self._ring):
            got = self._try_take()
            if got is not None:
                return got
        while True:
            ok = await aio.wait_for_condition(self._seg, WAIT_READABLE, deadline, self._ring)
            got = self._try_take()
            if got is not None:
                return got
            if not ok:
                raise Empty(f"no item within {timeout} s")

    def ack(self, receipt: Receipt) -> None:
        """Done with the item of a :meth:`take`: its slot goes back to the queue now, and a
        zero-copy item's shared memory once no view of it is left (views stay valid).

        :raises NotOwner: ``receipt`` is not an unacked take of this queue in this process: acked
            already, from another queue or process, or not a :class:`Receipt`.
        """
        seg = self._seg
        if not isinstance(receipt, Receipt):
            raise NotOwner(f"ack() needs the Receipt from take(), not {type(receipt).__name__}")
        if receipt._seg is not seg or receipt._pid != os.getpid():
            if not isinstance(seg, Segment):
                seg.ack  # noqa: B018 - a detached queue: raises why
            raise NotOwner("this receipt is not from a take() on this queue in this process")
        rc = seg.ack(receipt._token)
        if rc == 0:
            return
        if rc == -ENOENT:
            raise NotOwner("this receipt was already acked")
        if rc == -ESTALE:
            raise UpipeError(
                "ack: the item had already been put back into the queue (recovery took this "
                "process for dead); it will be delivered again"
            )
        raise UpipeError(f"ack failed: {os.strerror(-rc)}")

    def put_many(
        self, items: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every item, in order; runs of small ``bytes`` go in with one call each.

        :raises Full: not everything fit in time; ``exc.count`` items went in (a prefix).
        :raises Closed: the queue is closed.
        """
        items = items if isinstance(items, list) else list(items)
        total = len(items)
        done = 0
        inline_max = self._inline_max
        # The common case, a list of small bytes, is one run checked and joined at C speed (the
        # C side refuses, with -EMSGSIZE, a run with an item too large for a slot).
        if total and set(map(type, items)) == {bytes}:
            lens = array("I", map(len, items))
            joined = b"".join(items)
            rc = self._seg.put_many_inline(joined, lens, 0, 0, total, codec.KIND_BYTES,
                                           self._ring)
            if rc == total:
                return
            run_start, run_end = 0, (0 if rc == -EMSGSIZE else total)
            done = max(rc, 0)
            offset = sum(lens[:done])
            if rc == -EPIPE:
                raise Closed("put on a closed queue")
        else:
            lens, joined, run_start, run_end, offset = array("I"), b"", 0, 0, 0
        timeout = _check_timeout(timeout) if block else None
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        while done < total:
            if done >= run_end:  # find the next run of small bytes items, if one starts here
                end = done
                while end < total and end - done < 4096:
                    it = items[end]
                    if it.__class__ is not bytes or len(it) > inline_max:
                        break
                    end += 1
                if end > done:
                    run = items[done:end]
                    lens = array("I", map(len, run))
                    joined, run_start, run_end, offset = b"".join(run), done, end, 0
            if done < run_end:
                rc = self._seg.put_many_inline(joined, lens, done - run_start, offset,
                                               run_end - done, codec.KIND_BYTES, self._ring)
                if rc > 0:
                    offset += sum(lens[done - run_start:done - run_start + rc])
                    done += rc
                    continue
                if rc == -EPIPE:
                    raise Closed("put on a closed queue")
                if rc != -ENOBUFS:
                    raise UpipeError(f"put_many failed: {os.strerror(-rc)}")
                wait: tuple[int, int] = (WAIT_WRITABLE, self._ring)
            else:
                pending = _PendingPut(self, items[done])
                attempt = pending.attempt()
                if attempt is None:
                    done += 1
                    continue
                pending.abandon()
                wait = attempt
            if not block:
                raise Full(f"queue is full after {done} of {total} items", count=done)
            if not self._block(wait, deadline):
                raise Full(f"queue still full after {timeout} s; {done} of {total} items put",
                           count=done)

    def get_many(self, max_items: int = 1024, block: bool = True,
                 timeout: float | None = None) -> list[Any]:
        """Remove and return 1 to ``max_items`` items, waiting (if ``block``) only for the first.

        :raises Empty: no item (at once if not ``block``, else after ``timeout``).
        :raises Closed: the queue is closed and drained.
        """
        _check_positive_int("max_items", max_items)
        out: list[Any] = []
        first = True
        while len(out) < max_items:
            rc, data, ends = self._seg.get_many_inline(codec.KIND_BYTES, max_items - len(out),
                                                       self._ring)
            if rc > 0:
                if isinstance(ends, int):  # all the same length: split at C speed
                    out += _split_uniform(data, ends, rc)
                else:
                    starts = [0]
                    starts += ends[:-1]
                    out += [data[a:b] for a, b in zip(starts, ends, strict=True)]
                first = False
                continue
            if rc == -EBADMSG:  # the next item is not a small bytes: take it the general way
                try:
                    out.append(self.get(False))
                except (Empty, Closed):
                    if out:
                        return out  # another consumer took it: keep what we have
                    if not block:
                        raise
                    out.append(self.get(True, timeout))  # waits, or raises Empty / Closed
                first = False
                continue
            if out:
                return out
            if first:
                out.append(self.get(block, timeout))  # raises Empty / Closed
                first = False
                continue
            break
        return out

    def qsize(self) -> int:
        """Items in the queue now (a snapshot: others may be changing it)."""
        return self._seg.count(self._ring)

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.qsize() >= self._maxsize

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def inline_max(self) -> int:
        """Items up to this many bytes travel inside the slot, with no chunk at all."""
        return self._inline_max

    @property
    def max_message_size(self) -> int:
        return self._max_message_size

    @property
    def closed(self) -> bool:
        return self._seg.stats(self._ring).closed

    def close(self) -> None:
        """End of stream, for every process: puts raise :class:`Closed` from now on; gets drain
        what is left, then raise :class:`Closed`; ``async for`` / ``for`` loops end. Waiters in
        every process wake. Idempotent.
        """
        self._seg.close(self._ring)

    def shutdown(self, immediate: bool = False) -> None:
        """:meth:`close` (``asyncio.Queue.shutdown`` spelling); ``immediate`` also drops what is
        queued."""
        self.close()
        if immediate:
            try:
                while True:
                    self.get_nowait()
            except (Empty, Closed):
                pass

    def __iter__(self) -> Iterator[Any]:
        """Yield items until the queue is closed and drained."""
        while True:
            try:
                yield self.get()
            except Closed:
                return

    # -- zero copy ----------------------------------------------------------------------------

    def alloc(
        self, nbytes: int, block: bool = True, timeout: float | None = None
    ) -> memoryview:
        """A writable buffer of ``nbytes`` in shared memory; ``put`` of it moves no payload.

        Waits for a free chunk if ``block`` (up to ``timeout`` seconds), like :meth:`put` waits
        for room: chunks come back as consumers drop or release what they got.
        After the put it belongs to the queue: do not write it again. It is freed when the last
        reference to it dies, or at once by :meth:`release`.

        :raises MessageTooLarge: larger than ``max_message_size``.
        :raises Full: no free chunk of that size (at once if not ``block``, else after
            ``timeout``): they are all in the queue or held.
        :raises Closed: the queue is closed and a wait would be needed (no put would take the
            buffer).
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        seg = self._seg
        chunk = seg.alloc(nbytes or 1)
        if chunk >= 0:
            return seg.lease_view(chunk, nbytes, readonly=False)
        if chunk == -EMSGSIZE:
            raise MessageTooLarge(
                f"alloc({nbytes}) is larger than max_message_size={self._max_message_size}: "
                "create the Queue with a larger max_message_size"
            )
        timeout = _check_timeout(timeout) if block else None
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        wait = (WAIT_CHUNK, seg.class_for(nbytes or 1))
        while True:
            if not block:
                raise Full(
                    f"no free chunk of {nbytes} bytes: release buffers you hold or raise max_bytes"
                )
            if seg.is_closed(self._ring):  # waiting for a buffer that no put would take
                raise Closed("alloc on a closed queue")
            waited = self._block(wait, deadline)
            chunk = seg.alloc(nbytes or 1)
            if chunk >= 0:
                return seg.lease_view(chunk, nbytes, readonly=False)
            if not waited:
                raise Full(
                    f"no free chunk of {nbytes} bytes after {timeout} s: release buffers you "
                    "hold or raise max_bytes"
                )

    def alloc_array(
        self,
        shape: int | Sequence[int],
        dtype: Any = "float64",
        block: bool = True,
        timeout: float | None = None,
    ) -> np.ndarray:
        """A writable ndarray in shared memory (see :meth:`alloc`)."""
        import numpy as np

        dt = dtype if dtype.__class__ is np.dtype else np.dtype(dtype)
        if not codec.plain_dtype(dt):
            raise ValueError(f"alloc_array needs a plain dtype (no objects or fields), got {dt}")
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shp):
            raise ValueError(f"shape must be ints >= 0, got {shape!r}")
        buf = self.alloc(math.prod(shp) * dt.itemsize, block, timeout)
        return np.frombuffer(buf, dtype=dt).reshape(shp)

    def release(self, obj: Any) -> None:
        """Free the shared memory behind obj (from :meth:`alloc`, :meth:`alloc_array` or a get)
        now, instead of when its last reference dies. Views of it must not be used afterwards
        (they read recycled memory; they never crash).

        :raises NotOwner: obj is not a buffer this process holds in this queue.
        """
        lease = self._seg.lease_for(obj)
        if lease is None or not self._seg.release_lease(lease):
            raise NotOwner(
                "release(): not a buffer this process holds in this queue (already put, "
                "released, or not from alloc()/get())"
            )

    # -- async face ---------------------------------------------------------------------------

    async def put_async(self, obj: Any, timeout: float | None = None) -> None:
        """Put obj, waiting on the event loop for room. Cancel-safe: a cancelled put put nothing.

        :raises Full: still no room after ``timeout`` seconds.
        :raises Closed: the queue is closed.
        """
        await self._put_async(obj, timeout, None)

    async def _put_async(self, obj: Any, timeout: float | None,
                         before_wait: Callable[[], None] | None) -> None:
        """:meth:`put_async`, calling ``before_wait()`` once if it has to wait (the pipe's
        processors count their time under back-pressure so, without encoding obj twice)."""
        if obj.__class__ is bytes and len(obj) <= self._inline_max:  # put's fast path
            rc = self._put_b(obj, len(obj))
            if rc == 0:
                return
            if rc == -EPIPE:
                raise Closed("put on a closed queue")
        timeout = _check_timeout(timeout)
        pending = _PendingPut(self, obj)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = pending.attempt()
                if wait is None:
                    return
                if before_wait is not None:
                    before_wait()
                    before_wait = None
                if not await aio.wait_for_condition(self._seg, wait[0], deadline, wait[1]):
                    last = pending.attempt()
                    if last is None:
                        return
                    raise Full(f"{_full_reason(last)} after {timeout} s")
        finally:
            pending.abandon()

    async def get_async(self, timeout: float | None = None) -> Any:
        """Remove and return an item, waiting on the event loop. Cancel-safe: a cancelled get
        took nothing.

        :raises Empty: no item within ``timeout`` seconds.
        :raises Closed: the queue is closed and drained.
        """
        try:
            return self.get(False)
        except Empty:
            pass
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._spin > 0 and self._seg.spin(WAIT_READABLE, min(self._spin, 10e-6), self._ring):
            try:
                return self.get(False)
            except Empty:
                pass
        while True:
            ok = await aio.wait_for_condition(self._seg, WAIT_READABLE, deadline, self._ring)
            try:
                return self.get(False)
            except Empty:
                if not ok:
                    raise Empty(f"no item within {timeout} s") from None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        while True:
            try:
                item = await self.get_async()
            except Closed:
                return
            yield item

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> QueueStatistics:
        st = self._seg.stats(self._ring)
        return QueueStatistics(
            maxsize=self._maxsize, qsize=st.count, closed=st.closed, inline_max=st.inline_max,
            max_message_size=self._max_message_size, chunk_classes=st.chunk_classes,
            attached_processes=st.attached_processes, recoveries=st.recoveries,
            reclaimed_chunks=st.reclaimed_chunks, lost_items=st.lost_items + st.lost_leases,
            lost_leases=st.lost_leases, aborted_puts=st.aborted_puts,
            segment_bytes=st.segment_bytes, redelivered=st.redelivered,
        )

    def recover(self) -> int:
        """Repair what dead processes left half-done now (blocked calls do it by themselves every
        0.1 s). Returns how many dead processes were found."""
        return max(0, self._seg.recover())

    def detach(self) -> None:
        """Let go of the queue in this process (the shared memory goes with the last process).
        Using the queue afterwards raises :class:`UpipeError`."""
        seg = self._seg
        if isinstance(seg, Segment):
            seg.detach()
        self._make_unusable(UpipeError("this Queue was detached from this process"))

    def __repr__(self) -> str:
        return f"<upipe.Queue maxsize={self._maxsize} inline_max={self._inline_max}>"


def _split_uniform(data: bytes, length: int, n: int) -> list[bytes]:
    """n bytes objects of ``length`` bytes each, cut from data (numpy's void dtype keeps every
    byte, trailing zeros included, and builds the list in C)."""
    if length == 0:
        return [b""] * n
    import numpy as np

    items: list[bytes] = np.frombuffer(data, dtype=f"V{length}").tolist()
    return items


def _full_reason(wait: tuple[int, int]) -> str:
    if wait[0] == WAIT_CHUNK:
        return "the queue's chunk pool is exhausted (release held buffers or raise max_bytes)"
    return "queue is full"


class _Unusable:
    """Stands in for the segment of a Queue this process can no longer use (detached, or its
    re-attachment after fork failed): every use raises why."""

    def __init__(self, reason: Exception) -> None:
        self._reason = reason

    def __getattr__(self, name: str) -> Any:
        raise type(self._reason)(str(self._reason))

    def __call__(self, *_: Any) -> Any:
        raise type(self._reason)(str(self._reason))


def _capacity_for(maxsize: int) -> int:
    capacity = 2
    while capacity < maxsize:
        capacity *= 2
    return capacity


def ring_group(options: Sequence[Mapping[str, Any]]) -> list[Queue]:
    """Queues that are rings of one segment, one per ``options`` entry (``Queue(**options)``
    keywords: maxsize, max_bytes, max_message_size): the inputs of processors that share an
    upstream, so a frame fanned out to all of them is one chunk with no copy
    (:meth:`Queue._put_shared`). The chunk pool is the members' ``max_bytes`` together."""
    if not 1 <= len(options) <= MAX_RINGS:
        raise ValueError(f"a ring group has 1 to {MAX_RINGS} queues, got {len(options)}")
    for opts in options:  # each as valid as a Queue of its own (same errors, same messages)
        if not isinstance(opts, Mapping):
            raise TypeError(f"ring_group: each member is a dict of Queue options, got {opts!r}")
        unknown = set(opts) - {"maxsize", "max_bytes", "max_message_size"}
        if unknown:
            raise TypeError(f"ring_group: unknown queue options {sorted(unknown)}")
        _check_options(opts.get("maxsize", DEFAULT_MAXSIZE),
                       opts.get("max_bytes", DEFAULT_MAX_BYTES), opts.get("max_message_size"),
                       DEFAULT_SLOT_SIZE, DEFAULT_SPIN)
    maxsizes = [int(o.get("maxsize", DEFAULT_MAXSIZE)) for o in options]
    max_bytes = sum(int(o.get("max_bytes", DEFAULT_MAX_BYTES)) for o in options)
    messages = [int(o["max_message_size"]) for o in options
                if o.get("max_message_size") is not None]
    max_message_size = max(messages) if messages else None
    if max_message_size is not None and max_message_size > max_bytes:
        raise ValueError(f"max_message_size={max_message_size} is larger than max_bytes="
                         f"{max_bytes}: raise max_bytes")
    sizes, counts = plan_chunks(max_bytes, max_message_size, None)
    config = SegmentConfig(_capacity_for(max(maxsizes)), max(maxsizes), DEFAULT_SLOT_SIZE,
                           sizes, counts, tuple(maxsizes))
    _check_memory(segment_size(config), max(maxsizes) * len(maxsizes), DEFAULT_SLOT_SIZE,
                  max_bytes)
    seg = Segment.create(config)
    queues = [ring_queue(seg, i, m) for i, m in enumerate(maxsizes)]
    seg.detach()  # the queues hold it now
    return queues


def _rebuild_queue(
    dupfds: tuple[Any, ...], config: SegmentConfig, maxsize: int, spin: float, ring: int
) -> Queue:
    fds = [d.detach() for d in dupfds]
    try:
        return attach_fds(tuple(fds), (config, maxsize, spin, ring))
    finally:
        for fd in fds:
            os.close(fd)


QueueShape = tuple[SegmentConfig, int, float, int]
"""What, besides its segment's fds, a process needs to attach to a queue (see :func:`share`):
the segment's shape, maxsize, spin, and which ring of the segment the queue is."""


def share(q: Queue) -> tuple[tuple[int, ...], QueueShape]:
    """The queue's fds (the memfd, then two eventfds per ring of its segment; still owned by q)
    and its shape: send both to another process (e.g. ``socket.send_fds``) and call
    :func:`attach_fds` there. Used by the pipe's control plane."""
    return q._seg.fds(), (q._seg.config, q._maxsize, q._spin, q._ring)


def attach_fds(fds: Sequence[int], shape: QueueShape, seg: Segment | None = None) -> Queue:
    """Attach to a queue from its fds and shape (from :func:`share`); the fds stay the
    caller's (the segment duplicates what it keeps). ``seg``: this process's attachment to
    the same segment already (another ring of it), used instead of attaching again."""
    config, maxsize, spin, ring = shape
    q = Queue.__new__(Queue)
    q._setup(seg.add_user() if seg is not None else Segment.attach(fds, config), maxsize, spin,
             ring)
    return q


def ring_queue(seg: Segment, ring: int, maxsize: int, spin: float = DEFAULT_SPIN) -> Queue:
    """A queue over ring ``ring`` of a segment this process holds (the pipe's fan-out groups:
    several processors' inputs in one segment, so one chunk can reach all of them)."""
    q = Queue.__new__(Queue)
    q._setup(seg.add_user(), maxsize, spin, ring)
    return q


