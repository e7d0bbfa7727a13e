"""The plus-one pipe from the uPipe README: 'a' emits numbers, 'b' adds one to each.

Run from anywhere: python examples/plus_one/pipe.py [count]
"""

import asyncio
import json
import os
import sys
import tempfile
import time

from upipe import Pipe, Processor

HERE = os.path.dirname(os.path.abspath(__file__))


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = {"count": count, "report": os.path.join(tmp, "report.json")}
        a = Processor("a", entry=os.path.join(HERE, "a.py"), config=config)
        b = Processor("b", entry=os.path.join(HERE, "b.py"), config=config)
        pipe = Pipe("plus-one")
        pipe.add(a).add(b)
        start = time.perf_counter()
        await pipe.start()
        print("Running")
        await pipe.wait_for_completion()
        elapsed = time.perf_counter() - start
        with open(config["report"]) as f:
            report = json.load(f)
    expected = count * (count + 1) // 2  # sum of 1 .. count
    assert report == {"count": count, "sum": expected}, report
    print(f"b received {report['count']:,} frames, sum {report['sum']:,} (expected {expected:,}); "
          f"{count / elapsed:,.0f} frames/s including start-up ({elapsed:.2f} s)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
