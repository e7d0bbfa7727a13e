"""Processor functions for the pipe tests (module level, so spawned workers can import them).

Sinks write what they saw to ``proc.config["report"]`` (a JSON file per instance), which the
test reads after the pipe completes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import numpy as np

from upipe import Processor


def write_report(proc: Processor, data: dict[str, Any]) -> None:
    path = f"{proc.config['report']}.{proc.name}.{proc.instance}.{os.getpid()}"
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def read_reports(prefix: str) -> list[dict[str, Any]]:
    folder, base = os.path.split(prefix)
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(base + ".") and not name.endswith(".tmp"):
            with open(os.path.join(folder, name)) as f:
                out.append(json.load(f))
    return out


async def count_source(proc: Processor) -> None:
    """Emits config['count'] 8-byte little-endian numbers 0..count-1."""
    delay = proc.config.get("delay", 0)
    for i in range(proc.config["count"]):
        await proc.emit_sync(i.to_bytes(8, "little"))
        if delay:
            await asyncio.sleep(delay)


async def endless_source(proc: Processor) -> None:
    i = 0
    while True:
        await proc.emit_sync(i.to_bytes(8, "little"))
        i += 1
        if i % 64 == 0:
            await asyncio.sleep(0.001)


async def plus_one(proc: Processor) -> None:
    delay = proc.config.get("delay", 0)
    async for data in proc:
        await proc.emit_sync((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))
        if delay:
            time.sleep(delay)


async def times(proc: Processor) -> None:
    factor = proc.config["factor"]
    async for data in proc:
        await proc.emit_sync((int.from_bytes(data, "little") * factor).to_bytes(8, "little"))


async def collect(proc: Processor) -> None:
    """Sink: records every number it gets (in order of arrival)."""
    seen = []
    async for data in proc:
        seen.append(int.from_bytes(data, "little"))
    write_report(proc, {"seen": seen, "instance": proc.instance})


def collect_blocking(proc: Processor) -> None:
    """Sink with the blocking face."""
    seen = [int.from_bytes(d, "little") for d in proc]
    write_report(proc, {"seen": seen})


async def raises(proc: Processor) -> None:
    async for data in proc:
        if int.from_bytes(data, "little") == 3:
            raise ValueError("frame 3 is cursed")


async def doubler(proc: Processor) -> None:
    """For emit_sync: reads requests, emits answers (a root and a sink at once)."""
    async for x in proc:
        await proc.emit_sync(x * 2)


async def kills_itself(proc: Processor) -> None:
    await proc.get_sync(timeout=0.2) if False else None
    os.kill(os.getpid(), signal.SIGKILL)


async def probe_faces(proc: Processor) -> None:
    """Checks get/get_sync/emit semantics from inside a worker, reports what it saw."""
    seen: dict[str, Any] = {}
    seen["get_empty"] = await proc.get()  # nothing emitted yet by the (idle) source: None
    try:
        await proc.get_sync(timeout=0.05)
        seen["get_sync_timeout"] = "no error"
    except TimeoutError as exc:
        seen["get_sync_timeout"] = type(exc).__name__
    seen["config"] = proc.config["tag"]
    # the downstream queue holds 2 frames and nobody reads it until we say so
    results = [await proc.emit(b"x") for _ in range(4)]
    seen["emit_results"] = results
    try:
        await proc.emit(None)
        seen["emit_none"] = "accepted"
    except ValueError as exc:
        seen["emit_none"] = str(exc)
    write_report(proc, seen)


async def idle_sink(proc: Processor) -> None:
    """Reads nothing until the prober has reported, then drains."""
    while not any(n.startswith(os.path.basename(proc.config["report"]) + ".probe.")
                  for n in os.listdir(os.path.dirname(proc.config["report"]))):
        await asyncio.sleep(0.01)
    async for _ in proc:
        pass


async def frame_source(proc: Processor) -> None:
    """1 MiB float32 frames, zero-copy: filled in place in the next stage's memory."""
    for i in range(proc.config["count"]):
        arr = proc.alloc_array(262144, np.float32)
        arr[:] = i
        await proc.emit_sync(arr)


