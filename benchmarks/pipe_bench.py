#!/usr/bin/env python3
"""Throughput and start-up of a 3-stage upipe Pipe (gen -> plus-one -> sink), against the same
pipeline on multiprocessing.Queue.

Run ``python benchmarks/pipe_bench.py [--quick] [--out FILE]``; see benchmarks/README.md.

Every stage is an ordinary processor written with the seed's await-per-frame API
(``await proc.emit_sync(x)``, ``async for data in proc``). The sink verifies what it receives
(count, sum, order, every element of a frame) and writes its timing to a JSON report whose path
is in the processor's config; the parent re-checks the totals. Any mismatch, exception or hang
is reported and makes the script exit non-zero after the remaining cases have run.

This file is also the ``entry=`` script of the start-up case and the module that ``func=``
workers import (spawned workers import the pipe script): keep its top level light.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.forkserver
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py, beside this script
import numpy as np

import upipe
from upipe import Pipe, Processor

# -- workload ----------------------------------------------------------------------------------

SMALL_DEPTH = 256  # frames per input queue (Processor's default queue_size; mp.Queue maxsize)
FRAME_ELEMS = 262144  # float32 elements: 1 MiB frames
FRAME_BYTES = FRAME_ELEMS * 4
FRAME_DEPTH = 8  # frames per input queue, and 1 MiB chunks per queue's pool
FRAME_POOL = 3 * FRAME_DEPTH * FRAME_BYTES  # max_bytes: 4 KiB, 64 KiB, 1 MiB classes, 8 each
FIRST_FRAMES = 100  # frames the source of the start-up case emits
SMALL_POOL = 1 << 20  # max_bytes of the input queues in the "1MiB pools" start-up case

CASE_TIMEOUT_BASE = 120.0  # seconds; plus a per-frame allowance (see case_timeout)
BG_LOAD_WARN = 0.15  # CPUs of other processes' work during a run that make it "noisy"

PRETTY = {
    "small": "8-byte frames, gen -> plus-one -> sink",
    "frames": "1 MiB float32 frames, gen -> plus-one -> sink",
    "first": "time to first frame, 3-stage pipe",
}


# -- the processors (module level: func= workers import this file) ------------------------------
#
# Sinks never raise on bad data: they note the first problem, keep counting, and report; the
# parent turns a problem into a failed case. A sink's report: count, the sum of what it got
# (plus-one values or frame ids), t_first_ns (first frame), t_last_ns (the expected last frame,
# by count), all CLOCK_MONOTONIC, which is the same clock in every process.


def _write_report(path: str, data: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _watchdog(proc: Processor) -> None:
    """A hang shows where it is: dump every thread's stack before the parent gives up."""
    timeout = proc.config.get("timeout")
    if timeout:
        faulthandler.dump_traceback_later(max(1.0, timeout - 5.0), exit=False)


def _report_cpu(proc: Processor) -> None:
    """Forkserver workers are not our children: the parent cannot count their CPU time as its
    own (see run_case), so they report it."""
    if proc.config.get("report_cpu"):
        ru = resource.getrusage(resource.RUSAGE_SELF)
        _write_report(f"{proc.config['report']}.cpu.{proc.name}",
                      {"cpu_s": ru.ru_utime + ru.ru_stime})


async def small_gen(proc: Processor) -> None:
    """Emits the counters 0 .. count-1 as 8-byte little-endian bytes."""
    _watchdog(proc)
    emit = proc.emit_sync
    for i in range(proc.config["count"]):
        await emit(i.to_bytes(8, "little"))
    _report_cpu(proc)


async def small_plus_one(proc: Processor) -> None:
    _watchdog(proc)
    emit = proc.emit_sync
    async for data in proc:
        await emit((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))
    _report_cpu(proc)


