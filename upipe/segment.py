"""One shared-memory segment, as seen from one process.

Facts this module depends on:

* The segment is an anonymous ``memfd`` (no name in ``/dev/shm``, so nothing can leak there); it
  lives while any process maps it or holds its fd. Two eventfds per data ring travel with it:
  "data" (rung when an item is published and an async consumer waits) and "space" (a slot was
  freed and an async producer waits; ring 0's also for a freed chunk). Eventfds are per-process
  fds, not shared memory: they reach another process only by inheritance or fd passing,
  exactly like the memfd.
* The C handle is reference counted. The :class:`Segment` holds one reference and every zero-copy
  view holds one more (through its lease), so the mapping outlives every view: a view used after
  ``release()`` reads recycled bytes, never unmapped memory.
* A chunk has exactly one holder, except a fan-out's (``put_shared``), which its holders share
  (read-only) and the core frees with the last. ``put`` of a leased chunk moves it to the queue;
  the lease is then spent and its views must not be written (they may be reused by the
  consumer's pool).
* After ``fork()`` the child must not use the parent's process-table entry: every live segment
  re-attaches in the child (``os.register_at_fork``), and leases do not cross the fork.

This module and :mod:`upipe._ffi` are the only ones that touch ``ffi`` / ``lib``.
"""

from __future__ import annotations

import errno
import functools
import multiprocessing.util
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import errors
from ._ffi import ffi, lib, raise_for

NO_CHUNK = 0xFFFFFFFF
WAIT_READABLE = int(lib.UPIPE_WAIT_READABLE)
WAIT_WRITABLE = int(lib.UPIPE_WAIT_WRITABLE)
WAIT_CHUNK = int(lib.UPIPE_WAIT_CHUNK)
MAX_CLASSES = int(lib.UPIPE_MAX_CLASSES)
SLOT_HEADER = int(lib.UPIPE_SLOT_HEADER)
MAX_ACTORS = int(lib.UPIPE_MAX_ACTORS)
MAX_RINGS = int(lib.UPIPE_MAX_DATA_RINGS)

# Lease states. MOVING: a put of it is under way (in one thread; others see it as not held).
_HELD, _MOVED, _RELEASED, _MOVING = 0, 1, 2, 3


@dataclass(frozen=True)
class SegmentConfig:
    """What the creator asked for; enough for an attacher to rebuild its view."""

    capacity: int
    limit: int
    slot_size: int
    chunk_sizes: tuple[int, ...]
    nchunks: tuple[int, ...]
    #: Most items in each data ring (one entry per ring; 0 means ``limit``). A segment has
    #: one ring unless it holds the inputs of several processors (the pipe's fan-out groups).
    ring_limits: tuple[int, ...] = (0,)

    @property
    def nrings(self) -> int:
        return len(self.ring_limits)

    def to_c(self) -> Any:
        """The ``struct upipe_config`` for this shape."""
        cfg = ffi.new("struct upipe_config *")
        cfg.ndata_rings = self.nrings
        cfg.slot_size = self.slot_size
        cfg.capacity = self.capacity
        cfg.limit = self.limit
        cfg.nclasses = len(self.chunk_sizes)
        for i, (size, count) in enumerate(zip(self.chunk_sizes, self.nchunks, strict=True)):
            cfg.chunk_size[i] = size
            cfg.nchunks[i] = count
        for i, limit in enumerate(self.ring_limits):
            cfg.ring_limit[i] = limit
        return cfg


@dataclass(frozen=True)
class SegmentStats:
    capacity: int
    count: int
    closed: bool
    inline_max: int
    aborted_puts: int
    lost_items: int
    tombstones_skipped: int
    recoveries: int
    reclaimed_chunks: int
    lost_leases: int
    redelivered: int
    attached_processes: int
    chunk_classes: tuple[tuple[int, int, int], ...]  # (chunk size, total, free)
    segment_bytes: int


class Lease:
    """This process's hold on one chunk. Alive while any view of it is alive."""

    __slots__ = ("chunk", "state", "shared", "__weakref__")

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.state = _HELD
        self.shared = False  # a fan-out's chunk: other processes read it too (never moved)


