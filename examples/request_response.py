"""The pipe as a service: pipe.emit_sync(request) returns what the sink emits for it.

parse -> answer: a request goes in at the root, the sink's emit comes back as the response.
"""

import asyncio
import json

from upipe import Pipe, Processor


async def parse(proc: Processor) -> None:
    async for raw in proc:
        await proc.emit_sync(json.loads(raw))


async def answer(proc: Processor) -> None:
    async for request in proc:
        await proc.emit_sync({"id": request["id"], "sum": sum(request["values"])})


async def main() -> None:
    pipe = Pipe("adder")
    pipe.add(Processor("parse", func=parse)).add(Processor("answer", func=answer))
    await pipe.start()
    try:
        for i in range(5):
            request = json.dumps({"id": i, "values": list(range(i + 3))})
            response = await pipe.emit_sync(request, timeout=30)
            assert response == {"id": i, "sum": sum(range(i + 3))}, response
            print(f"request {request} -> response {response}")
    finally:
        await pipe.terminate()  # stops the roots, drains, returns


if __name__ == "__main__":
    asyncio.run(main())
