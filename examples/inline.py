"""Inline processors: func= runs a module-level function in each worker process.

gen -> square (2 instances) -> total. Each function gets its joined Processor.
"""

import asyncio
import os

from upipe import Pipe, Processor

N = 20_000


async def gen(proc: Processor) -> None:
    for i in range(N):
        await proc.emit_sync(i)  # small Python objects travel too (pickled)


async def square(proc: Processor) -> None:
    async for x in proc:  # the two instances share the input: each number goes to one of them
        await proc.emit_sync(x * x)


def total(proc: Processor) -> None:
    """A plain function: the blocking face (get_blocking / for data in proc)."""
    s = sum(proc)  # iterates until 'square' has finished and the input is drained
    print(f"total (in worker {proc.name}/{proc.instance}, pid {os.getpid()}): {s}", flush=True)


async def main() -> None:
    pipe = Pipe("inline")
    source = Processor("gen", func=gen)
    pipe.add(source).add(Processor("square", func=square, instances=2)).add(
        Processor("total", func=total))
    await pipe.start()
    await pipe.wait_for_completion()
    expected = sum(i * i for i in range(N))
    print(f"expected: {expected}")


if __name__ == "__main__":
    asyncio.run(main())
