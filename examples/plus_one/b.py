"""Processor 'b': adds one to every number it gets; at the end, reports count and sum."""

import asyncio
import json

from upipe import Processor


async def main() -> None:
    proc = Processor("b")
    await proc.join()
    count = total = 0
    async for data in proc:  # ends when 'a' has finished and every frame is drained
        value = int.from_bytes(data, "little") + 1
        count += 1
        total += value
    with open(proc.config["report"], "w") as f:
        json.dump({"count": count, "sum": total}, f)


if __name__ == "__main__":
    asyncio.run(main())