async def small_sink(proc: Processor) -> None:
    """Expects 1 .. count, in order (one source instance: its order is kept end to end)."""
    _watchdog(proc)
    n = proc.config["count"]
    clock = time.monotonic_ns
    count = total = 0
    t_first = t_last = 0
    error = None
    async for data in proc:
        if not count:
            t_first = clock()
        count += 1
        value = int.from_bytes(data, "little")
        total += value
        if value != count and error is None:
            error = f"frame #{count - 1}: expected {count}, got {value} ({len(data)} B)"
        if count == n:
            t_last = clock()
    _report_cpu(proc)
    _write_report(proc.config["report"], {"count": count, "sum": total, "t_first_ns": t_first,
                                          "t_last_ns": t_last, "error": error})


def small_gen_blocking(proc: Processor) -> None:
    _watchdog(proc)
    emit = proc.emit_blocking
    for i in range(proc.config["count"]):
        emit(i.to_bytes(8, "little"))


def small_plus_one_blocking(proc: Processor) -> None:
    _watchdog(proc)
    emit = proc.emit_blocking
    for data in proc:
        emit((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))


def small_sink_blocking(proc: Processor) -> None:
    _watchdog(proc)
    n = proc.config["count"]
    clock = time.monotonic_ns
    count = total = 0
    t_first = t_last = 0
    error = None
    for data in proc:
        if not count:
            t_first = clock()
        count += 1
        value = int.from_bytes(data, "little")
        total += value
        if value != count and error is None:
            error = f"frame #{count - 1}: expected {count}, got {value} ({len(data)} B)"
        if count == n:
            t_last = clock()
    _write_report(proc.config["report"], {"count": count, "sum": total, "t_first_ns": t_first,
                                          "t_last_ns": t_last, "error": error})


async def frame_gen(proc: Processor) -> None:
    """Frame i has every element == i. Zero copy: filled in place in the next stage's shared
    memory (``alloc_array``); copy: an ordinary array, copied into a chunk by the emit."""
    _watchdog(proc)
    emit = proc.emit_sync
    if proc.config["zero_copy"]:
        alloc = proc.alloc_array
        for i in range(proc.config["count"]):
            arr = alloc(FRAME_ELEMS, np.float32)  # waits for a chunk the next stage frees
            arr[:] = i
            await emit(arr)
            del arr
    else:
        arr = np.empty(FRAME_ELEMS, dtype=np.float32)
        for i in range(proc.config["count"]):
            arr[:] = i
            await emit(arr)  # copied into a chunk: arr can be refilled at once


async def frame_plus_one(proc: Processor) -> None:
    """Adds one into a new buffer: in the sink's shared memory (zero copy) or a private array
    that the emit copies (copy)."""
    _watchdog(proc)
    emit = proc.emit_sync
    if proc.config["zero_copy"]:
        alloc = proc.alloc_array
        async for x in proc:
            out = alloc(FRAME_ELEMS, np.float32)
            np.add(x, 1, out=out)
            del x  # our input chunk goes back to the source now
            await emit(out)
            del out
    else:
        out = np.empty(FRAME_ELEMS, dtype=np.float32)
        async for x in proc:
            np.add(x, 1, out=out)
            del x
            await emit(out)


def _check_frame(x: Any, want: float) -> str | None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (FRAME_ELEMS,):
        return f"expected float32[{FRAME_ELEMS}], got {type(x).__name__} " \
               f"{getattr(x, 'dtype', '')}{list(getattr(x, 'shape', ()))}"
    lo, hi = x.min(), x.max()  # reads every element
    if lo != want or hi != want:
        return f"expected every element == {want}, got min={lo} max={hi}"
    return None


async def frame_sink(proc: Processor) -> None:
    """Frame i arrives with every element == i + 1; the report's sum is of the frame ids."""
    _watchdog(proc)
    n = proc.config["count"]
    clock = time.monotonic_ns
    count = total = 0
    t_first = t_last = 0
    error = None
    async for x in proc:
        if not count:
            t_first = clock()
        bad = _check_frame(x, float(count + 1))
        if bad and error is None:
            error = f"frame #{count}: {bad}"
        del x
        total += count
        count += 1
        if count == n:
            t_last = clock()
    _write_report(proc.config["report"], {"count": count, "sum": total, "t_first_ns": t_first,
                                          "t_last_ns": t_last, "error": error})


