"""The asyncio face: wait for a queue condition on the event loop, with no thread and no polling.

Facts this module depends on:

* Each ring of a segment has two eventfds shared by every process attached to it ("data" and
  "space"; a free chunk rings ring 0's "space"). A
  waker writes to one only when the shared eventcount says an async waiter is registered, so a
  busy pipeline makes no syscall for them.
* ``loop.add_reader`` keeps one callback per fd (a second call replaces the first), so each
  (segment, eventfd, loop) has exactly one :class:`_Dispatcher`, which wakes every future of this
  process waiting on that fd. Woken futures re-check the ring themselves.
* The eventfd is shared: when our dispatcher drains it, another process's loop that had not yet
  looked may miss that ring. So after draining, if the condition still holds and another process
  is registered, the dispatcher rings again (the baton, docs/futex.md). A waiter also wakes at
  least every ``SAFETY_SLICE`` seconds to re-check and to run crash recovery, which bounds any
  delay a peer's crash could cause.
* Items are only ever taken by the waiting coroutine itself, synchronously, after it wakes; so a
  cancelled ``await`` has taken nothing and loses nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref

from .segment import WAIT_CHUNK, WAIT_READABLE, WAIT_WRITABLE, Segment

SAFETY_SLICE = 0.1

__all__ = ["wait_for_condition", "SAFETY_SLICE"]


class _Dispatcher:
    """One eventfd of one segment on one loop: registers while this process has waiters."""

    def __init__(self, seg: Segment, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.seg = seg
        self.fd = fd
        self.loop = loop
        self.futures: set[asyncio.Future[None]] = set()
        # (what, arg) -> number of our futures waiting for it; each distinct condition is
        # registered once in shared memory for this process.
        self.conditions: dict[tuple[int, int], int] = {}

    def add(self, fut: asyncio.Future[None], what: int, arg: int) -> bool:
        """Register fut; returns True if the condition already holds (then do not wait)."""
        if not self.futures:
            self.loop.add_reader(self.fd, self._on_readable)
        self.futures.add(fut)
        key = (what, arg)
        count = self.conditions.get(key, 0)
        self.conditions[key] = count + 1
        if count == 0:
            return self.seg.async_waiter(what, +1, arg)  # register, then re-check (F0)
        return self.seg.ready(what, arg)

    def remove(self, fut: asyncio.Future[None], what: int, arg: int) -> None:
        self.futures.discard(fut)
        key = (what, arg)
        count = self.conditions.get(key, 0) - 1
        if count <= 0:
            self.conditions.pop(key, None)
            if self.seg._h is not None:
                self.seg.async_waiter(what, -1, arg)
        else:
            self.conditions[key] = count
        if not self.futures:
            self.loop.remove_reader(self.fd)
            # Idle, it holds no state: leave the registry, which would otherwise keep it (and
            # its segment) alive as long as the loop, and the loop as long as itself (the value
            # of a WeakKeyDictionary entry referencing its own key).
            per_loop = _dispatchers.get(self.loop)
            if per_loop is not None and per_loop.get((id(self.seg), self.fd)) is self:
                del per_loop[(id(self.seg), self.fd)]

    def _on_readable(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except (BlockingIOError, OSError):
            pass  # another process drained it first: we still re-check below
        for fut in list(self.futures):
            if not fut.done():
                fut.set_result(None)
        if self.seg._h is None:
            return
        for what, arg in list(self.conditions):
            # Waiters remain (ours until they re-check, maybe other processes'): arm the bell
            # again, then pass on a wakeup we may have swallowed for another process (the baton).
            ready = self.seg.rearm(what, arg)
            if ready and self.seg.async_waiters(what, arg) > 1:
                self.seg.kick(what, arg)


_dispatchers: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[int, int], _Dispatcher]
] = weakref.WeakKeyDictionary()


def _dispatcher(seg: Segment, what: int, arg: int,
                loop: asyncio.AbstractEventLoop) -> _Dispatcher:
    fd = seg.efd(what, arg)
    per_loop = _dispatchers.setdefault(loop, {})
    key = (id(seg), fd)
    d = per_loop.get(key)
    if d is None or d.seg is not seg:
        d = _Dispatcher(seg, fd, loop)
        per_loop[key] = d
    return d


def _wake(fut: asyncio.Future[None], fired: list[bool]) -> None:
    fired.append(True)
    if not fut.done():
        fut.set_result(None)


async def wait_for_condition(seg: Segment, what: int, deadline: float | None, arg: int = 0) -> bool:
    """Wait until the condition may hold. Returns False once ``deadline`` (time.monotonic()) has
    passed. Callers re-check the ring after every return."""
    assert what in (WAIT_READABLE, WAIT_WRITABLE, WAIT_CHUNK)
    loop = asyncio.get_running_loop()
    d = _dispatcher(seg, what, arg, loop)
    fut: asyncio.Future[None] = loop.create_future()
    ready = d.add(fut, what, arg)
    try:
        if ready:
            return True
        slice_ = SAFETY_SLICE
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            slice_ = min(slice_, remaining)
        fired: list[bool] = []
        timer = loop.call_later(slice_, _wake, fut, fired)
        try:
            await fut
        finally:
            timer.cancel()
        if deadline is not None and time.monotonic() >= deadline and not seg.ready(what, arg):
            return False
        if fired and not seg.ready(what, arg):
            seg.recover()  # a whole slice with nothing: is a peer dead mid-operation?
        return True
    finally:
        d.remove(fut, what, arg)
