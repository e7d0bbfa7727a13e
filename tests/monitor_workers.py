"""Processor functions for the monitor tests: an endless, paced stream that keeps no state."""

from __future__ import annotations

import asyncio

from upipe import Processor


async def paced_source(proc: Processor) -> None:
    """Endless: 256-byte frames, config['batch'] of them, then a short sleep (a steady rate
    that leaves the shared cores to the rest of the tests)."""
    batch = proc.config.get("batch", 32)
    pause = proc.config.get("pause", 0.005)
    payload = bytes(256)
    while True:
        for _ in range(batch):
            await proc.emit_sync(payload)
        await asyncio.sleep(pause)


async def relay(proc: Processor) -> None:
    async for data in proc:
        await proc.emit_sync(data)


async def drain(proc: Processor) -> None:
    async for _ in proc:
        pass
