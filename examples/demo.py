"""The demo pipeline: small frames, then 1 MiB numpy frames, through gen -> plus-one -> sink.

Three processes per pipe, written with the uPipe API (await proc.get_sync / emit_sync); the
sink verifies every frame and the demo prints what went through and how fast.
"""

import asyncio
import sys
import time

import numpy as np

from upipe import Pipe, Processor

FRAME = 262144  # float32 elements: 1 MiB


async def gen(proc: Processor) -> None:
    n, numpy_frames = proc.config["frames"], proc.config["numpy"]
    for i in range(n):
        if numpy_frames:
            frame = proc.alloc_array(FRAME, np.float32)  # in the next stage's shared memory
            frame.fill(i)
            await proc.emit_sync(frame)  # zero copy: a descriptor moves
        else:
            await proc.emit_sync(i.to_bytes(8, "little"))


async def plus_one(proc: Processor) -> None:
    while (data := await proc.get_sync()) is not None:  # None: upstream done, input drained
        if isinstance(data, np.ndarray):
            out = proc.alloc_array(data.shape, data.dtype)
            np.add(data, 1, out=out)
            del data
            await proc.emit_sync(out)
        else:
            await proc.emit_sync((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))


async def sink(proc: Processor) -> None:
    n = 0
    async for data in proc:
        if isinstance(data, np.ndarray):
            ok = data.min() == data.max() == n + 1
        else:
            ok = int.from_bytes(data, "little") == n + 1
        assert ok, f"frame {n} is wrong"
        if n == 0:
            first = time.perf_counter()
        n += 1
    rate = (n - 1) / (time.perf_counter() - first)
    size = f"{FRAME * 4 * rate / 1e9:.1f} GB/s" if proc.config["numpy"] else "8 B frames"
    print(f"  sink: {n:,} frames, each verified; {rate:,.0f} frames/s ({size})", flush=True)


async def run(label: str, frames: int, numpy_frames: bool) -> None:
    cfg = {"frames": frames, "numpy": numpy_frames}
    pipe = Pipe(label)
    pipe.add(Processor("gen", func=gen, config=cfg)).add(
        Processor("plus-one", func=plus_one)).add(Processor("sink", func=sink, config=cfg))
    t0 = time.perf_counter()
    await pipe.start()
    await pipe.wait_for_completion()
    print(f"{label}: {frames:,} frames through 3 processes in {time.perf_counter() - t0:.2f} s "
          "(start-up included)")


async def main(scale: float) -> None:
    await run("small frames", int(300_000 * scale), numpy_frames=False)
    await run("1 MiB numpy frames", int(5_000 * scale), numpy_frames=True)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0))
