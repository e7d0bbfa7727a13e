"""Records the autoscaler's snapshots of a real pipe, for tests/test_autoscale_policy.py.

Run ``python tests/record_autoscale_snapshots.py`` (about 25 s): an I/O-bound middle stage
(5 ms sleep per frame, autoscale=8) under a source that sends for 12 s, then idles. The
autoscaler runs with scaling switched off (its decisions are logged, not applied), so the
recording is of one fixed configuration the policy has to judge: mid at 4 of at most 8
instances, busy and backed up, then idle. Writes tests/data/autoscale_snapshots_io.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pipe_workers as pw  # noqa: E402

from upipe import Pipe, Processor  # noqa: E402
from upipe.autoscale import Autoscaler  # noqa: E402

OUT = os.path.join(HERE, "data", "autoscale_snapshots_io.json")


async def timed_source(proc: Processor) -> None:
    end = time.monotonic() + proc.config["send_s"]
    i = 0
    while time.monotonic() < end:
        await proc.emit_sync(i.to_bytes(8, "little"))
        i += 1
    await asyncio.sleep(proc.config["idle_s"])


async def main(tmp: str) -> None:
    pipe = Pipe("recorded", autoscaler=False)
    pipe.add(Processor("src", func=timed_source, config={"send_s": 12, "idle_s": 10})).add(
        Processor("mid", func=pw.slow_plus_one, config={"delay": 0.005}, autoscale=8,
                  instances=4, queue_size=64)).add(
        Processor("sink", func=pw.collect, config={"report": os.path.join(tmp, "r")}))
    async with pipe:
        await pipe.start()
        recorder = Autoscaler(pipe)  # sampled by hand, never applied
        snaps = []
        t_end = time.monotonic() + 21
        while time.monotonic() < t_end:
            await asyncio.sleep(0.5)
            snaps.append(dataclasses.asdict(recorder.sample()))
        await pipe.terminate()
    with open(OUT, "w") as f:
        json.dump({"note": __doc__.split("\n\n")[1], "snapshots": snaps}, f)
    print(f"{len(snaps)} snapshots written to {OUT}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(tmp))
