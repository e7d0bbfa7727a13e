"""upipe.Queue in one process: names, semantics, payloads, errors."""

from __future__ import annotations

import asyncio
import pickle
import queue as stdqueue
import threading
import time

import numpy as np
import pytest

import upipe
from upipe import Closed, Empty, Full, MessageTooLarge, NotOwner, Queue


def test_exceptions_subclass_the_stdlib_ones() -> None:
    assert issubclass(upipe.Full, stdqueue.Full) and issubclass(upipe.Full, asyncio.QueueFull)
    assert issubclass(upipe.Empty, stdqueue.Empty) and issubclass(upipe.Empty, asyncio.QueueEmpty)
    for exc in (upipe.Full, upipe.Empty, upipe.Closed, upipe.MessageTooLarge, upipe.ShmExhausted,
                upipe.VersionMismatch, upipe.HangsInCreation, upipe.NotOwner):
        assert issubclass(exc, upipe.UpipeError)
    assert issubclass(upipe.MessageTooLarge, ValueError)
    assert issubclass(upipe.ShmExhausted, MemoryError)


def test_fifo_order_and_sizes(no_leaks: None) -> None:
    q = Queue(maxsize=8)
    assert q.empty() and not q.full() and q.qsize() == 0 and q.maxsize == 8
    for i in range(8):
        q.put(bytes([i]) * (i + 1))
    assert q.full() and q.qsize() == 8
    with pytest.raises(Full):
        q.put_nowait(b"x")
    assert [q.get() for _ in range(8)] == [bytes([i]) * (i + 1) for i in range(8)]
    with pytest.raises(Empty):
        q.get_nowait()
    q.detach()


def test_maxsize_that_is_not_a_power_of_two_is_exact() -> None:
    q = Queue(maxsize=3)
    for i in range(3):
        q.put(str(i))
    with pytest.raises(Full):
        q.put("3", block=False)
    assert q.get() == "0"
    q.put("3", block=False)
    assert [q.get() for _ in range(3)] == ["1", "2", "3"]


@pytest.mark.parametrize(
    "obj",
    [
        b"", b"small", b"x" * 96, b"y" * 97, b"z" * 5000, b"w" * (3 << 20),
        bytearray(b"abc"), bytearray(200_000),
        "text", 12345, 3.5, None, (1, "a"), {"k": [1, 2, {"x": b"y"}]},
    ],
    ids=lambda o: f"{type(o).__name__}-{len(o) if hasattr(o, '__len__') else ''}",
)
def test_what_you_put_is_what_you_get(obj: object) -> None:
    q = Queue(maxsize=4)
    q.put(obj)
    got = q.get()
    assert type(got) is type(obj)
    assert got == obj


@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "uint16", "complex64", "bool",
                                   ">i4", "datetime64[ns]"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (64, 64, 3), (1024, 1024)])
def test_numpy_arrays_keep_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    q = Queue(maxsize=4, max_bytes=64 << 20)
    rng = np.random.default_rng(0)
    arr = np.asarray(rng.random(shape) * 100).astype(dtype)
    q.put(arr)
    got = q.get()
    assert isinstance(got, np.ndarray)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)
    assert not got.flags.writeable


def test_large_array_arrives_as_a_view_into_shared_memory() -> None:
    q = Queue(maxsize=4, max_bytes=32 << 20)
    arr = np.arange(1 << 18, dtype=np.float32)
    q.put(arr)
    got = q.get()
    assert got.base is not None and not got.flags.owndata  # a view, not a copy
    free_before = q.statistics().chunk_classes
    del got
    assert q.statistics().chunk_classes != free_before  # the chunk went back when the view died


def test_non_contiguous_and_fortran_arrays() -> None:
    q = Queue(maxsize=4)
    base = np.arange(10000, dtype=np.int64).reshape(100, 100)
    for arr in (base[::2, ::3], np.asfortranarray(base), base.T):
        q.put(arr)
        np.testing.assert_array_equal(q.get(), arr)