_live_segments: weakref.WeakSet[Segment] = weakref.WeakSet()


def _reattach_all_after_fork() -> None:
    for seg in list(_live_segments):
        seg._reattach_in_child()


os.register_at_fork(after_in_child=_reattach_all_after_fork)


def _detach_all_at_exit() -> None:
    """multiprocessing children leave with os._exit, skipping finalizers: leave the process
    tables cleanly first, so a normal exit is not recovered (and counted) as a crash."""
    for seg in list(_live_segments):
        if seg._h is not None and seg.pid == os.getpid():
            lib.upipe_detach_now(seg._h)


class _ExitHookAnchor:
    pass


_exit_anchor = _ExitHookAnchor()


def _install_exit_hook(_: object = None) -> None:
    # exitpriority >= 0: multiprocessing's _exit_function runs it before os._exit. The finalizer
    # registry is cleared in every new child, so an after-fork hook installs it again.
    multiprocessing.util.Finalize(None, _detach_all_at_exit, exitpriority=0)


_install_exit_hook()
multiprocessing.util.register_after_fork(_exit_anchor, _install_exit_hook)


class Segment:
    """A mapped upipe segment and this process's attachment to it."""

    def __init__(self, handle: Any, config: SegmentConfig) -> None:
        self._h = handle  # cdata owned through ffi.gc -> upipe_handle_unref
        self.broken: Exception | None = None  # why this process can no longer use it
        self.config = config
        self.pid = os.getpid()
        self._leases: dict[int, Lease] = {}
        self._lock = threading.RLock()
        self.inline_max = int(lib.upipe_inline_max(handle, 0))
        self._get_buffers: list[tuple[Any, Any]] = []
        self._get1_buffers: list[tuple[Any, Any]] = []
        self._reattach_callbacks: list[weakref.WeakMethod[Callable[[], None]]] = []
        self._efds = self._read_efds()
        self._users = 1  # queues over this attachment (one per ring): detach() at the last
        _live_segments.add(self)

    # -- creation and attachment ------------------------------------------------------------

    def _read_efds(self) -> list[int]:
        h = self._h
        return [int(lib.upipe_fd(h, i)) for i in range(1, int(lib.upipe_nfds(h)))]

    def efd(self, what: int, arg: int = 0) -> int:
        """The eventfd a waiter for this condition listens on: each data ring has one for data
        and one for space; a free chunk rings ring 0's space."""
        if what == WAIT_READABLE:
            return self._efds[2 * arg]
        return self._efds[2 * arg + 1] if what == WAIT_WRITABLE else self._efds[1]

    @classmethod
    def create(cls, config: SegmentConfig) -> Segment:
        out = ffi.new("upipe_handle **")
        rc = lib.upipe_create(config.to_c(), out)
        if rc < 0:
            raise_for(rc, "creating the shared-memory segment")
        return cls(ffi.gc(out[0], lib.upipe_handle_unref), config)

    @classmethod
    def attach(cls, fds: Sequence[int], config: SegmentConfig, timeout: float = 5.0) -> Segment:
        """Attach to a segment from its fds, as :meth:`fds` lists them (duplicated: the caller
        keeps its own)."""
        out = ffi.new("upipe_handle **")
        efds = ffi.new("int[]", list(fds[1:]))
        rc = lib.upipe_attach_fds(fds[0], efds, len(fds) - 1, int(timeout * 1e9), out)
        if rc < 0:
            raise_for(rc, "attaching to the shared-memory segment")
        return cls(ffi.gc(out[0], lib.upipe_handle_unref), config)

    def fds(self) -> tuple[int, ...]:
        """The memfd, then the eventfds (two per ring), as this process numbers them."""
        return (int(lib.upipe_fd(self._h, 0)), *self._efds)

    def _reattach_in_child(self) -> None:
        # The parent's handle names the parent's table entry: never unref it here (that would
        # detach the parent). Its malloc'd struct is simply abandoned in the child.
        old = self._h
        if old is None:
            return
        out = ffi.new("upipe_handle **")
        efds = ffi.new("int[]", self._efds)
        rc = lib.upipe_attach_fds(lib.upipe_fd(old, 0), efds, len(self._efds), int(5e9), out)
        ffi.gc(old, None)  # drop the destructor: unref would detach the parent's entry
        if rc < 0:
            self._h = None
            try:
                raise_for(rc, "re-attaching to the queue in a forked child")
            except Exception as exc:  # kept, and raised when the queue is used
                self.broken = exc
            for ref in self._reattach_callbacks:
                cb = ref()
                if cb is not None:
                    cb()
            return
        self._h = ffi.gc(out[0], lib.upipe_handle_unref)
        self.pid = os.getpid()
        self._leases = {}
        self._lock = threading.RLock()
        self._get_buffers = []
        self._get1_buffers = []
        self._efds = self._read_efds()
        for ref in self._reattach_callbacks:
            cb = ref()
            if cb is not None:
                cb()

    def set_spin(self, seconds: float) -> None:
        lib.upipe_set_spin(self._h, int(seconds * 1e9))

    # -- items --------------------------------------------------------------------------------

    def put_inline(self, data: Any, kind: int, meta: bytes = b"", ring: int = 0) -> int:
        """Copy a small payload (bytes or any buffer) into a slot. Returns 0 or -errno."""
        if data.__class__ is not bytes:
            data = ffi.from_buffer(data)
        return int(lib.upipe_put(self._h, ring, data, len(data), kind, meta, len(meta)))

    def bytes_fast_paths(
        self, ring: int = 0
    ) -> tuple[Callable[[bytes, int], int], Callable[[Any], int]]:
        """The C calls behind the queue's small-``bytes`` fast path:
        ``put(data, len) -> 0 | -errno`` (handle bound) and ``get(buf) -> len | -errno`` where
        buf, from :meth:`new_out_buffer`, carries the handle itself (one argument to convert);
        -EBADMSG means the next item needs the general path.
        Bound to this process's attachment: fetch them again after :meth:`on_reattach` fires.
        """
        return functools.partial(lib.upipe_put_bytes, self._h, ring), lib.upipe_get_into

    #: Offset of the payload in a buffer from new_out_buffer (after the handle and capacity).
    OUT_DATA = 16
    #: Offset of the payload in a buffer from new_take_buffer (handle, cap, chunk, receipt,
    #: ring, held, item).
    TAKE_DATA = 48

    def take_fast_paths(self) -> tuple[Callable[[Any], int], Callable[[int], int]]:
        """The C calls behind :meth:`upipe.Queue` take/ack fast paths: ``take(buf) -> rc``
        (rc as :meth:`take`'s; buf from :meth:`new_take_buffer` carries the handle, and gets the
        chunk and receipt back) and ``ack(receipt) -> 0 | -errno`` (handle bound)."""
        return lib.upipe_take_into, functools.partial(lib.upipe_ack, self._h)

    @staticmethod
    def take_next_fast_path() -> Callable[[Any], int]:
        """``take_next(buf) -> n | -errno``: ack ``buf.held``, then take the next item (see
        upipe_take_next): n, the length of plain bytes at ``view[TAKE_DATA:]``; -EBADMSG for
        an item of another shape (decode it with :meth:`taken_item` from ``buf.item``)."""
        take_next: Callable[[Any], int] = lib.upipe_take_next
        return take_next

    def new_take_buffer(self, ring: int = 0) -> tuple[Any, Any]:
        """(buf, view) for one thread's fast-path take, as :meth:`new_out_buffer`: an inline
        payload of length n is ``view[TAKE_DATA:TAKE_DATA + n]`` (after meta_len meta bytes)."""
        raw = ffi.new("char[]", self.TAKE_DATA + self.inline_max)
        buf = ffi.cast("struct upipe_takebuf *", raw)
        handle = ffi.cast("upipe_handle *", self._h)
        lib.upipe_handle_ref(handle)
        buf.h = handle
        buf.cap = self.inline_max
        buf.ring = ring
        pid = os.getpid()

        def unref(_buf: Any, raw: Any = raw) -> None:  # raw: the memory lives as long as buf
            if os.getpid() == pid:
                lib.upipe_handle_unref(handle)

        return ffi.gc(buf, unref), ffi.buffer(raw)

    def taken_item(self, rc: int, buf: Any) -> tuple[int, int, bytes, Any]:
        """(rc, kind, meta, payload) of what a fast-path take put in buf, for any shape."""
        return self._item(rc, buf.data, buf.chunk)

    def new_out_buffer(self, ring: int = 0) -> tuple[Any, Any]:
        """(buf, view): a private buffer for one thread's fast-path get, and a bytes view of it:
        the payload of a get that returned n is ``view[OUT_DATA:OUT_DATA + n]``. The buffer
        holds a C reference to the handle, so a detach cannot pull the mapping from under it."""
        raw = ffi.new("char[]", self.OUT_DATA + self.inline_max)
        buf = ffi.cast("struct upipe_getbuf *", raw)
        handle = ffi.cast("upipe_handle *", self._h)
        lib.upipe_handle_ref(handle)
        buf.h = handle
        buf.cap = self.inline_max
        buf.ring = ring
        pid = os.getpid()

        def unref(_buf: Any, raw: Any = raw) -> None:  # raw: the memory lives as long as buf
            if os.getpid() == pid:  # never a fork parent's handle, from a child
                lib.upipe_handle_unref(handle)

        return ffi.gc(buf, unref), ffi.buffer(raw)

    def on_reattach(self, callback: Callable[[], None]) -> None:
        """Call back (weakly held bound method) after this segment re-attached in a fork child."""
        self._reattach_callbacks.append(weakref.WeakMethod(callback))

    def put_many_inline(
        self, data: bytes, lens: Any, first: int, byte_offset: int, n: int, kind: int,
        ring: int = 0,
    ) -> int:
        """Copy items first..first+n-1 of a run: payloads concatenated in data (item ``first``
        at ``byte_offset``), lengths in lens (an array('I') of the whole run). Returns how many
        went in (a prefix), or -errno."""
        data_ptr = ffi.from_buffer(data) + byte_offset
        lens_ptr = ffi.from_buffer("uint32_t[]", lens) + first
        return int(lib.upipe_put_many(self._h, ring, data_ptr, lens_ptr, n, kind))

    def put_chunk(self, chunk: int, nbytes: int, kind: int, meta: bytes, ring: int = 0) -> int:
        return int(lib.upipe_put_chunk(self._h, ring, chunk, nbytes, kind, meta, len(meta)))

    def put_shared(self, rings: int, chunk: int, nbytes: int, kind: int,
                   meta: bytes) -> tuple[int, int, int]:
        """Put one chunk into every ring whose bit is set in ``rings``, with no copy (see
        upipe_put_shared): (rc, rings done, rings closed). The chunk stays held by this
        process too, until :meth:`free_chunk`."""
        out = ffi.new("uint64_t[2]")
        rc = int(lib.upipe_put_shared(self._h, rings, chunk, nbytes, kind, meta, len(meta),
                                      out, out + 1))
        return rc, int(out[0]), int(out[1])

    def chunk_shared(self, chunk: int) -> bool:
        return bool(lib.upipe_chunk_shared(self._h, chunk))

    def get(self, ring: int = 0) -> tuple[int, int, bytes, Any]:
        """Take one item: (rc, kind, meta, payload). rc < 0 is -errno and the rest is empty.

        The payload is ``bytes`` for an inline item, or a :class:`Lease`-backed read-only
        ``memoryview`` of the chunk for a chunk item.
        """
        try:
            out, chunk_out = self._get1_buffers.pop()
        except IndexError:
            out = ffi.new("char[]", self.inline_max)
            chunk_out = ffi.new("uint32_t *")
        try:
            rc = int(lib.upipe_get(self._h, ring, out, self.inline_max, chunk_out))
            if rc < 0:
                return rc, 0, b"", None
            return self._item(rc, out, chunk_out[0])
        finally:
            self._get1_buffers.append((out, chunk_out))

    def _item(self, rc: int, out: Any, chunk: int) -> tuple[int, int, bytes, Any]:
        n = rc & 0xFFFFFFFF
        mlen = (rc >> 32) & 0xFFFF
        kind = rc >> 48
        if chunk == NO_CHUNK:
            raw = ffi.unpack(out, mlen + n)
            if mlen:
                return rc, kind, raw[:mlen], raw[mlen:]
            return rc, kind, b"", raw
        meta = ffi.unpack(out, mlen) if mlen else b""
        return rc, kind, meta, self.lease_view(chunk, n, readonly=True,
                                               shared=self.chunk_shared(chunk))

    def ack(self, receipt: int) -> int:
        """Release a take's slot: 0, -ENOENT (not an unacked receipt of this attachment) or
        -ESTALE (recovery had moved the item away)."""
        return int(lib.upipe_ack(self._h, receipt))

    def nack(self, receipt: int) -> int:
        """Give a take back to the queue now: 0, -ENOENT, or -ENOBUFS (no room yet: still held)."""
        return int(lib.upipe_nack(self._h, receipt))

    #: Most items one get_many call takes (its buffers are allocated once per thread).
    GET_MANY_MAX = 1024

    def get_many_inline(
        self, kind: int, max_items: int, ring: int = 0
    ) -> tuple[int, bytes, list[int] | int]:
        """Take a run of up to max_items inline items of this kind: (rc, joined data, ends),
        where ends is the common item length (an int) when every item has the same length,
        else the list of end offsets."""
        cap = max(1, min(max_items, self.GET_MANY_MAX))
        pool = self._get_buffers
        if pool:
            out, ends = pool.pop()
        else:
            out = ffi.new("char[]", self.GET_MANY_MAX * self.inline_max)
            ends = ffi.new("uint32_t[]", self.GET_MANY_MAX)
        try:
            rc = int(lib.upipe_get_many(self._h, ring, kind, out, cap * self.inline_max, ends,
                                        cap))
            if rc <= 0:
                return rc, b"", []
            same = int(lib.upipe_uniform_length(ends, rc))
            if same != 0xFFFFFFFF:
                return rc, ffi.unpack(out, same * rc), same
            ends_list: list[int] = ffi.unpack(ends, rc)
            return rc, ffi.unpack(out, ends_list[-1]), ends_list
        finally:
            pool.append((out, ends))

    # -- chunks -------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        """Take a free chunk of at least nbytes: its id, or -errno (-ENOBUFS, -EMSGSIZE)."""
        out = ffi.new("uint32_t *")
        rc = int(lib.upipe_alloc(self._h, nbytes, out))
        return rc if rc < 0 else int(out[0])

    def class_for(self, nbytes: int) -> int:
        return int(lib.upipe_class_for(self._h, nbytes))

    def lease_view(self, chunk: int, nbytes: int, readonly: bool,
                   shared: bool = False) -> memoryview:
        """A view of the first nbytes of a chunk this process holds; frees it when unreferenced.
        A shared chunk (a fan-out) is seen by other processes too: its view is read-only."""
        lease = Lease(chunk)
        lease.shared = shared  # the core counts it as one of this process's references
        ptr = lib.upipe_chunk_ptr(self._h, chunk)
        # The view holds a C reference on the handle, so the mapping outlives it even through
        # detach(); the raw pointer is what this lease frees and unrefs through.
        raw = ffi.cast("upipe_handle *", self._h)
        lib.upipe_handle_ref(raw)
        pid = os.getpid()
        seg = self
        key: list[int] = []

        def done(_ptr: Any, lease: Lease = lease) -> None:
            # Runs when the last view is gone.
            with seg._lock:
                held = lease.state == _HELD
                lease.state = _RELEASED
                seg._leases.pop(key[0], None)
            if os.getpid() != pid:
                return  # a fork child's copy of a parent's lease: the parent's business
            if held:
                lib.upipe_free(raw, lease.chunk)
            lib.upipe_handle_unref(raw)

        owned = ffi.gc(ptr, done, size=max(nbytes, 1))
        exporter = ffi.buffer(owned, nbytes)
        # Keyed by the exporter's id: it is unique while the exporter lives, and done() (which
        # runs when the exporter dies) removes the entry.
        key.append(id(exporter))
        self._leases[key[0]] = lease
        view = memoryview(exporter)
        return view.toreadonly() if readonly else view

    def lease_for(self, obj: Any) -> Lease | None:
        """The lease behind a view this module handed out (or a view/array made from one)."""
        if not self._leases:
            return None
        o = obj
        # numpy not imported (it is not upipe's to import): obj cannot be an ndarray
        ndarray: Any = getattr(sys.modules.get("numpy"), "ndarray", ())
        for _ in range(16):
            if isinstance(o, memoryview):
                o = o.obj
            elif isinstance(o, ndarray):
                if o.base is None:
                    return None
                o = o.base
            else:
                break
        return self._leases.get(id(o))

    def starts_chunk(self, obj: Any, lease: Lease) -> bool:
        """Whether obj's first byte is its chunk's first byte (a descriptor has no offset)."""
        try:
            ptr = ffi.from_buffer(obj)
        except TypeError:
            return False
        start = lib.upipe_chunk_ptr(self._h, lease.chunk)
        return bool(ffi.cast("uintptr_t", ptr) == ffi.cast("uintptr_t", start))

    def begin_move(self, lease: Lease) -> bool:
        """Claim the lease for a put; False if it is not held (spent, or another put has it)."""
        with self._lock:
            if lease.state != _HELD:
                return False
            lease.state = _MOVING
            return True

    def end_move(self, lease: Lease, moved: bool) -> None:
        with self._lock:
            lease.state = _MOVED if moved else _HELD

    def release_lease(self, lease: Lease) -> bool:
        """Free the chunk now. False if the lease was already spent."""
        # The state check and change are one step under the lock: a release() in one thread
        # and the last view dying in another must not both free the chunk.
        with self._lock:
            if lease.state != _HELD:
                return False
            lease.state = _RELEASED
        rc = int(lib.upipe_free(self._h, lease.chunk))
        if rc < 0:
            raise_for(rc, "releasing a chunk")
        return True

    @staticmethod
    def lease_is_held(lease: Lease) -> bool:
        return lease.state == _HELD

    def free_chunk(self, chunk: int) -> None:
        lib.upipe_free(self._h, chunk)

    def copy_into_chunk(self, chunk: int, data: Any, nbytes: int, offset: int = 0) -> None:
        dst = lib.upipe_chunk_ptr(self._h, chunk) + offset
        if nbytes:
            ffi.memmove(dst, data, nbytes)

    def chunk_buffer(self, chunk: int, nbytes: int) -> Any:
        """A writable buffer over a chunk, not leased (the caller manages the chunk)."""
        return ffi.buffer(lib.upipe_chunk_ptr(self._h, chunk), nbytes)

    # -- waiting ------------------------------------------------------------------------------

    def spin(self, what: int, seconds: float, arg: int = 0) -> bool:
        """Busy-wait (GIL held, loop blocked) up to seconds for the condition; True if it holds."""
        return bool(lib.upipe_spin(self._h, arg, what, int(seconds * 1e9)) > 0)

    def wait(self, what: int, deadline_ns: int, arg: int = 0) -> int:
        """Block (GIL released) until the condition may hold; 0, -ETIMEDOUT or -EINTR."""
        return int(lib.upipe_wait(self._h, arg, what, deadline_ns))

    def async_waiter(self, what: int, delta: int, arg: int = 0) -> bool:
        return bool(lib.upipe_async_waiter(self._h, arg, what, delta) > 0)

    def rearm(self, what: int, arg: int = 0) -> bool:
        """Arm the async bell again after draining its eventfd; True if the condition holds."""
        return bool(lib.upipe_async_waiter(self._h, arg, what, 0) > 0)

    def ready(self, what: int, arg: int = 0) -> bool:
        return bool(lib.upipe_ready(self._h, arg, what) > 0)

    def async_waiters(self, what: int, arg: int = 0) -> int:
        return int(lib.upipe_async_waiters(self._h, arg, what))

    def kick(self, what: int, arg: int = 0) -> None:
        lib.upipe_async_kick(self._h, arg, what)

    # -- control ------------------------------------------------------------------------------

    def close(self, ring: int = 0) -> None:
        rc = int(lib.upipe_close(self._h, ring))
        if rc < 0:
            raise_for(rc, "closing the queue")

    def debug_abandon(self, what: int, ring: int = 0) -> int:
        """Tests only: leave a half-done slot as if killed mid-operation (see upipe.h)."""
        return int(lib.upipe_debug_abandon(self._h, ring, what))

    def is_closed(self, ring: int = 0) -> bool:
        return bool(lib.upipe_is_closed(self._h, ring) > 0)

    def recover(self) -> int:
        return int(lib.upipe_recover(self._h))

    def stats(self, ring: int = 0) -> SegmentStats:
        st = ffi.new("struct upipe_stats *")
        rc = int(lib.upipe_stats(self._h, ring, st))
        if rc < 0:
            raise_for(rc, "reading statistics")
        classes = tuple(
            (int(st.class_size[i]), int(st.class_total[i]), int(st.class_free[i]))
            for i in range(st.nclasses)
        )
        return SegmentStats(
            capacity=int(st.capacity), count=int(st.count), closed=bool(st.closed),
            inline_max=int(st.inline_max), aborted_puts=int(st.aborted_puts),
            lost_items=int(st.lost_items), tombstones_skipped=int(st.tombstones_skipped),
            recoveries=int(st.recoveries), reclaimed_chunks=int(st.reclaimed_chunks),
            lost_leases=int(st.lost_leases), redelivered=int(st.redelivered),
            attached_processes=int(st.actors),
            chunk_classes=classes, segment_bytes=int(st.segment_size),
        )

    def count(self, ring: int = 0) -> int:
        st = ffi.new("struct upipe_stats *")
        lib.upipe_stats(self._h, ring, st)
        return int(st.count)

    def add_user(self) -> Segment:
        """One more queue over this attachment (another ring): it detaches at the last one."""
        self._users += 1
        return self

    def detach(self) -> None:
        """Drop this object's reference; the mapping goes when the last view does (and when the
        last queue over it lets go, see :meth:`add_user`)."""
        self._users -= 1
        if self._users > 0:
            return
        h, self._h = self._h, None
        _live_segments.discard(self)
        if h is not None:
            ffi.release(h)


