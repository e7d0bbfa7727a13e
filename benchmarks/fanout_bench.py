#!/usr/bin/env python3
"""Fan-out of 1 MiB frames: one source, k = 1, 2, 3 downstream processors, each receiving every
frame. With zero-copy fan-out a frame is one chunk that every downstream's input names, so the
cost of the source does not grow with k.

Run ``python benchmarks/fanout_bench.py [--quick] [--repeat 3] [--out FILE]``. Prints a table
and saves JSON (default ``benchmarks/results/fanout_bench.json``).

The clock runs from the moment the last sink has received frame 50 (every worker has started)
to the last frame. The source writes frame i as ``alloc_array`` filled with i (``zerocopy``) or
as an ordinary array (``copy``: one copy into the shared chunk, whatever k is). Each sink
checks three elements of every frame (first, middle, last: the transport is what is measured,
not a full scan), the count and the order, and records which chunk each of the first frames
was; the parent checks that every sink saw every frame and that all k sinks saw the *same
chunk* for each frame (no copy per downstream). A failed check makes the script exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py, beside this script
import numpy as np

from upipe import Pipe, Processor

HERE = Path(__file__).resolve().parent
ELEMS = 262144  # float32: 1 MiB
DEPTH = 8  # frames per input queue
CHUNKS_RECORDED = 64  # the sinks report the chunk of this many first frames
WARMUP = 50  # frames before the clock starts: every sink has started by then


async def source(proc: Processor) -> None:
    zero_copy = proc.config["zero_copy"]
    for i in range(proc.config["count"]):
        if zero_copy:
            arr = proc.alloc_array(ELEMS, np.float32)
            arr.fill(i)
        else:
            arr = np.full(ELEMS, i, np.float32)
        await proc.emit_sync(arr)
        del arr


async def sink(proc: Processor) -> None:
    n = 0
    t_first = t_last = 0
    error = None
    chunks = []
    seg = proc._input._seg if proc._input is not None else None
    async for x in proc:
        if n == WARMUP:
            t_first = time.monotonic_ns()
        if len(chunks) < CHUNKS_RECORDED and seg is not None:
            lease = seg.lease_for(x)
            chunks.append(-1 if lease is None else lease.chunk)
        if error is None and (x.shape != (ELEMS,) or x[0] != n or x[ELEMS // 2] != n
                              or x[-1] != n):
            error = f"frame #{n}: wrong content or shape {x.shape}"
        n += 1
        del x
    t_last = time.monotonic_ns()
    with open(f"{proc.config['report']}.{proc.name}", "w") as f:
        json.dump({"frames": n, "error": error, "chunks": chunks, "t_first_ns": t_first,
                   "t_last_ns": t_last}, f)


async def one_run(k: int, zero_copy: bool, count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="upipe-fanout-") as tmp:
        report = os.path.join(tmp, "r")
        options = {"queue_size": DEPTH, "max_bytes": 3 * DEPTH * ELEMS * 4,
                   "max_message_size": ELEMS * 4}
        src = Processor("src", func=source, config={"count": count, "zero_copy": zero_copy},
                        **options)
        pipe = Pipe(f"fanout-{k}")
        pipe.add(src)
        names = [f"sink{j}" for j in range(k)]
        for name in names:
            src.add(Processor(name, func=sink, config={"report": report}, **options))
        await pipe.start()
        await asyncio.wait_for(pipe.wait_for_completion(), 600)
        reports = []
        for name in names:
            with open(f"{report}.{name}") as f:
                reports.append(json.load(f))
    errors = [r["error"] for r in reports if r["error"]]
    errors += [f"a sink got {r['frames']} frames, not {count}" for r in reports
               if r["frames"] != count]
    chunks = [r["chunks"] for r in reports]
    same_chunk = all(c == chunks[0] for c in chunks) and min(chunks[0], default=0) >= 0
    if k > 1 and not same_chunk:
        errors.append("the sinks did not see the same chunk for each frame: a copy was made")
    # From the moment the last sink reached frame WARMUP (all started) to the last frame.
    t0 = max(r["t_first_ns"] for r in reports)
    t1 = max(r["t_last_ns"] for r in reports)
    fps = (count - WARMUP) / ((t1 - t0) / 1e9) if t1 > t0 else 0.0
    return {"frames_per_s": fps, "delivered_gb_per_s": fps * k * ELEMS * 4 / 1e9,
            "same_chunk": same_chunk, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 frames per run instead of 3,000")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fanout_bench.json")
    args = ap.parse_args(argv)
    count = 300 if args.quick else 3000
    results = []
    failed = False
    print(f"fan-out of 1 MiB frames, {count} frames per run, median of {args.repeat}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'source':10s} {'k':>2s} {'frames/s':>10s} {'delivered GB/s':>15s}  same chunk")
    for zero_copy in (True, False):
        for k in (1, 2, 3):
            runs = [asyncio.run(one_run(k, zero_copy, count)) for _ in range(args.repeat)]
            errors = [e for r in runs for e in r["errors"]]
            failed |= bool(errors)
            fps = statistics.median(r["frames_per_s"] for r in runs)
            entry = {"source": "zerocopy" if zero_copy else "copy", "downstreams": k,
                     "frames_per_s": fps, "delivered_gb_per_s": fps * k * ELEMS * 4 / 1e9,
                     "runs": runs, "same_chunk": all(r["same_chunk"] for r in runs),
                     "errors": errors}
            results.append(entry)
            print(f"{entry['source']:10s} {k:2d} {fps:10,.0f} "
                  f"{entry['delivered_gb_per_s']:15.2f}  {entry['same_chunk'] if k > 1 else '-'}"
                  + (f"  FAILED: {errors[0]}" if errors else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": _common.machine_info(), "count": count,
                                    "repeat": args.repeat, "results": results}, indent=1))
    print(f"results written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