def test_object_and_structured_arrays_go_by_pickle() -> None:
    q = Queue(maxsize=4)
    obj = np.array([1, "a", None], dtype=object)
    rec = np.zeros(3, dtype=[("x", "f4"), ("y", "i2")])
    rec["x"] = [1.5, 2.5, 3.5]
    q.put(obj)
    q.put(rec)
    assert list(q.get()) == [1, "a", None]
    got = q.get()
    assert got.dtype == rec.dtype
    np.testing.assert_array_equal(got, rec)


def test_objects_with_large_arrays_use_out_of_band_buffers() -> None:
    q = Queue(maxsize=4, max_bytes=64 << 20)
    payload = {"frame": np.arange(500_000, dtype=np.float64), "meta": {"id": 7}}
    q.put(payload)
    got = q.get()
    assert got["meta"] == {"id": 7}
    np.testing.assert_array_equal(got["frame"], payload["frame"])
    assert not got["frame"].flags.owndata  # rebuilt over the chunk, not copied


def test_memoryview_format_and_shape() -> None:
    q = Queue(maxsize=4)
    arr = np.arange(24, dtype=np.int32).reshape(4, 6)
    q.put(memoryview(arr))
    got = q.get()
    assert isinstance(got, memoryview) and got.readonly
    assert got.format == "i" and got.shape == (4, 6)
    assert got.tolist() == arr.tolist()
    big = memoryview(bytes(range(256)) * 1000)
    q.put(big)
    got = q.get()
    assert isinstance(got, memoryview) and got.readonly and bytes(got) == bytes(big)


