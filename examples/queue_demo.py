"""A three-stage pipeline of processes over upipe queues: the README's demo.

A source process writes video-like frames (480x640x3 uint8) straight into shared memory
(``alloc_array``), two worker processes turn each into a small result (mean brightness per
channel), and this process collects the results with ``async for``. Frames are never pickled or
copied between processes: only descriptors move.

Run: python examples/queue_demo.py [--frames N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

import numpy as np

import upipe

SHAPE = (480, 640, 3)


def source(frames: upipe.Queue, n: int) -> None:
    for i in range(n):
        frame = frames.alloc_array(SHAPE, np.uint8)  # in shared memory: no copy on put
        frame[:] = i % 251
        frame[0, 0, 0] = i % 256
        frames.put(frame)


def worker(frames: upipe.Queue, results: upipe.Queue) -> None:
    for frame in frames:  # ends when the queue is closed and drained
        results.put((int(frame[0, 0, 0]), frame.mean(axis=(0, 1)).round(2).tolist()))
        del frame  # the chunk goes back to the pool


async def sink(results: upipe.Queue, n: int) -> int:
    received = 0
    async for _tag, _means in results:
        received += 1
        if received == n:
            break
    return received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    args = parser.parse_args()
    frame_bytes = int(np.prod(SHAPE))
    ctx = mp.get_context("spawn")
    frames = upipe.Queue(maxsize=16, max_bytes=32 * frame_bytes, chunk_sizes={frame_bytes: 24})
    results = upipe.Queue(maxsize=1024)
    workers = [ctx.Process(target=worker, args=(frames, results)) for _ in range(2)]
    src = ctx.Process(target=source, args=(frames, args.frames))
    for p in workers:
        p.start()
    t0 = time.perf_counter()
    src.start()
    try:
        received = asyncio.run(sink(results, args.frames))
        elapsed = time.perf_counter() - t0
        src.join(30)
    finally:
        frames.close()
        for p in [src, *workers]:
            p.join(30)
            if p.is_alive():
                p.kill()
    st = frames.statistics()
    print(f"upipe demo: source -> 2 workers -> async sink, {received} frames of "
          f"{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} uint8 ({frame_bytes / 1e6:.2f} MB each)")
    rate = received / elapsed
    print(f"  {rate:,.0f} frames/s, {rate * frame_bytes / 1e9:.2f} GB/s through shared memory, "
          f"{elapsed:.2f} s in all (including process start-up)")
    print(f"  lost items: {st.lost_items}, chunks free at the end: "
          f"{sum(f for _, _, f in st.chunk_classes)}/{sum(t for _, t, _ in st.chunk_classes)}")
    if received != args.frames:
        raise SystemExit(f"expected {args.frames} results, got {received}")


if __name__ == "__main__":
    main()
