"""One queue, an asyncio face and a blocking face: producers in threads, a consumer coroutine.

``get_async`` waits on the event loop through an eventfd (``loop.add_reader``): no thread per
call, no polling. ``async for`` ends when the queue is closed and drained.

Run: python examples/async_queue.py
"""

from __future__ import annotations

import asyncio
import threading

import upipe


def blocking_producer(q: upipe.Queue, start: int) -> None:
    for i in range(start, start + 500):
        q.put({"n": i, "square": i * i})


async def main() -> None:
    q = upipe.Queue(maxsize=64)
    threads = [threading.Thread(target=blocking_producer, args=(q, k * 500)) for k in range(2)]
    for t in threads:
        t.start()

    async def closer() -> None:
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        q.close()

    closing = asyncio.create_task(closer())
    seen = [item["n"] async for item in q]
    await closing
    assert sorted(seen) == list(range(1000))
    print(f"async consumer received {len(seen)} items from 2 blocking producers")


if __name__ == "__main__":
    asyncio.run(main())
