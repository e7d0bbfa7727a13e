"""1 MiB numpy frames through three stages, zero-copy.

camera -> brighten -> check. Each stage writes its output straight into the next stage's shared
memory (proc.alloc_array) and emits it: only a small descriptor moves between processes. The
receiver's array is a read-only view of the same memory.
"""

import asyncio
import sys
import time

import numpy as np

from upipe import Pipe, Processor

SHAPE = (512, 512)  # float32: 1 MiB


async def camera(proc: Processor) -> None:
    for i in range(proc.config["frames"]):
        frame = proc.alloc_array(SHAPE, np.float32)  # in the next stage's shared memory
        frame.fill(i)  # "capture" frame i
        await proc.emit_sync(frame)  # moves the frame: no copy


async def brighten(proc: Processor) -> None:
    async for frame in proc:  # a read-only view into shared memory
        out = proc.alloc_array(frame.shape, frame.dtype)
        np.add(frame, 1.0, out=out)  # the one pass over the data this stage exists for
        del frame  # drop the view: its memory goes back to the pool
        await proc.emit_sync(out)


async def check(proc: Processor) -> None:
    n = 0
    start = time.perf_counter()
    async for frame in proc:
        expected = n + 1.0
        assert frame.min() == expected and frame.max() == expected, f"frame {n} corrupt"
        n += 1
    elapsed = time.perf_counter() - start
    mb = n * frame.nbytes / 1e6 if n else 0.0
    print(f"check: {n} frames of {SHAPE} float32, every element verified; "
          f"{n / elapsed:,.0f} frames/s, {mb / elapsed / 1e3:.1f} GB/s through 3 stages")


async def main(frames: int) -> None:
    pipe = Pipe("numpy-frames")
    cfg = {"frames": frames}
    pipe.add(Processor("camera", func=camera, config=cfg)).add(
        Processor("brighten", func=brighten)).add(Processor("check", func=check))
    await pipe.start()
    await pipe.wait_for_completion()
    print(f"pipe: {frames} frames done")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
