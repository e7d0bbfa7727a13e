"""Processor 'a': the source. Emits the numbers 0 .. count-1 (count from the pipe's config)."""

import asyncio

from upipe import Processor


async def main() -> None:
    proc = Processor("a")
    await proc.join()
    # Processor is now ready to ingest and emit data
    for i in range(proc.config["count"]):
        await proc.emit_sync(i.to_bytes(8, "little"))  # wait if there is no space (back pressure)


if __name__ == "__main__":
    asyncio.run(main())