async def frame_scale(proc: Processor) -> None:
    async for x in proc:
        out = proc.alloc_array(x.shape, x.dtype)
        np.multiply(x, 2, out=out)
        del x
        await proc.emit_sync(out)


async def frame_check(proc: Processor) -> None:
    n = bad = 0
    writable = False
    async for x in proc:
        v = 2.0 * n
        if x.shape != (262144,) or x.dtype != np.float32 or x.min() != v or x.max() != v:
            bad += 1
        writable |= bool(x.flags.writeable)
        n += 1
    write_report(proc, {"frames": n, "bad": bad, "writable": writable})


async def burst_then_idle(proc: Processor) -> None:
    """config['count'] frames as fast as the pipe takes them, then config['idle'] seconds of
    nothing (the pipe stays up), then the end."""
    for i in range(proc.config["count"]):
        await proc.emit_sync(i.to_bytes(8, "little"))
    await asyncio.sleep(proc.config["idle"])


async def slow_plus_one(proc: Processor) -> None:
    """An I/O-bound stage: waits config['delay'] seconds per frame (like a remote call)."""
    delay = proc.config["delay"]
    async for data in proc:
        await asyncio.sleep(delay)
        await proc.emit_sync((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))


async def slow_doubler(proc: Processor) -> None:
    """A service that takes config['delay'] seconds per request."""
    async for x in proc:
        await asyncio.sleep(proc.config["delay"])
        await proc.emit_sync(x * 2)


async def frame_chunks(proc: Processor) -> None:
    """Checks 1 MiB frames of value n (times config['scale'], default 1) and records which
    chunk of its input's segment each one was (the fan-out tests compare them)."""
    scale = proc.config.get("scale", 1)
    n = bad = 0
    writable = False
    chunks = []
    async for x in proc:
        lease = proc._input._seg.lease_for(x) if proc._input is not None else None
        chunks.append(-1 if lease is None else lease.chunk)
        if x.shape != (262144,) or x.min() != scale * n or x.max() != scale * n:
            bad += 1
        writable |= bool(x.flags.writeable)
        n += 1
    write_report(proc, {"name": proc.name, "frames": n, "bad": bad, "writable": writable,
                        "chunks": chunks})


async def array_source(proc: Processor) -> None:
    """config['count'] int64 arrays of config['elems'] elements, array i filled with i."""
    for i in range(proc.config["count"]):
        await proc.emit_sync(np.full(proc.config["elems"], i, np.int64))


async def array_collect(proc: Processor) -> None:
    """Records the value of every array (checking that it is uniform) in its report, after
    every frame; slow if config['delay']."""
    delay = proc.config.get("delay", 0)
    seen = []
    bad = 0
    async for x in proc:
        v = int(x[0])
        bad += int(x.min() != v or x.max() != v)
        seen.append(v)
        del x
        if delay:
            await asyncio.sleep(delay)
        # Before the frame is acked (at the next one): a killed instance leaves behind what it
        # saw, and the frame it was on goes to its sibling.
        write_report(proc, {"seen": seen, "bad": bad})
    write_report(proc, {"seen": seen, "bad": bad})


async def slow_frame_copy(proc: Processor) -> None:
    """Emits a copy of every frame into a fresh zero-copy buffer, slowly."""
    async for x in proc:
        out = proc.alloc_array(x.shape, x.dtype)
        out[:] = x
        del x
        await asyncio.sleep(proc.config.get("delay", 0.005))
        await proc.emit_sync(out)


async def count_frames(proc: Processor) -> None:
    n = 0
    async for _ in proc:
        n += 1
    write_report(proc, {"frames": n})