def segment_size(config: SegmentConfig) -> int:
    rc = int(lib.upipe_segment_size(config.to_c()))
    if rc < 0:
        raise errors.UpipeError(f"invalid queue geometry: {config}")
    return rc


def pid_alive(pid: int) -> bool:
    """Whether recovery would consider this pid alive (zombies are dead)."""
    return bool(lib.upipe_pid_alive(pid, 0))


def layout_offsets() -> dict[str, int]:
    """The compiled offsets of the shared structures, by name (checked against docs/layout.md)."""
    out = {}
    for i in range(int(lib.upipe_layout_count())):
        name = ffi.string(lib.upipe_layout_name(i)).decode()
        out[name] = int(lib.upipe_layout_offset(name.encode()))
    return out


ENOBUFS, ENOENT, EAGAIN, EPIPE = errno.ENOBUFS, errno.ENOENT, errno.EAGAIN, errno.EPIPE
EPERM, EBUSY, EDQUOT, ESTALE = errno.EPERM, errno.EBUSY, errno.EDQUOT, errno.ESTALE
MAX_HOLDS = int(lib.UPIPE_MAX_HOLDS)
EMSGSIZE, EBADMSG, ETIMEDOUT, EINTR = errno.EMSGSIZE, errno.EBADMSG, errno.ETIMEDOUT, errno.EINTR
