#!/usr/bin/env python3
"""Does watching a pipe slow it down? The same 3-stage pipe (gen -> plus-one -> sink, small
frames, as fast as it goes), timed without a monitor and with ``upipe top`` attached.

Run ``python benchmarks/monitor_overhead.py [--frames N] [--repeat R] [--interval S]``.

``top`` runs as a real ``python -m upipe top --interval 0.25 --pipe NAME`` in a
pseudo-terminal (so rich renders as it would for a user), started before the pipe, so it polls
during the whole run: every refresh asks the pipe for a snapshot over its control socket (the
pipe's event loop answers it, reading the stats block and each worker's /proc entries), and
top's own rendering competes with the workers for the CPUs. Runs alternate (off, top, off,
top, ...) so that a machine busy with something else hurts both alike; the median of each is
reported, with every run. Nothing is asserted: it prints the numbers (docs/monitoring.md
quotes them).

This file is also the module that the ``func=`` workers import: keep its top level light.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pty
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from upipe import Pipe, Processor


async def gen(proc: Processor) -> None:
    for i in range(proc.config["count"]):
        await proc.emit_sync(i.to_bytes(8, "little"))


async def plus_one(proc: Processor) -> None:
    async for data in proc:
        await proc.emit_sync((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))


async def sink(proc: Processor) -> None:
    n = 0
    async for _ in proc:
        n += 1
    if proc.config["check"] and n != proc.config["count"]:
        raise RuntimeError(f"sink saw {n} frames, expected {proc.config['count']}")


async def run_pipe(name: str, frames: int) -> float:
    """Frames per second through the whole pipe, from start() to completion."""
    pipe = Pipe(name)
    pipe.add(Processor("gen", func=gen, config={"count": frames})).add(
        Processor("plus-one", func=plus_one)).add(
        Processor("sink", func=sink, config={"count": frames, "check": True}))
    t0 = time.perf_counter()
    await pipe.start()
    await pipe.wait_for_completion()
    return frames / (time.perf_counter() - t0)


async def snapshot_cost(name: str, n: int = 200) -> tuple[float, float]:
    """What one monitor refresh costs the pipe process (ms of its event loop: the snapshot),
    and the whole round trip of a request over the control socket as top makes it (ms)."""
    from upipe import monitor

    pipe = Pipe(name)
    pipe.add(Processor("gen", func=gen, config={"count": 10**9})).add(
        Processor("plus-one", func=plus_one)).add(
        Processor("sink", func=sink, config={"count": 0, "check": False}))
    await pipe.start()
    try:
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        for _ in range(n):
            pipe.snapshot()
        local = (time.perf_counter() - t0) / n * 1e3
        [address] = [p.address for p in monitor.list_pipes() if p.name == name]

        def requests() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                monitor.request_snapshot(address)
            return (time.perf_counter() - t0) / n * 1e3

        remote = await asyncio.to_thread(requests)
    finally:
        await pipe.terminate()
    return local, remote


class Top:
    """``upipe top`` in a pseudo-terminal whose output a thread reads and throws away."""

    def __init__(self, name: str, interval: float) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "upipe", "top", "--interval", str(interval), "--pipe", name],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.bytes = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                part = os.read(self.master, 65536)
            except OSError:
                return
            if not part:
                return
            self.bytes += len(part)

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        os.write(self.master, b"q")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        os.close(self.master)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.25, help="top's refresh (default 0.25)")
    args = ap.parse_args()
    results: dict[str, list[float]] = {"off": [], "top": []}
    top_cpu: list[float] = []
    name = f"overhead-{os.getpid()}"
    print(f"{args.frames} frames of 8 bytes through gen -> plus-one -> sink, {args.repeat} runs "
          f"each, on {os.cpu_count()} CPUs; top refreshes every {args.interval} s")
    for r in range(args.repeat):
        for mode in ("off", "top"):
            top = Top(name, args.interval) if mode == "top" else None
            drawn = -1
            try:
                if top is not None:
                    time.sleep(1.0)  # started, polling (it shows "no upipe pipes running")
                    cpu0, t0 = top.cpu_seconds(), time.perf_counter()
                rate = asyncio.run(run_pipe(name, args.frames))
                if top is not None:
                    top_cpu.append(100 * (top.cpu_seconds() - cpu0) / (time.perf_counter() - t0))
            finally:
                if top is not None:
                    drawn = top.bytes
                    top.close()
            if drawn == 0:
                print("top drew nothing: is rich installed?", file=sys.stderr)
                return 1
            results[mode].append(rate)
            print(f"  run {r + 1} {mode:>3}: {rate:>10,.0f} frames/s")
    local, remote = asyncio.run(snapshot_cost(name))
    off, on = statistics.median(results["off"]), statistics.median(results["top"])
    summary: dict[str, Any] = {
        "off": off, "top": on, "change_percent": 100 * (on - off) / off,
        "top_cpu_percent": statistics.median(top_cpu), "snapshot_ms": local,
        "request_ms": remote}
    lo, hi = min(results["off"]), max(results["off"])
    print(f"median without a monitor: {off:,.0f} frames/s (runs {lo:,.0f} .. {hi:,.0f})")
    lo, hi = min(results["top"]), max(results["top"])
    print(f"median with upipe top:    {on:,.0f} frames/s ({summary['change_percent']:+.1f} %; "
          f"runs {lo:,.0f} .. {hi:,.0f})")
    print(f"one snapshot costs the pipe's event loop {local:.2f} ms ({local * 4 / 10:.2f} % "
          f"of its time at 4 refreshes a second); a request over the control socket takes "
          f"{remote:.2f} ms round trip")
    print(f"upipe top itself used {summary['top_cpu_percent']:.1f} % of a CPU (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