def test_message_too_large_names_the_size_and_the_setting() -> None:
    q = Queue(maxsize=4, max_bytes=1 << 20, max_message_size=64 << 10)
    with pytest.raises(MessageTooLarge) as info:
        q.put(b"x" * (100 << 10))
    assert "102400" in str(info.value) and "max_message_size" in str(info.value)
    with pytest.raises(MessageTooLarge, match="max_message_size"):
        q.alloc(1 << 20)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"maxsize": 0}, ValueError, "bounded"),
        ({"maxsize": -3}, ValueError, "maxsize"),
        ({"maxsize": 2.5}, TypeError, "maxsize must be an int"),
        ({"max_bytes": 0}, ValueError, "max_bytes"),
        ({"slot_size": 50}, ValueError, "slot_size"),
        ({"max_bytes": 1 << 20, "max_message_size": 2 << 20}, ValueError, "raise max_bytes"),
        ({"chunk_sizes": {4096: 0}}, ValueError, "count"),
        ({"chunk_sizes": [4096, 1 << 20], "max_message_size": 4 << 20}, ValueError,
         "larger entry"),
    ],
)
def test_bad_construction_gets_a_clear_error(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        Queue(**kwargs)


def test_bad_timeouts() -> None:
    q = Queue(maxsize=2)
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        q.get(timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_items"):
        q.get_many(0)


def test_timeouts_wait_about_as_long_as_asked() -> None:
    q = Queue(maxsize=1)
    t = time.monotonic()
    with pytest.raises(Empty):
        q.get(timeout=0.2)
    assert 0.18 <= time.monotonic() - t < 2.0
    q.put(b"a")
    t = time.monotonic()
    with pytest.raises(Full):
        q.put(b"b", timeout=0.2)
    assert 0.18 <= time.monotonic() - t < 2.0
    # block=False ignores the timeout, like queue.Queue
    with pytest.raises(Full):
        q.put(b"b", False, -5)


def test_close_drains_then_raises_closed() -> None:
    q = Queue(maxsize=8)
    q.put(b"a")
    q.put(np.arange(100_000))
    q.close()
    assert q.closed
    with pytest.raises(Closed):
        q.put(b"late")
    assert q.get() == b"a"
    assert q.get().shape == (100_000,)
    with pytest.raises(Closed):
        q.get()
    with pytest.raises(Closed):
        q.get_nowait()
    q.close()  # idempotent


def test_iteration_ends_at_close() -> None:
    q = Queue(maxsize=16)
    for i in range(10):
        q.put(i)
    q.close()
    assert list(q) == list(range(10))


def test_close_wakes_a_blocked_getter() -> None:
    q = Queue(maxsize=2)
    result: list[object] = []

    def getter() -> None:
        try:
            q.get(timeout=10)
        except Closed as exc:
            result.append(exc)

    t = threading.Thread(target=getter)
    t.start()
    time.sleep(0.1)
    q.close()
    t.join(5)
    assert not t.is_alive() and isinstance(result[0], Closed)


def test_put_many_and_get_many() -> None:
    q = Queue(maxsize=64)
    items = [bytes([i]) * 10 for i in range(40)] + [b"big" * 1000, "str", np.arange(3)]
    q.put_many(items)
    got = q.get_many(100)
    assert got[:41] == items[:41] and got[41] == "str"
    np.testing.assert_array_equal(got[42], items[42])
    with pytest.raises(Empty):
        q.get_many(10, block=False)


def test_put_many_partial_when_full_reports_count() -> None:
    q = Queue(maxsize=4)
    with pytest.raises(Full) as info:
        q.put_many([b"a", b"b", b"c", b"d", b"e", b"f"], block=False)
    assert info.value.count == 4
    assert q.get_many(10) == [b"a", b"b", b"c", b"d"]


def test_get_many_waits_only_for_the_first_item() -> None:
    q = Queue(maxsize=8)
    threading.Timer(0.1, q.put, args=(b"late",)).start()
    assert q.get_many(5, timeout=5) == [b"late"]


def test_threads_share_a_queue() -> None:
    q = Queue(maxsize=64)
    n, producers = 5000, 4
    got: list[bytes] = []
    lock = threading.Lock()

    def produce(pid: int) -> None:
        for i in range(n):
            q.put(pid.to_bytes(1, "little") + i.to_bytes(4, "little"))

    def consume() -> None:
        while True:
            try:
                item = q.get(timeout=5)
            except Closed:
                return
            with lock:
                got.append(item)

    consumers = [threading.Thread(target=consume) for _ in range(3)]
    prods = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in consumers + prods:
        t.start()
    for t in prods:
        t.join(30)
    deadline = time.monotonic() + 30
    while q.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    q.close()
    for t in consumers:
        t.join(30)
    assert len(got) == n * producers
    seqs: dict[int, list[int]] = {}
    for item in got:
        seqs.setdefault(item[0], []).append(int.from_bytes(item[1:], "little"))
    for p in range(producers):
        assert sorted(seqs[p]) == list(range(n))


def test_alloc_put_moves_only_a_descriptor() -> None:
    q = Queue(maxsize=4, max_bytes=16 << 20)
    arr = q.alloc_array((512, 512), np.float32)
    assert arr.flags.writeable
    arr[:] = 3.0
    address = arr.__array_interface__["data"][0]
    q.put(arr)
    # putting it again is refused: it belongs to the queue now
    with pytest.raises(NotOwner, match="copy"):
        q.put(arr)
    got = q.get()
    assert got.__array_interface__["data"][0] == address  # same bytes, never copied
    assert got.shape == (512, 512) and float(got.sum()) == 3.0 * 512 * 512
    buf = q.alloc(10_000)
    buf[:5] = b"hello"
    q.put(buf)
    got_buf = q.get()
    assert isinstance(got_buf, memoryview) and bytes(got_buf[:5]) == b"hello"


def test_received_array_can_be_forwarded_zero_copy() -> None:
    a, b = Queue(maxsize=2), Queue(maxsize=2)
    # two queues are two segments: forwarding between them copies; within one queue it moves
    arr = np.arange(100_000, dtype=np.int32)
    a.put(arr)
    got = a.get()
    b.put(got)
    np.testing.assert_array_equal(b.get(), arr)
    a.put(arr)
    got = a.get()
    a.put(got)  # same queue: forwarded by descriptor
    np.testing.assert_array_equal(a.get(), arr)


def test_release_frees_now_and_use_after_release_does_not_crash() -> None:
    q = Queue(maxsize=4, max_bytes=4 << 20, chunk_sizes={1 << 20: 2})
    a = q.alloc_array(1 << 18, np.float32)
    b = q.alloc_array(1 << 18, np.float32)
    with pytest.raises(Full, match="no free chunk"):
        q.alloc(1 << 20, block=False)
    with pytest.raises(Full, match="after 0.05 s"):
        q.alloc(1 << 20, timeout=0.05)
    q.release(a)
    c = q.alloc(1 << 20)  # a's chunk came back
    assert float(a[0]) == float(a[0])  # reading a released view is allowed (recycled bytes)
    with pytest.raises(NotOwner):
        q.release(a)
    with pytest.raises(NotOwner):
        q.release(np.zeros(4))
    del b, c


def test_chunk_pool_exhaustion_blocks_then_times_out() -> None:
    q = Queue(maxsize=8, max_bytes=2 << 20, chunk_sizes={1 << 20: 2})
    q.put(b"x" * (1 << 19))
    q.put(b"y" * (1 << 19))
    with pytest.raises(Full, match="chunk pool"):
        q.put(b"z" * (1 << 19), block=False)
    with pytest.raises(Full):
        q.put(b"z" * (1 << 19), timeout=0.1)
    assert q.get() == b"x" * (1 << 19)
    q.put(b"z" * (1 << 19), timeout=1)


def test_statistics_is_a_frozen_dataclass() -> None:
    q = Queue(maxsize=4)
    q.put(b"a")
    st = q.statistics()
    assert st.qsize == 1 and st.maxsize == 4 and st.attached_processes == 1
    assert st.lost_items == 0 and st.aborted_puts == 0
    with pytest.raises(AttributeError):
        st.qsize = 3  # type: ignore[misc]


def test_pickle_outside_a_spawning_context_is_refused_or_works() -> None:
    # DupFd needs a process being spawned or a resource sharer; in-process pickling must not
    # silently produce something that attaches to the wrong segment.
    q = Queue(maxsize=2)
    q.put(b"hello")
    try:
        data = pickle.dumps(q)
    except Exception:
        return
    q2 = pickle.loads(data)
    assert q2.get(timeout=5) == b"hello"


def test_detached_queue_refuses_use() -> None:
    q = Queue(maxsize=2)
    q.detach()
    with pytest.raises(upipe.UpipeError, match="detached"):
        q.put(b"x")


def test_same_buffer_put_from_two_threads_goes_in_once() -> None:
    q = Queue(maxsize=64, max_bytes=8 << 20, chunk_sizes={65536: 40})
    for _ in range(30):
        buf = q.alloc(50_000)
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def put(buf: memoryview = buf, barrier: threading.Barrier = barrier,
                outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                q.put(buf)
                outcomes.append("put")
            except NotOwner:
                outcomes.append("refused")

        threads = [threading.Thread(target=put) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(outcomes) == ["put", "refused"]
        assert q.qsize() == 1
        del buf
        q.get()
    assert all(free == total for _, total, free in q.statistics().chunk_classes)


def test_queue_creates_no_dev_shm_entry() -> None:
    import os

    before = set(os.listdir("/dev/shm"))
    queues = [Queue(maxsize=4) for _ in range(5)]
    after = set(os.listdir("/dev/shm"))
    created = {n for n in after - before if not n.startswith(("sem.", "psm_"))}
    assert created == set()  # segments are anonymous memfds: nothing to leak there
    for q in queues:
        q.detach()


def test_alloc_waits_for_a_chunk_freed_by_another_thread() -> None:
    q = Queue(maxsize=4, max_bytes=4 << 20, chunk_sizes={1 << 20: 1})
    held = q.alloc(1 << 20)
    freer = threading.Timer(0.1, q.release, args=(held,))
    freer.start()
    try:
        start = time.monotonic()
        again = q.alloc(1 << 20, timeout=10)  # blocks until the timer releases the chunk
        assert time.monotonic() - start >= 0.05
        assert len(again) == 1 << 20
    finally:
        freer.cancel()
        freer.join()
    q.close()
    with pytest.raises(Closed):
        q.alloc(1 << 20)  # no free chunk, and no put would take one: Closed, not a wait
