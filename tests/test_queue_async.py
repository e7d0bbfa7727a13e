"""The asyncio face: eventfd wakeups on the running loop, cancellation safety, async for."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from upipe import Closed, Empty, Full, Queue


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_get_async_wakes_on_put_from_another_thread() -> None:
    q = Queue(maxsize=4)

    async def main() -> object:
        threading.Timer(0.05, q.put, args=(b"hello",)).start()
        t = time.monotonic()
        item = await q.get_async()
        return item, time.monotonic() - t

    item, waited = run(main())
    assert item == b"hello" and waited < 1.0


def test_no_thread_per_call_and_no_reader_left_behind() -> None:
    q = Queue(maxsize=32)

    async def main() -> None:
        before = threading.active_count()
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(q.get_async()) for _ in range(20)]
        await asyncio.sleep(0.05)
        assert threading.active_count() == before  # waiting costs no thread
        assert q._seg.fds()[1] in loop._selector.get_map()  # type: ignore[attr-defined]
        for i in range(20):
            q.put(i)
        got = await asyncio.gather(*tasks)
        assert sorted(got) == list(range(20))
        assert q._seg.fds()[1] not in loop._selector.get_map()  # type: ignore[attr-defined]

    run(main())


def test_cancelled_get_loses_no_item() -> None:
    q = Queue(maxsize=64)

    async def main() -> None:
        for round_ in range(50):
            task = asyncio.create_task(q.get_async())
            await asyncio.sleep(0)
            q.put(round_)
            task.cancel()
            try:
                got = await task
            except asyncio.CancelledError:
                got = await q.get_async(timeout=5)  # still there
            assert got == round_
        assert q.qsize() == 0

    run(main())


def test_wait_for_timeout_cancels_cleanly() -> None:
    q = Queue(maxsize=2)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.get_async(), 0.05)
        q.put(b"x")
        assert await q.get_async() == b"x"
        with pytest.raises(Empty):
            await q.get_async(timeout=0.05)

    run(main())


def test_put_async_waits_for_room_and_is_cancel_safe() -> None:
    q = Queue(maxsize=2, max_bytes=1 << 20, chunk_sizes={65536: 2})

    async def main() -> None:
        await q.put_async(b"a")
        await q.put_async(b"b")
        with pytest.raises(Full):
            await q.put_async(b"c", timeout=0.05)
        task = asyncio.create_task(q.put_async(b"c"))
        await asyncio.sleep(0.02)
        assert not task.done()
        assert q.get() == b"a"
        await asyncio.wait_for(task, 5)
        assert q.get_many(5) == [b"b", b"c"]
        # a cancelled put of a large item gives its chunk back
        await q.put_async(b"x" * 60000)
        await q.put_async(b"y" * 60000)
        task = asyncio.create_task(q.put_async(b"z" * 60000))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert q.get() == b"x" * 60000 and q.get() == b"y" * 60000
        free = q.statistics().chunk_classes[0][2]
        assert free == 2

    run(main())


def test_async_for_ends_when_closed_and_drained() -> None:
    q = Queue(maxsize=8)

    async def producer() -> None:
        for i in range(100):
            await q.put_async(np.full(10, i))
        q.close()

    async def main() -> list[int]:
        asyncio.create_task(producer())
        return [int(a[0]) async for a in q]

    assert run(main()) == list(range(100))


def test_put_async_on_closed_raises() -> None:
    q = Queue(maxsize=2)
    q.close()

    async def main() -> None:
        with pytest.raises(Closed):
            await q.put_async(b"x")
        with pytest.raises(Closed):
            await q.get_async()

    run(main())


def test_close_wakes_async_waiters() -> None:
    q = Queue(maxsize=2)

    async def main() -> None:
        tasks = [asyncio.create_task(q.get_async()) for _ in range(3)]
        await asyncio.sleep(0.05)
        q.close()
        for t in tasks:
            with pytest.raises(Closed):
                await asyncio.wait_for(t, 2)

    run(main())


def test_two_loops_in_two_threads_share_a_queue() -> None:
    q = Queue(maxsize=16)
    results: list[list[int]] = [[], []]

    def consumer(i: int) -> None:
        async def main() -> None:
            async for item in q:
                results[i].append(item)

        asyncio.run(main())

    threads = [threading.Thread(target=consumer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for i in range(2000):
        q.put(i)
    while q.qsize():
        time.sleep(0.01)
    q.close()
    for t in threads:
        t.join(10)
    assert sorted(results[0] + results[1]) == list(range(2000))


def test_a_finished_wait_keeps_no_queue_alive(no_leaks: None) -> None:
    # Regression: the per-loop dispatcher registry kept every segment an event loop had ever
    # waited on (its memfd and eventfds) for the life of the process.
    import gc
    import weakref

    async def main(q: Queue) -> None:
        with pytest.raises(Empty):
            await q.get_async(timeout=0.02)
        task = asyncio.ensure_future(q.get_async())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    q = Queue(maxsize=4)
    run(main(q))
    seg = weakref.ref(q._seg)
    del q
    gc.collect()
    assert seg() is None