WORKERS: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
    "small": (small_gen, small_plus_one, small_sink),
    "small-blocking": (small_gen_blocking, small_plus_one_blocking, small_sink_blocking),
    "frames": (frame_gen, frame_plus_one, frame_sink),
}
STAGES = ("gen", "plus-one", "sink")


async def _entry_main() -> None:
    """This file run as an ``entry=`` script by a pipe: join, then run the stage's function."""
    proc = Processor(os.environ["UPIPE_PROCESSOR"])
    await proc.join()
    funcs = WORKERS[proc.config["workload"]]
    await funcs[STAGES.index(proc.name)](proc)


# -- the multiprocessing.Queue pipeline ---------------------------------------------------------
#
# Three spawn processes and two bounded queues; the same per-frame work and the same sink
# report. None is the end-of-stream marker.


def _die_with_parent(parent_pid: int) -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(3)


def mp_stage(stage: str, workload: str, qin: Any, qout: Any, config: dict[str, Any],
             parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    faulthandler.dump_traceback_later(max(1.0, config["timeout"] - 5.0), exit=False)
    n = config["count"]
    if stage == "gen":
        put = qout.put
        if workload == "small":
            for i in range(n):
                put(i.to_bytes(8, "little"))
        else:
            for i in range(n):
                put(np.full(FRAME_ELEMS, i, dtype=np.float32))  # pickled later: a fresh array
        put(None)
    elif stage == "plus-one":
        get, put = qin.get, qout.put
        if workload == "small":
            while (data := get()) is not None:
                put((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))
        else:
            while (x := get()) is not None:
                put(x + np.float32(1))
        put(None)
    else:
        _mp_sink(workload, qin, config)
    if qout is not None:
        qout.close()
        qout.join_thread()  # everything flushed to the pipe before we exit


def _mp_sink(workload: str, qin: Any, config: dict[str, Any]) -> None:
    n = config["count"]
    get, clock = qin.get, time.monotonic_ns
    count = total = 0
    t_first = t_last = 0
    error = None
    while (data := get()) is not None:
        if not count:
            t_first = clock()
        if workload == "small":
            count += 1
            value = int.from_bytes(data, "little")
            total += value
            if value != count and error is None:
                error = f"frame #{count - 1}: expected {count}, got {value}"
        else:
            bad = _check_frame(data, float(count + 1))
            if bad and error is None:
                error = f"frame #{count}: {bad}"
            total += count
            count += 1
        del data
        if count == n:
            t_last = clock()
    _write_report(config["report"], {"count": count, "sum": total, "t_first_ns": t_first,
                                     "t_last_ns": t_last, "error": error})


# -- cases -------------------------------------------------------------------------------------


class CaseFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "verification" | "error" | "timeout"


@dataclass
class Case:
    scenario: str  # small | frames | first
    peer: str
    note: str
    kind: str  # upipe | mp
    params: dict[str, Any] = field(default_factory=dict)
    repeat: int = 0  # runs wanted; 0: --repeat


def case_timeout(case: Case) -> float:
    p = case.params
    if p.get("case_timeout"):
        return float(p["case_timeout"])
    per_frame = 30e-6 if p["workload"].startswith("small") else 20e-3
    return CASE_TIMEOUT_BASE + p["count"] * per_frame


def build_cases(sizes: dict[str, int], repeat: int) -> list[Case]:
    cases: list[Case] = []

    def add(scenario: str, peer: str, note: str, kind: str, **params: Any) -> None:
        rep = params.pop("repeat", 0)
        cases.append(Case(scenario, peer, note, kind, params, rep))

    n_small, n_frames = sizes["small_frames"], sizes["big_frames"]
    add("small", "upipe", "await emit_sync / async for (func=, spawn)", "upipe",
        workload="small", count=n_small)
    add("small", "upipe-blocking", "emit_blocking / for data in proc (func=, spawn)", "upipe",
        workload="small-blocking", count=n_small)
    add("small", "mp.Queue", f"3 spawn processes, 2 x mp.Queue(maxsize={SMALL_DEPTH}), "
        "put / get", "mp", workload="small", count=n_small)
    add("frames", "upipe-zerocopy", "alloc_array + fill, plus-one into a new alloc_array",
        "upipe", workload="frames", count=n_frames, zero_copy=True)
    add("frames", "upipe-copy", "ordinary arrays: each emit copies into a chunk", "upipe",
        workload="frames", count=n_frames, zero_copy=False)
    add("frames", "mp.Queue", f"pickled; 2 x mp.Queue(maxsize={FRAME_DEPTH})", "mp",
        workload="frames", count=sizes["mp_frames"])
    first_runs = max(repeat, sizes["first_runs"])
    add("first", "upipe func=", "3 func= workers (multiprocessing spawn)", "upipe",
        workload="small", count=FIRST_FRAMES, repeat=first_runs)
    add("first", "upipe 1MiB pools", "func= (spawn), input queues with max_bytes=1 MiB "
        "(default 64 MiB, reserved at start())", "upipe", workload="small", count=FIRST_FRAMES,
        max_bytes=SMALL_POOL, repeat=first_runs)
    add("first", "upipe forkserver", "func= with Pipe(start_method='forkserver'), server warm, "
        "upipe+numpy preloaded", "upipe", workload="small", count=FIRST_FRAMES,
        start_method="forkserver", repeat=first_runs)
    add("first", "upipe entry=", "3 entry= scripts (python pipe_bench.py)", "upipe",
        workload="small", count=FIRST_FRAMES, entry=True, repeat=first_runs)
    add("first", "mp.Queue", "3 multiprocessing spawn processes (reference)", "mp",
        workload="small", count=FIRST_FRAMES, repeat=first_runs)
    return cases


# -- running a case ----------------------------------------------------------------------------


def run_case(ctx: Any, case: Case) -> dict[str, Any]:
    """One run of a case: the sink's report, the parent's clock readings and the background
    load. Raises CaseFailed."""
    timeout = case_timeout(case)
    busy0, steal0, own0, wall0 = *_machine_cpu(), _family_cpu(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="upipe-pipe-bench-") as tmp:
        config = {"workload": case.params["workload"], "count": case.params["count"],
                  "zero_copy": case.params.get("zero_copy", False),
                  "report": os.path.join(tmp, "sink.json"), "timeout": timeout,
                  "report_cpu": case.params.get("start_method") == "forkserver"}
        if case.kind == "upipe":
            try:
                clocks = asyncio.run(_run_upipe(case, config, timeout))
            finally:  # the pipe's loop handled SIGTERM while it ran, and reset it after
                signal.signal(signal.SIGTERM, _exit_on_sigterm)
        else:
            clocks = _run_mp(ctx, case, config, timeout)
        try:
            with open(config["report"]) as f:
                report = json.load(f)
        except (OSError, ValueError) as exc:
            raise CaseFailed("error", f"the sink wrote no report: {exc}") from None
        busy1, steal1 = _machine_cpu()
        wall = time.monotonic() - wall0
        ours = _family_cpu() - own0  # this process and its reaped children
        if config["report_cpu"]:  # workers forked by the fork server: they say what they used
            for stage in STAGES:
                try:
                    with open(f"{config['report']}.cpu.{stage}") as f:
                        ours += json.load(f)["cpu_s"]
                except (OSError, ValueError):
                    pass
    return {**report, **clocks, "bg_load_cpus": max(0.0, busy1 - busy0 - ours) / wall,
            "steal_cpus": (steal1 - steal0) / wall}


async def _run_upipe(case: Case, config: dict[str, Any], timeout: float) -> dict[str, int]:
    frames = config["workload"] == "frames"
    options: dict[str, Any] = (
        {"queue_size": FRAME_DEPTH, "max_bytes": FRAME_POOL, "max_message_size": FRAME_BYTES}
        if frames else {"queue_size": SMALL_DEPTH}
    )
    if case.params.get("max_bytes"):
        options["max_bytes"] = case.params["max_bytes"]
    if case.params.get("entry"):
        procs = [Processor(stage, entry=__file__, config=config, **options) for stage in STAGES]
    else:
        procs = [Processor(stage, func=func, config=config, **options)
                 for stage, func in zip(STAGES, WORKERS[config["workload"]], strict=True)]
    pipe = Pipe(f"bench-{case.scenario}", start_method=case.params.get("start_method", "spawn"))
    pipe.add(procs[0]).add(procs[1]).add(procs[2])
    t0 = time.monotonic_ns()
    await pipe.start()
    t_started = time.monotonic_ns()
    try:
        await asyncio.wait_for(pipe.wait_for_completion(), timeout)
    except TimeoutError:
        await pipe.terminate(timeout=2.0)
        raise CaseFailed("timeout", f"the pipe did not complete within {timeout:.0f} s "
                         "(hang? the workers' stacks are on stderr)") from None
    except upipe.ProcessorError as exc:
        await pipe.terminate(timeout=2.0)
        raise CaseFailed("error", str(exc)) from None
    t_done = time.monotonic_ns()
    return {"t0_ns": t0, "t_started_ns": t_started, "t_done_ns": t_done}


def _run_mp(ctx: Any, case: Case, config: dict[str, Any], timeout: float) -> dict[str, int]:
    depth = FRAME_DEPTH if config["workload"] == "frames" else SMALL_DEPTH
    t0 = time.monotonic_ns()
    q1, q2 = ctx.Queue(maxsize=depth), ctx.Queue(maxsize=depth)
    wiring = {"gen": (None, q1), "plus-one": (q1, q2), "sink": (q2, None)}
    procs = []
    try:
        for stage in STAGES:
            qin, qout = wiring[stage]
            p = ctx.Process(target=mp_stage, name=f"bench-mp-{stage}", daemon=True,
                            args=(stage, config["workload"], qin, qout, config, os.getpid()))
            p.start()
            procs.append(p)
        t_started = time.monotonic_ns()
        deadline = time.monotonic() + timeout
        pending = {p.sentinel: p for p in procs}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaseFailed("timeout", f"the mp pipeline did not complete within "
                                 f"{timeout:.0f} s (hang? the stacks are on stderr)")
            for s in mp.connection.wait(list(pending), left):
                p = pending.pop(s)  # type: ignore[call-overload]
                p.join()
                if p.exitcode != 0:
                    raise CaseFailed("error", f"mp stage {p.name} exited with {p.exitcode} "
                                     "(its traceback is on stderr)")
        t_done = time.monotonic_ns()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        for q in (q1, q2):
            q.close()
            q.join_thread()
    return {"t0_ns": t0, "t_started_ns": t_started, "t_done_ns": t_done}


def _machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _family_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def summarize(case: Case, res: dict[str, Any]) -> dict[str, Any]:
    """The metrics of one run; re-checks the sink's count and sum. Raises CaseFailed."""
    n = case.params["count"]
    if res["error"]:
        raise CaseFailed("verification", f"sink: {res['error']}")
    if case.params["workload"].startswith("small"):
        want = n * (n + 1) // 2  # 1 .. n: every counter, plus one
    else:
        want = n * (n - 1) // 2  # frame ids 0 .. n-1
    if res["count"] != n or res["sum"] != want:
        raise CaseFailed("verification", f"sink got {res['count']} frames with sum "
                         f"{res['sum']}, expected {n} and {want}")
    span = (res["t_last_ns"] - res["t_first_ns"]) / 1e9
    e2e = (res["t_done_ns"] - res["t0_ns"]) / 1e9
    out: dict[str, Any] = {
        "frames": n,
        "first_frame_s": (res["t_first_ns"] - res["t0_ns"]) / 1e9,
        "start_call_s": (res["t_started_ns"] - res["t0_ns"]) / 1e9,
        "steady_seconds": span,
        "e2e_seconds": e2e,
        "frames_per_s": n / span if span > 0 else None,
        "e2e_frames_per_s": n / e2e,
        "bg_load_cpus": res["bg_load_cpus"],
        "steal_cpus": res["steal_cpus"],
    }
    if case.params["workload"] == "frames":
        out["gb_per_s"] = n * FRAME_BYTES / span / 1e9 if span > 0 else None
    return out


PRIMARY = {  # the metric that ranks runs, and whether higher is better
    "small": ("frames_per_s", True),
    "frames": ("frames_per_s", True),
    "first": ("first_frame_s", False),
}


def make_entry(case: Case, runs: list[dict[str, Any]],
               failure: dict[str, Any] | None) -> dict[str, Any]:
    """One table row: the median run's metrics, every run's, and the spread; or the failure.
    Runs during which other processes kept the CPUs busy are left out when there are quiet ones.
    """
    entry: dict[str, Any] = {"scenario": case.scenario, "peer": case.peer, "note": case.note}
    if failure is not None:
        return {**entry, "ok": False, **failure, "runs": runs}
    if not runs:
        return {**entry, "ok": False, "failure": "error", "error": "no run", "runs": runs}
    key, higher = PRIMARY[case.scenario]
    quiet = [r for r in runs if r["bg_load_cpus"] <= BG_LOAD_WARN] or runs
    ranked = sorted(quiet, key=lambda r: r[key] or 0.0, reverse=higher)
    median = ranked[len(ranked) // 2]
    return {**entry, "ok": True, **median, "primary": key,
            "primary_all": [r[key] for r in quiet],
            "bg_load_max": max(r["bg_load_cpus"] for r in quiet),
            "runs_used": len(quiet), "runs": runs}


# -- report ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return _common.machine_info(("upipe", "numpy", "cffi"))


def _fmt(x: float | None, unit: float = 1.0, digits: int = 0) -> str:
    return "-" if x is None else f"{x / unit:,.{digits}f}"


def _spread(e: dict[str, Any], unit: float, digits: int) -> str:
    values = [v for v in e.get("primary_all") or [] if v is not None]
    if len(values) < 2:
        return ""
    return f"{min(values) / unit:,.{digits}f}-{max(values) / unit:,.{digits}f}"


def _status(e: dict[str, Any]) -> str:
    if e["ok"]:
        if e["bg_load_max"] > BG_LOAD_WARN:
            return f"{e['note']} [background load up to {e['bg_load_max']:.2f} CPU]"
        return e["note"]
    return f"FAILED ({e['failure']}): {e['error'].splitlines()[0][:120]}"


def print_tables(entries: list[dict[str, Any]]) -> None:
    """One table per scenario; "range" is the spread of the main metric over the used runs."""
    for sc in ("small", "frames", "first"):
        rows = [e for e in entries if e["scenario"] == sc]
        if not rows:
            continue
        print(f"\n== {PRETTY[sc]} ==")
        if sc in ("small", "frames"):
            ref = next((e.get("frames_per_s") for e in rows if e["ok"]
                        and e["peer"] == ("upipe" if sc == "small" else "upipe-zerocopy")), None)
            gb = sc == "frames"
            print(f"{'peer':<16}{'frames/s':>10}{'range':>18}" + (f"{'GB/s':>7}" if gb else "")
                  + f"{'e2e/s':>10}{'1st s':>7}{'upipe is':>10}  notes")
            for e in rows:
                rate = e.get("frames_per_s")
                rel = f"{ref / rate:.2f}x" if rate and ref else "-"
                print(f"{e['peer']:<16}{_fmt(rate):>10}{_spread(e, 1, 0):>18}"
                      + (f"{_fmt(e.get('gb_per_s'), 1, 2):>7}" if gb else "")
                      + f"{_fmt(e.get('e2e_frames_per_s')):>10}"
                      f"{_fmt(e.get('first_frame_s'), 1, 2):>7}{rel:>10}  {_status(e)}")
        else:
            print(f"{'peer':<16}{'1st frame s':>12}{'range':>14}{'start() s':>10}"
                  f"{'done s':>8}  notes")
            for e in rows:
                print(f"{e['peer']:<16}{_fmt(e.get('first_frame_s'), 1, 3):>12}"
                      f"{_spread(e, 1, 3):>14}{_fmt(e.get('start_call_s'), 1, 3):>10}"
                      f"{_fmt(e.get('e2e_seconds'), 1, 3):>8}  {_status(e)}")


def evaluate_targets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def get(sc: str, peer: str, key: str) -> float | None:
        for e in entries:
            if e["scenario"] == sc and e["peer"] == peer and e["ok"]:
                value = e.get(key)
                return None if value is None else float(value)
        return None

    up, mpq = get("small", "upipe", "frames_per_s"), get("small", "mp.Queue", "frames_per_s")
    targets = [
        ("small frames >= 300,000 frames/s", up, 300e3, "frames/s"),
        ("small frames >= 5x the mp.Queue pipe", None if up is None or not mpq else up / mpq,
         5.0, "x"),
        ("1 MiB frames >= 5 GB/s (zero copy)", get("frames", "upipe-zerocopy", "gb_per_s"),
         5.0, "GB/s"),
        ("first frame <= 0.3 s (func=, spawn)", get("first", "upipe func=", "first_frame_s"),
         0.3, "s"),
        ("first frame <= 0.3 s (entry=)", get("first", "upipe entry=", "first_frame_s"),
         0.3, "s"),
    ]
    out = []
    for name, value, goal, unit in targets:
        lower_is_better = unit == "s"
        met = None if value is None else (value <= goal if lower_is_better else value >= goal)
        out.append({"target": name, "value": value, "goal": goal, "unit": unit, "met": met})
    return out


def print_targets(targets: list[dict[str, Any]]) -> None:
    print("\n== targets (informative, not asserted) ==")
    for t in targets:
        v = t["value"]
        if v is None:
            shown = "n/a"
        elif t["unit"] == "frames/s":
            shown = f"{v:,.0f} frames/s"
        elif t["unit"] == "x":
            shown = f"{v:.2f}x"
        elif t["unit"] == "GB/s":
            shown = f"{v:.2f} GB/s"
        else:
            shown = f"{v:.3f} s"
        status = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"  {t['target']:<40}{shown:>18}   {status}")


# -- main --------------------------------------------------------------------------------------


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a quick smoke run)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "pipe_bench.json",
                    help="JSON results file (default: %(default)s)")
    ap.add_argument("--scenarios", default=",".join(PRETTY),
                    help="comma-separated subset of: " + ",".join(PRETTY))
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per case; the median run is reported (default: %(default)s; "
                    "the start-up cases run at least 7 times, 3 with --quick)")
    ap.add_argument("--case-timeout", type=float, default=0.0,
                    help="seconds before a run counts as hung (default: scaled to its size)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    scenarios = set(args.scenarios.split(","))
    unknown = scenarios - set(PRETTY)
    if unknown:
        ap.error(f"unknown scenario: {', '.join(sorted(unknown))}")

    sizes = {
        "small_frames": 100_000 if args.quick else 1_000_000,
        "big_frames": 300 if args.quick else 10_000,
        "mp_frames": 100 if args.quick else 1_000,
        "first_runs": 3 if args.quick else 7,
    }
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` reaps the children
    cases = [c for c in build_cases(sizes, args.repeat) if c.scenario in scenarios]
    for c in cases:
        c.params["case_timeout"] = args.case_timeout
        c.repeat = c.repeat or args.repeat

    info = machine_info()
    print(f"upipe pipe benchmark ({'quick' if args.quick else 'full'}): "
          f"{info['cpu_count']} CPUs ({info['cpu_model']}), Python {info['python']}, "
          f"{info['platform']}")
    print(f"sizes: {sizes}")

    ctx = mp.get_context("spawn")
    if any(c.params.get("start_method") == "forkserver" for c in cases):
        # Start the fork server now, with upipe and numpy imported once in it: its workers then
        # start by fork, with no interpreter start-up and no imports (the server's own start-up
        # is a one-off per pipe script, not part of any pipe's time to first frame).
        fs = mp.get_context("forkserver")
        fs.set_forkserver_preload(["upipe", "numpy"])
        mp.forkserver.ensure_running()
    started = time.monotonic()
    runs: dict[int, list[dict[str, Any]]] = {id(c): [] for c in cases}
    failed: dict[int, dict[str, Any]] = {}

    def quiet_runs(case: Case) -> int:
        return sum(r["bg_load_cpus"] <= BG_LOAD_WARN for r in runs[id(case)])

    # Repeats go round-robin over the cases, so slow drifts of the machine hit every peer alike.
    # A run during which other processes were busy is repeated (up to `repeat` extra rounds).
    rounds = 2 * max(c.repeat for c in cases) if cases else 0
    for rnd in range(rounds):
        todo = [c for c in cases if id(c) not in failed
                and (len(runs[id(c)]) < c.repeat if rnd < c.repeat
                     else rnd < 2 * c.repeat and quiet_runs(c) < c.repeat)]
        if not todo:
            break
        for case in todo:
            extra = rnd >= case.repeat
            label = f"round {rnd + 1}" + (" (extra: background load)" if extra else "")
            print(f"{label} [{case.scenario}] {case.peer} ...", end=" ", flush=True)
            t = time.monotonic()
            try:
                run = summarize(case, run_case(ctx, case))
                runs[id(case)].append(run)
                bg = run["bg_load_cpus"]
                print(f"ok ({time.monotonic() - t:.1f} s"
                      + (f", background load {bg:.2f} CPU" if bg > BG_LOAD_WARN else "") + ")",
                      flush=True)
            except CaseFailed as exc:
                failed[id(case)] = {"failure": exc.kind, "error": str(exc)}
                print(f"FAILED ({exc.kind}): {str(exc).splitlines()[0]}", flush=True)
            except Exception as exc:
                failed[id(case)] = {"failure": "error", "error": f"{type(exc).__name__}: "
                                    f"{exc}\n{traceback.format_exc()}"}
                print(f"FAILED (error: {type(exc).__name__}: {exc})", flush=True)
    entries = [make_entry(c, runs[id(c)], failed.get(id(c))) for c in cases]

    print_tables(entries)
    targets = evaluate_targets(entries)
    print_targets(targets)
    noisy = [e for e in entries if e["ok"] and e["bg_load_max"] > BG_LOAD_WARN]
    if noisy:
        print(f"\nnote: other processes used the CPUs during {len(noisy)} case(s) (see "
              "'background load'): those numbers are pessimistic; re-run on a quiet machine")
    digest_after = machine_info()["upipe_source_sha256"]
    if digest_after != info["upipe_source_sha256"]:
        print("\nWARNING: upipe's sources changed during the run: results mix two versions")

    failures = [e for e in entries if not e["ok"]]
    report = {
        "machine": info,
        "mode": "quick" if args.quick else "full",
        "repeat": args.repeat,
        "sizes": sizes,
        "constants": {"frame_bytes": FRAME_BYTES, "small_depth": SMALL_DEPTH,
                      "frame_depth": FRAME_DEPTH, "first_frames": FIRST_FRAMES},
        "wall_seconds": time.monotonic() - started,
        "upipe_source_sha256_after": digest_after,
        "results": entries,
        "targets": targets,
        "failures": [{k: e[k] for k in ("scenario", "peer", "failure", "error")}
                     for e in failures],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nresults written to {args.out}")

    if failures:
        print(f"\n{len(failures)} case(s) FAILED:", file=sys.stderr)
        for e in failures:
            print(f"  [{e['scenario']}] {e['peer']}: {e['failure']}: {e['error']}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if os.environ.get("UPIPE_PROCESSOR"):  # started by a pipe as an entry= script
        asyncio.run(_entry_main())
    else:
        sys.exit(main())
