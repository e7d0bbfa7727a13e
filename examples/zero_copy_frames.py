"""Zero-copy numpy frames between two processes.

The producer asks the queue for an array in shared memory, fills it in place and puts it: only a
descriptor moves. The consumer's array is a read-only view of the same bytes; the chunk goes
back to the pool when the consumer drops it (or calls ``release``).

Run: python examples/zero_copy_frames.py
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

import upipe

FRAME = (1024, 256)  # 1 MiB of float32


def produce(q: upipe.Queue, n: int) -> None:
    for i in range(n):
        arr = q.alloc_array(FRAME, np.float32)
        arr[:] = i  # written once, in place, in shared memory
        q.put(arr)  # moves the descriptor; don't touch arr after this
    q.close()


def main() -> None:
    q = upipe.Queue(maxsize=8, max_bytes=16 << 20, chunk_sizes={1 << 20: 12})
    p = mp.get_context("spawn").Process(target=produce, args=(q, 100))
    p.start()
    total = 0.0
    for i, arr in enumerate(q):
        assert not arr.flags.writeable and arr.shape == FRAME and arr.dtype == np.float32
        assert float(arr[0, 0]) == float(arr[-1, -1]) == i
        total += float(arr.sum())
        q.release(arr)  # hand the chunk back now instead of at garbage collection
    p.join(30)
    expected = sum(range(100)) * FRAME[0] * FRAME[1]
    print(f"received 100 frames zero-copy; checksum {total:.0f} (expected {expected})")
    assert total == expected


if __name__ == "__main__":
    main()
