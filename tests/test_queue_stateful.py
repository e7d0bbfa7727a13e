"""The queue, rule by rule, against a plain deque model (Hypothesis stateful testing).

Small capacities make wrap-around common; Full and Empty must happen exactly when the model says.
Payloads cover the inline path, the chunk path (copy), and zero-copy alloc'd buffers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from upipe import Closed, Empty, Full, NotOwner, Queue

payloads = st.one_of(
    st.binary(max_size=120),  # inline (<= 96) and just over it
    st.binary(min_size=1000, max_size=9000).map(bytes),  # chunk, copied
    st.integers(min_value=0, max_value=2**31),
    st.lists(st.integers(-5, 5), max_size=6).map(lambda xs: np.asarray(xs, dtype=np.int16)),
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


class QueueMachine(RuleBasedStateMachine):
    @initialize(maxsize=st.sampled_from([1, 2, 3, 4, 8]))
    def create(self, maxsize: int) -> None:
        # Few chunks, so pool exhaustion (Full on put of a big item) is reachable too.
        self.q = Queue(maxsize=maxsize, max_bytes=64 << 10, chunk_sizes={16384: 3})
        self.maxsize = maxsize
        self.model: deque[Any] = deque()
        self.held: list[Any] = []  # buffers from alloc() not yet put
        self.closed = False

    def chunks_in_use(self) -> int:
        big = sum(1 for x in self.model if isinstance(x, bytes) and len(x) > 96)
        zero_copy = sum(1 for x in self.model if isinstance(x, memoryview))
        return big + zero_copy + len(self.held)

    def fits(self, item: Any) -> bool:
        if len(self.model) >= self.maxsize:
            return False
        if isinstance(item, bytes) and len(item) > 96:
            return self.chunks_in_use() < 3
        return True

    @rule(item=payloads)
    def put_nowait(self, item: Any) -> None:
        if self.closed:
            try:
                self.q.put_nowait(item)
            except Closed:
                return
            raise AssertionError("put on a closed queue must raise Closed")
        if self.fits(item):
            self.q.put_nowait(item)
            self.model.append(item)
        else:
            try:
                self.q.put_nowait(item)
            except Full:
                return
            raise AssertionError("expected Full")

    @rule()
    def get_nowait(self) -> None:
        if self.model:
            got = self.q.get_nowait()
            expected = self.model.popleft()
            if isinstance(expected, memoryview):
                assert bytes(got) == bytes(expected)
            else:
                assert same(got, expected), (got, expected)
        else:
            exc = Closed if self.closed else Empty
            try:
                self.q.get_nowait()
            except exc:
                return
            raise AssertionError(f"expected {exc.__name__}")

    @rule(items=st.lists(st.binary(max_size=96), max_size=10))
    def put_many(self, items: list[bytes]) -> None:
        if self.closed:
            return
        room = self.maxsize - len(self.model)
        if len(items) <= room:
            self.q.put_many(items, block=False)
            self.model.extend(items)
        else:
            try:
                self.q.put_many(items, block=False)
            except Full as exc:
                assert exc.count == room
                self.model.extend(items[:room])
                return
            raise AssertionError("expected Full")

    @rule(n=st.integers(1, 10))
    def get_many(self, n: int) -> None:
        if not self.model:
            exc = Closed if self.closed else Empty
            try:
                self.q.get_many(n, block=False)
            except exc:
                return
            raise AssertionError(f"expected {exc.__name__}")
        got = self.q.get_many(n, block=False)
        assert 1 <= len(got) <= n
        for item in got:
            expected = self.model.popleft()
            if isinstance(expected, memoryview):
                assert bytes(item) == bytes(expected)
            else:
                assert same(item, expected)

    @rule(fill=st.integers(0, 255))
    def alloc(self, fill: int) -> None:
        if self.chunks_in_use() >= 3:
            try:
                self.q.alloc(10_000, block=False)
            except Full:
                return
            raise AssertionError("expected Full from alloc")
        buf = self.q.alloc(10_000)
        buf[:] = bytes([fill]) * 10_000
        self.held.append(buf)

    @precondition(lambda self: self.held and not self.closed)
    @rule()
    def put_allocated(self) -> None:
        buf = self.held[-1]
        if len(self.model) >= self.maxsize:
            try:
                self.q.put_nowait(buf)
            except Full:
                return
            raise AssertionError("expected Full")
        self.held.pop()
        self.q.put_nowait(buf)
        self.model.append(memoryview(bytes(buf)))  # what the consumer must see
        try:
            self.q.put_nowait(buf)  # already moved into the queue
        except (NotOwner, Full):
            return
        raise AssertionError("a moved buffer must not be put twice")

    @precondition(lambda self: self.held)
    @rule()
    def release(self) -> None:
        buf = self.held.pop(0)
        self.q.release(buf)
        try:
            self.q.release(buf)
        except NotOwner:
            return
        raise AssertionError("double release must raise NotOwner")

    @rule()
    def close(self) -> None:
        self.q.close()
        self.closed = True

    @invariant()
    def sizes_agree(self) -> None:
        if not hasattr(self, "q"):
            return
        assert self.q.qsize() == len(self.model)
        assert self.q.empty() == (not self.model)
        assert self.q.full() == (len(self.model) >= self.maxsize)
        free = sum(f for _, _, f in self.q.statistics().chunk_classes)
        assert free == 3 - self.chunks_in_use()

    def teardown(self) -> None:
        if hasattr(self, "q"):
            self.held.clear()
            self.q.close()
            self.q.detach()


QueueMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueMachine = QueueMachine.TestCase
