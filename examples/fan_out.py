"""Fan-out, zero-copy: one camera, three analyses of every frame.

camera -> {mean, peak, histogram}. Each 1 MiB frame is written once, into shared memory
(proc.alloc_array), and all three processors receive that same memory: nothing is copied, and
the frame goes back to the pool when the last of them is done with it. Because they share it,
each receives it read-only.
"""

import asyncio
import sys
import time

import numpy as np

from upipe import Pipe, Processor

SHAPE = (512, 512)  # float32: 1 MiB


async def camera(proc: Processor) -> None:
    for i in range(proc.config["frames"]):
        frame = proc.alloc_array(SHAPE, np.float32)  # shared by all three downstreams
        frame.fill(i % 200)  # "capture" frame i
        await proc.emit_sync(frame)  # one chunk, named by three inputs


async def mean(proc: Processor) -> None:
    n = 0
    async for frame in proc:
        assert float(frame.mean()) == n % 200, f"frame {n}: wrong mean"
        assert not frame.flags.writeable  # the others read these very bytes
        n += 1
    print(f"mean: {n} frames, every mean checked")


async def peak(proc: Processor) -> None:
    n = 0
    start = time.perf_counter()
    async for frame in proc:
        assert float(frame.max()) == n % 200, f"frame {n}: wrong peak"
        n += 1
    elapsed = time.perf_counter() - start
    print(f"peak: {n} frames, every peak checked, {n / elapsed:,.0f} frames/s")


async def histogram(proc: Processor) -> None:
    n = 0
    async for frame in proc:
        counts, _ = np.histogram(frame[::16, ::16], bins=4, range=(0, 200))
        assert counts.sum() == (SHAPE[0] // 16) * (SHAPE[1] // 16), f"frame {n}: bad histogram"
        n += 1
    print(f"histogram: {n} frames")


async def main(frames: int) -> None:
    pipe = Pipe("fan-out")
    cam = pipe.add(Processor("camera", func=camera, config={"frames": frames}))
    for analysis in (mean, peak, histogram):
        cam.add(Processor(analysis.__name__, func=analysis))
    await pipe.start()
    await pipe.wait_for_completion()
    print(f"pipe: {frames} frames, each written once and read by 3 processors")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
