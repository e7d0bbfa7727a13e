#!/usr/bin/env python3
"""The autoscaler on a live 3-stage pipe (src -> mid -> sink) against every static allocation.

Run ``python benchmarks/autoscale_bench.py [--quick] [--out FILE]``; see benchmarks/README.md.

Two scenarios: the middle stage burns CPU (~2 ms of pure Python per frame), or waits (5 ms of
sleep per frame, like a remote call). For each, every static count of the middle stage within
the budget runs first (autoscaler off) to find the best throughput; then the autoscaler runs the
same pipe from one instance of each stage for a 30 s steady phase in which the source produces
as fast as the pipe takes, after which the source stops emitting but stays alive (idle), so that
the scale-down can be seen, and then ends.

Throughput is frames through the sink per second, sampled every 0.5 s from
``pipe.snapshot()``. The sink verifies every frame (each number once, the middle stage's work
result recomputed in closed form) and the parent checks the count against what the source
sent: any mismatch, exception or hang is reported and makes the script exit non-zero after the
remaining runs. The targets are informative (met / NOT met), never asserted.

This file is also the module that the ``func=`` workers import (spawned workers import the pipe
script): keep its top level light.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py, beside this script

from upipe import Pipe, Processor
from upipe.autoscale import Knobs

# -- workload ----------------------------------------------------------------------------------

LCG_A, LCG_C, MASK = 1103515245, 12345, 0xFFFFFFFF  # the middle stage's CPU work: an LCG
CPU_WORK = 32_000  # LCG steps per frame in the CPU-heavy scenario (~2 ms of Python here)
IO_SLEEP = 0.005  # seconds of sleep per frame in the I/O scenario
MID_MAX = 8  # autoscale=N of the middle stage
SINK_MAX = 4  # autoscale=N of the sink
SAMPLE_S = 0.5  # sampling period of the parent (the autoscaler's loop runs every 0.5 s too)
MA_S = 2.0  # moving average of the throughput for "time to 90 %"
BG_LOAD_WARN = 0.15  # CPUs of other processes' work during a run that make it "noisy"
STOP_CHECK_NS = 20_000_000  # the source looks for the stop file at most this often

PRETTY = {
    "cpu": "CPU-heavy middle stage: src -> mid (~2 ms of Python per frame) -> sink",
    "io": "I/O-bound middle stage: src -> mid (5 ms sleep per frame) -> sink",
}


def lcg_affine(k: int) -> tuple[int, int]:
    """(A, C) with LCG^k(h) == (A*h + C) & MASK: k steps in closed form (affine maps compose)."""
    result, base = (1, 0), (LCG_A, LCG_C)
    while k:
        if k & 1:  # result = base o result
            result = (base[0] * result[0] & MASK, (base[0] * result[1] + base[1]) & MASK)
        base = (base[0] * base[0] & MASK, (base[0] * base[1] + base[1]) & MASK)
        k >>= 1
    return result


# -- the processors (module level: func= workers import this file) ------------------------------
#
# Frames: the source emits i (8 bytes, little-endian) for i = 0, 1, 2...; the middle stage emits
# i + 1 and LCG^work(i) (8 + 8 bytes); sinks check the work result and that no number comes
# twice, and report a bitmap of what they saw. Sinks never raise on bad data: they note the
# first problem and report it.


def _write_report(path: str, data: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


async def src(proc: Processor) -> None:
    """As fast as the pipe takes (emit_sync: back-pressure) until the stop file appears; then
    idle (alive, emitting nothing) until the end file appears."""
    cfg = proc.config
    stop, end = cfg["stop"], cfg["end"]
    emit = proc.emit_sync
    clock = time.monotonic_ns
    exists = os.path.exists
    i = 0
    next_check = 0
    while True:
        now = clock()
        if now >= next_check:
            if exists(stop):
                break
            next_check = now + STOP_CHECK_NS
        await emit(i.to_bytes(8, "little"))
        i += 1
    _write_report(cfg["report"] + ".src", {"count": i, "t_idle_ns": clock()})
    while not exists(end):
        await asyncio.sleep(0.05)


def lcg(x: int, steps: int) -> int:
    """The middle stage's CPU work: ``steps`` steps of an LCG from x (pure Python)."""
    a, c, mask = LCG_A, LCG_C, MASK
    for _ in range(steps):
        x = (x * a + c) & mask
    return x


async def mid(proc: Processor) -> None:
    work, sleep = proc.config["work"], proc.config["sleep"]
    emit = proc.emit_sync
    async for data in proc:
        x = int.from_bytes(data, "little")
        h = lcg(x, work)
        if sleep:
            await asyncio.sleep(sleep)
        await emit((x + 1).to_bytes(8, "little") + h.to_bytes(8, "little"))


async def sink(proc: Processor) -> None:
    """Checks every frame; reports when its input ends (the end of the stream, or retired)."""
    a, c = lcg_affine(proc.config["work"])
    seen = bytearray(1 << 14)
    count = 0
    error = None
    async for data in proc:
        count += 1
        v = int.from_bytes(data[:8], "little")
        h = int.from_bytes(data[8:16], "little")
        if len(data) != 16 or v < 1 or h != (a * (v - 1) + c) & MASK:
            if error is None:
                error = f"bad frame {bytes(data)[:16].hex()} ({len(data)} B)"
            continue
        byte, bit = v >> 3, 1 << (v & 7)
        if byte >= len(seen):
            seen.extend(bytes(max(len(seen), byte + 1 - len(seen))))
        if seen[byte] & bit:
            if error is None:
                error = f"frame {v} seen twice"
            continue
        seen[byte] |= bit
    _write_report(f"{proc.config['report']}.sink.{proc.instance}.{os.getpid()}", {
        "count": count, "error": error,
        "bitmap": base64.b64encode(zlib.compress(bytes(seen))).decode()})


# -- measuring --------------------------------------------------------------------------------


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


def _self_cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RunFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _verify(tmp: Path, sent: int) -> None:
    """Every number 1..sent reached exactly one sink instance, each once, work result right."""
    reports = sorted(tmp.glob("r.sink.*"))
    reports = [p for p in reports if not p.name.endswith(".tmp")]
    if not reports:
        raise RunFailed("verification", "no sink report")
    union = 0
    total = 0
    for path in reports:
        rep = json.loads(path.read_text())
        if rep["error"]:
            raise RunFailed("verification", f"sink {path.name}: {rep['error']}")
        bits = int.from_bytes(zlib.decompress(base64.b64decode(rep["bitmap"])), "little")
        if union & bits:
            raise RunFailed("verification", f"sink {path.name}: frames another instance got too")
        union |= bits
        total += rep["count"]
    want = ((1 << sent) - 1) << 1  # bits 1..sent
    if total != sent or union != want:
        missing = (want & ~union).bit_count()
        extra = (union & ~want).bit_count()
        raise RunFailed("verification", f"sinks got {total} frames, the source sent {sent} "
                        f"({missing} missing, {extra} unexpected)")


async def run_pipe(scenario: str, static: int | None, timing: dict[str, float],
                   timeout: float, knobs: Knobs | None = None) -> dict[str, Any]:
    """One pipe run: static (mid runs ``static`` instances, autoscaler off) or autoscaled
    (``static`` None). Returns the sampled series, decisions and verification result."""
    work = CPU_WORK if scenario == "cpu" else 0
    sleep = IO_SLEEP if scenario == "io" else 0.0
    tmp = Path(tempfile.mkdtemp(prefix="upipe-asb-"))
    cfg = {"stop": str(tmp / "stop"), "end": str(tmp / "end"), "report": str(tmp / "r"),
           "work": work, "sleep": sleep}
    auto = static is None
    p_src = Processor("src", func=src, config=cfg)
    if auto:
        p_mid = Processor("mid", func=mid, config=cfg, autoscale=MID_MAX)
        p_sink = Processor("sink", func=sink, config=cfg, autoscale=SINK_MAX)
    else:
        p_mid = Processor("mid", func=mid, config=cfg, instances=static)
        p_sink = Processor("sink", func=sink, config=cfg)
    label = "auto" if auto else f"static{static}"
    pipe = Pipe(f"asb-{scenario}-{label}", autoscaler=(knobs or True) if auto else False)
    pipe.add(p_src).add(p_mid).add(p_sink)

    samples: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    pid_cpu: dict[int, float] = {}
    t0 = time.monotonic_ns()

    def rel(t_ns: int) -> float:
        return round((t_ns - t0) / 1e9, 3)

    def sample() -> dict[str, Any]:
        snap = pipe.snapshot()
        busy, steal = _machine_cpu()
        procs = snap["processors"]
        for p in procs.values():
            for w in p["workers"]:
                pid_cpu[w["pid"]] = max(pid_cpu.get(w["pid"], 0.0), w.get("cpu_s", 0.0))
        s = {"t": rel(snap["t_ns"]), "busy": busy, "steal": steal,
             "pipe_cpu": sum(pid_cpu.values()) + _self_cpu()}
        for name, p in procs.items():
            s[name] = {"n": p["instances"], "target": p["target_instances"],
                       "in": p["frames_in"], "out": p["frames_out"], "queued": p.get("queued", 0),
                       "cpu": sum(w.get("cpu_s", 0.0) for w in p["workers"])}
        samples.append(s)
        return s

    def log_decisions(ds: list[Any]) -> None:
        t = rel(time.monotonic_ns())
        for d in ds:
            if d.processor != "src":
                decisions.append({"t": t, "processor": d.processor, "kind": d.kind,
                                  "current": d.current, "target": d.target, "reason": d.reason})

    scaler = getattr(pipe, "_autoscaler", None)
    result: dict[str, Any] = {"scenario": scenario, "mode": label, "static": static,
                              "samples": samples, "decisions": decisions}
    deadline = time.monotonic() + timeout
    try:
        await pipe.start()
        scaler = getattr(pipe, "_autoscaler", None)
        if scaler is not None:  # record every decision, holds included (reasons and numbers)
            step = scaler.step

            async def logged_step() -> list[Any]:
                ds = await step()
                log_decisions(ds)
                return list(ds)

            scaler.step = logged_step
        tick = t0

        async def next_sample() -> dict[str, Any]:
            nonlocal tick
            tick += int(SAMPLE_S * 1e9)
            await asyncio.sleep(max(0.0, (tick - time.monotonic_ns()) / 1e9))
            if time.monotonic() > deadline:
                raise RunFailed("hung", f"still running after {timeout:.0f} s")
            return sample()

        sample()
        # steady phase
        t_first = None
        while True:
            s = await next_sample()
            if t_first is None and s["sink"]["in"] > 0:
                t_first = s["t"]
                result["t_first_frame"] = t_first
            if auto:
                if s["t"] >= timing["steady"]:
                    break
            elif t_first is not None and s["t"] >= t_first + timing["warm"] + timing["measure"]:
                break
            if t_first is None and s["t"] > 60:
                raise RunFailed("hung", "no frame reached the sink in 60 s")
        Path(cfg["stop"]).touch()
        result["t_stop"] = samples[-1]["t"]
        # idle phase (autoscaled: until mid and sink are back at their minimum, and a bit more)
        if auto:
            at_min_since = None
            while samples[-1]["t"] < result["t_stop"] + timing["idle"]:
                s = await next_sample()
                low = all(s[p]["n"] == 1 and s[p]["target"] == 1 for p in ("mid", "sink"))
                if low and at_min_since is None:
                    at_min_since = s["t"]
                if not low:
                    at_min_since = None
                if at_min_since is not None and s["t"] >= at_min_since + timing["linger"]:
                    break
        Path(cfg["end"]).touch()
        try:
            await asyncio.wait_for(pipe.wait_for_completion(),
                                   max(5.0, deadline - time.monotonic()))
        except TimeoutError:
            raise RunFailed("hung", "the pipe did not end after the source did") from None
        if scaler is not None:
            result["autoscaler_decisions"] = [
                {"t": rel(t), "processor": d.processor, "kind": d.kind, "current": d.current,
                 "target": d.target, "reason": d.reason} for t, d in scaler.decisions]
        st = pipe.statistics().processors
        lost = sum(p.get("lost_frames", 0) for p in st.values())
        src_rep = json.loads((tmp / "r.src").read_text())
        result["sent"] = src_rep["count"]
        result["t_idle"] = rel(src_rep["t_idle_ns"])
        if lost:
            raise RunFailed("verification", f"{lost} frames lost with workers that died")
        _verify(tmp, src_rep["count"])
        result["ok"] = True
    finally:
        if pipe._state == "running":  # a failure above: stop whatever still runs
            Path(cfg["end"]).touch()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pipe.terminate(timeout=10), 20)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# -- analysis ----------------------------------------------------------------------------------


def _at(samples: list[dict[str, Any]], t: float) -> int:
    """Index of the first sample taken at or after t (the last one if none)."""
    for i, s in enumerate(samples):
        if s["t"] >= t - 1e-6:
            return i
    return len(samples) - 1


def _rate(samples: list[dict[str, Any]], i: int, j: int) -> float:
    a, b = samples[i], samples[j]
    dt = b["t"] - a["t"]
    return (b["sink"]["in"] - a["sink"]["in"]) / dt if dt > 0 else 0.0


def _bg(samples: list[dict[str, Any]], i: int, j: int) -> float:
    """CPUs other processes used between samples i and j (machine busy minus the pipe's)."""
    a, b = samples[i], samples[j]
    dt = b["t"] - a["t"]
    if dt <= 0:
        return 0.0
    return max(0.0, (b["busy"] - a["busy"]) - (b["pipe_cpu"] - a["pipe_cpu"])) / dt


def _cpu(samples: list[dict[str, Any]], i: int, j: int) -> float:
    a, b = samples[i], samples[j]
    dt = b["t"] - a["t"]
    return (b["pipe_cpu"] - a["pipe_cpu"]) / dt if dt > 0 else 0.0


def summarize_static(res: dict[str, Any], timing: dict[str, float]) -> dict[str, Any]:
    s = res["samples"]
    i = _at(s, res["t_first_frame"] + timing["warm"])
    j = _at(s, res["t_first_frame"] + timing["warm"] + timing["measure"])
    return {"frames_per_s": _rate(s, i, j), "window": [s[i]["t"], s[j]["t"]],
            "bg_load_cpus": _bg(s, i, j), "pipe_cpus": _cpu(s, i, j),
            "steal_cpus": (s[j]["steal"] - s[i]["steal"]) / max(1e-9, s[j]["t"] - s[i]["t"])}


def summarize_auto(res: dict[str, Any], best: float, timing: dict[str, float]) -> dict[str, Any]:
    s = res["samples"]
    t_stop = res["t_stop"]
    last = timing["last"]
    i_stop = _at(s, t_stop)
    i_last = _at(s, t_stop - last)
    lag = round(MA_S / SAMPLE_S)
    ma = [(x["t"], _rate(s, max(0, k - lag), k)) for k, x in enumerate(s[:i_stop + 1])]
    t90 = next((t for t, r in ma if best > 0 and r >= 0.9 * best), None)
    held = None
    if t90 is not None:
        after = [r for t, r in ma if t >= t90]
        held = sum(r >= 0.9 * best for r in after) / len(after)
    changes = [d for d in res.get("autoscaler_decisions", [])
               if d["kind"] != "hold" and t_stop - last <= d["t"] <= t_stop]
    observed = sum(1 for a, b in zip(s[i_last:i_stop], s[i_last + 1:i_stop + 1], strict=False)
                   for p in ("mid", "sink") if a[p]["n"] != b[p]["n"])
    t_idle = res["t_idle"]
    back: dict[str, float | None] = {}
    for p in ("mid", "sink"):
        hit = next((x["t"] for x in s if x["t"] >= t_idle and x[p]["n"] == 1
                    and x[p]["target"] == 1), None)
        back[p] = None if hit is None else max(0.0, hit - t_idle)
    decided = next((d["t"] - t_idle for d in res.get("autoscaler_decisions", [])
                    if d["processor"] == "mid" and d["kind"] == "down" and d["t"] >= t_idle),
                   None)
    mid_counts = [x["mid"]["n"] for x in s[:i_stop + 1]]
    return {
        "frames_per_s_last": _rate(s, i_last, i_stop),
        "frames_per_s_steady": _rate(s, _at(s, res["t_first_frame"]), i_stop),
        "t_first_frame": res["t_first_frame"],
        "t90_s": t90, "t90_held_share": held,
        "changes_last": len(changes), "changes_last_observed": observed,
        "back_to_min_s": back, "idle_decision_s": decided,
        "mid_max_instances": max(mid_counts), "mid_final_instances": s[i_stop]["mid"]["n"],
        "sink_max_instances": max(x["sink"]["n"] for x in s[:i_stop + 1]),
        "bg_load_cpus": _bg(s, _at(s, res["t_first_frame"]), i_stop),
        "bg_load_cpus_last": _bg(s, i_last, i_stop),
        "pipe_cpus_last": _cpu(s, i_last, i_stop),
        "ma_series": [[t, round(r, 1)] for t, r in ma],
    }


# -- report ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    from upipe.autoscale import cpu_budget

    return {**_common.machine_info(("upipe", "psutil", "cffi")), "cpu_budget": cpu_budget(),
            "loadavg_1min": _loadavg()}


def _fmt(x: float | None, digits: int = 0, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{unit}"


def _bg_note(bg: float) -> str:
    return f"[background load {bg:.2f} CPU]" if bg > BG_LOAD_WARN else ""


def print_table(sc: str, entry: dict[str, Any], timing: dict[str, float]) -> None:
    print(f"\n== {PRETTY[sc]} ==")
    print(f"{'allocation':<14}{'mid':>6}{'sink':>6}{'frames/s':>10}{'of best':>9}"
          f"{'pipe CPU':>9}{'ms CPU/f':>9}{'bg CPU':>8}  notes")

    def per_frame(cpus: float, rate: float) -> str:
        return f"{cpus / rate * 1e3:.2f}" if rate > 0 else "-"

    best = entry.get("best_frames_per_s") or 0.0
    for st in entry["static"]:
        if not st["ok"]:
            print(f"{'static':<14}{st['static']:>6}{1:>6}  FAILED ({st['failure']}): "
                  f"{st['error'].splitlines()[0][:100]}")
            continue
        m = st["summary"]
        rel = f"{m['frames_per_s'] / best * 100:.0f} %" if best else "-"
        note = ("best; " if st["static"] == entry.get("best_static") else "") \
            + _bg_note(m["bg_load_cpus"])
        print(f"{'static':<14}{st['static']:>6}{1:>6}{m['frames_per_s']:>10,.0f}{rel:>9}"
              f"{m['pipe_cpus']:>9.2f}{per_frame(m['pipe_cpus'], m['frames_per_s']):>9}"
              f"{m['bg_load_cpus']:>8.2f}  {note}")
    au = entry.get("auto")
    if au is None:
        return
    if not au["ok"]:
        print(f"{'autoscaled':<14}  FAILED ({au['failure']}): {au['error'].splitlines()[0][:100]}")
        return
    m = au["summary"]
    rel = f"{m['frames_per_s_last'] / best * 100:.0f} %" if best else "-"
    mids = f"1->{m['mid_final_instances']}"
    sinks = f"1->{m['sink_max_instances']}" if m["sink_max_instances"] > 1 else "1"
    print(f"{'autoscaled':<14}{mids:>6}{sinks:>6}{m['frames_per_s_last']:>10,.0f}{rel:>9}"
          f"{m['pipe_cpus_last']:>9.2f}{per_frame(m['pipe_cpus_last'], m['frames_per_s_last']):>9}"
          f"{m['bg_load_cpus_last']:>8.2f}  last {timing['last']:.0f} s of the steady phase "
          f"{_bg_note(m['bg_load_cpus'])}")
    last, idle = timing["last"], timing["idle"]
    back = m["back_to_min_s"]
    print(f"  time to 90 % of the best static ({MA_S:.0f} s moving average): "
          f"{_fmt(m['t90_s'], 1, ' s')} after start() (first frame at "
          f"{m['t_first_frame']:.1f} s; >= 90 % in {_fmt((m['t90_held_share'] or 0) * 100)} % "
          "of the samples after that)")
    print(f"  changes in the last {last:.0f} s of the {timing['steady']:.0f} s steady phase: "
          f"{m['changes_last']} decided, {m['changes_last_observed']} instance-count changes seen")
    print(f"  back to min_instances after the source went idle: mid "
          f"{_fmt(back['mid'], 1, ' s')} (first scale-down decided at "
          f"{_fmt(m['idle_decision_s'], 1, ' s')}), "
          f"sink {_fmt(back['sink'], 1, ' s')} (watched for {idle:.0f} s)")
    print("  decisions (up/down):")
    for d in au.get("autoscaler_decisions", []):
        print(f"    {d['t']:6.1f} s  {d['processor']:<5} {d['kind']:<4} "
              f"{d['current']}->{d['target']}: {d['reason']}")


def evaluate_targets(entries: dict[str, dict[str, Any]],
                     timing: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for sc, e in entries.items():
        au = e.get("auto")
        m = au["summary"] if au and au["ok"] else {}
        back = m.get("back_to_min_s") or {}
        mid_back = back.get("mid")
        rows = [
            (f"[{sc}] >= 90 % of the best static within 10 s", m.get("t90_s"), 10.0, "s"),
            (f"[{sc}] <= 2 changes in the last {timing['last']:.0f} s of the steady phase",
             m.get("changes_last"), 2, "changes"),
            (f"[{sc}] mid back to min within 10 s of the source's idling", mid_back, 10.0, "s"),
        ]
        for name, value, goal, unit in rows:
            met = None if not m else (value is not None and value <= goal)
            out.append({"target": name, "value": value, "goal": goal, "unit": unit, "met": met})
    return out


def print_targets(targets: list[dict[str, Any]]) -> None:
    print("\n== targets (informative, not asserted) ==")
    for t in targets:
        v = t["value"]
        shown = "never" if v is None and t["met"] is not None else \
            "n/a" if v is None else f"{v:.1f} s" if t["unit"] == "s" else f"{v}"
        status = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"  {t['target']:<62}{shown:>9}   {status}")


# -- main --------------------------------------------------------------------------------------


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


async def run_case(sc: str, static: int | None, timing: dict[str, float],
                   timeout: float, knobs: Knobs | None = None) -> dict[str, Any]:
    try:
        res = await run_pipe(sc, static, timing, timeout, knobs)
    except RunFailed as exc:
        return {"ok": False, "static": static, "failure": exc.kind, "error": str(exc)}
    except Exception as exc:
        return {"ok": False, "static": static, "failure": "error",
                "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    return res


async def wait_quiet(limit: float) -> float:
    """Wait (at most ``limit`` s) until other processes have used less than BG_LOAD_WARN CPU
    for 3 s in a row (nothing of ours runs now); the seconds waited."""
    t0 = time.monotonic()
    quiet = 0
    busy0, _ = _machine_cpu()
    while quiet < 3 and time.monotonic() - t0 < limit:
        await asyncio.sleep(1.0)
        busy1, _ = _machine_cpu()
        quiet = quiet + 1 if busy1 - busy0 < BG_LOAD_WARN else 0
        busy0 = busy1
    return time.monotonic() - t0


async def _run_quiet(args: argparse.Namespace, sc: str, static: int | None,
                     timing: dict[str, float], timeout: float) -> dict[str, Any]:
    waited = await wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
    if waited > 4.0:
        print(f"(waited {waited:.0f} s for a quieter machine)", end=" ", flush=True)
    res = await run_case(sc, static, timing, timeout, None if static else args.knobs)
    res["waited_for_quiet_s"] = round(waited, 1)
    return res


async def run_all(args: argparse.Namespace, timing: dict[str, float],
                  statics: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    static_timeout = 60 + timing["warm"] + timing["measure"]
    auto_timeout = 90 + timing["steady"] + timing["idle"]
    for sc in args.scenarios:
        entry: dict[str, Any] = {"scenario": sc, "title": PRETTY[sc], "static": []}
        entries[sc] = entry
        if args.reuse_static is not None:
            entry["static"] = args.reuse_static["results"][sc]["static"]
            entry["static_from"] = str(args.reuse_static_path)
        for k in statics[sc] if args.reuse_static is None else []:
            kept = None
            for attempt in range(1 + args.retries):
                print(f"[{sc}] static mid={k}" + (" (again: background load)" if attempt else "")
                      + " ...", end=" ", flush=True)
                t = time.monotonic()
                res = await _run_quiet(args, sc, k, timing, static_timeout)
                if not res["ok"]:
                    print(f"FAILED ({res['failure']}): {res['error'].splitlines()[0]}",
                          flush=True)
                    res["attempts"] = (kept or {}).get("attempts", [])  # a failure fails it
                    kept = res
                    break
                res["summary"] = summarize_static(res, timing)
                m = res["summary"]
                print(f"{m['frames_per_s']:,.0f} frames/s ({time.monotonic() - t:.0f} s"
                      + (f", background load {m['bg_load_cpus']:.2f} CPU"
                         if m["bg_load_cpus"] > BG_LOAD_WARN else "") + ")", flush=True)
                res.setdefault("attempts", [])
                if kept is None or m["bg_load_cpus"] < kept["summary"]["bg_load_cpus"]:
                    res["attempts"] = (kept or {}).get("attempts", []) + [m]
                    kept = res
                else:
                    kept["attempts"].append(m)
                if m["bg_load_cpus"] <= BG_LOAD_WARN:
                    break
            assert kept is not None
            if kept["ok"]:
                del kept["samples"]  # the window's rate is what counts for a static run
            entry["static"].append(kept)
        ok = [s for s in entry["static"] if s["ok"]]
        if ok:
            best = max(ok, key=lambda s: s["summary"]["frames_per_s"])
            entry["best_static"] = best["static"]
            entry["best_frames_per_s"] = best["summary"]["frames_per_s"]
        if args.no_auto:
            continue
        kept = None
        for attempt in range(1 + args.retries):
            print(f"[{sc}] autoscaled" + (" (again: background load)" if attempt else "")
                  + " ...", end=" ", flush=True)
            t = time.monotonic()
            res = await _run_quiet(args, sc, None, timing, auto_timeout)
            if not res["ok"]:
                print(f"FAILED ({res['failure']}): {res['error'].splitlines()[0]}", flush=True)
                res["attempts"] = (kept or {}).get("attempts", [])  # a failure fails it
                kept = res
                break
            res["summary"] = summarize_auto(res, entry.get("best_frames_per_s") or 0.0, timing)
            m = res["summary"]
            print(f"{m['frames_per_s_last']:,.0f} frames/s in the last {timing['last']:.0f} s, "
                  f"90 % at {_fmt(m['t90_s'], 1, ' s')}, mid max {m['mid_max_instances']} "
                  f"({time.monotonic() - t:.0f} s"
                  + (f", background load {m['bg_load_cpus']:.2f} CPU"
                     if m["bg_load_cpus"] > BG_LOAD_WARN else "") + ")", flush=True)
            res["attempts"] = (kept or {}).get("attempts", []) + [
                {k: v for k, v in m.items() if k != "ma_series"}]
            if kept is None or m["bg_load_cpus"] < kept["summary"]["bg_load_cpus"]:
                kept = res
            else:
                kept["attempts"] = res["attempts"]
            if m["bg_load_cpus"] <= BG_LOAD_WARN:
                break
        entry["auto"] = kept
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short phases, fewer allocations")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "autoscale_bench.json",
                    help="JSON results file (default: %(default)s)")
    ap.add_argument("--scenarios", default=",".join(PRETTY),
                    help="comma-separated subset of: " + ",".join(PRETTY))
    ap.add_argument("--retries", type=int, default=1,
                    help="extra runs of a run during which other processes used more than "
                    f"{BG_LOAD_WARN} CPU (the quietest is kept; default: %(default)s)")
    ap.add_argument("--no-auto", action="store_true", help="static allocations only")
    ap.add_argument("--wait-quiet", type=float, default=60.0, metavar="S",
                    help="before each run, wait up to S seconds until other processes have left "
                    f"the CPUs quiet (< {BG_LOAD_WARN} CPU) for 3 s (0: do not wait; "
                    "default: %(default)s)")
    ap.add_argument("--note", default="", help="a note stored with the results (what was "
                    "measured, e.g. which tree PYTHONPATH points to)")
    ap.add_argument("--knobs", default="",
                    help="autoscaler Knobs to use instead of the defaults, e.g. "
                    "'max_step=8,down_cooldown_s=5' (Pipe(autoscaler=Knobs(...)))")
    ap.add_argument("--reuse-static", type=Path, default=None, metavar="JSON",
                    help="take the static runs from an earlier results file (same --quick)")
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in filter(None, args.knobs.split(",")):
        key, _, value = item.partition("=")
        kind = type(getattr(Knobs(), key.strip(), None))
        if kind not in (int, float, bool):
            ap.error(f"--knobs: unknown or non-numeric knob {key!r}")
        overrides[key.strip()] = value.strip().lower() in ("1", "true", "yes") \
            if kind is bool else kind(value)
    args.knobs = Knobs(**overrides) if overrides else None
    args.reuse_static_path = args.reuse_static
    if args.reuse_static is not None:
        args.reuse_static = json.loads(args.reuse_static.read_text())
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(PRETTY)
    if unknown:
        ap.error(f"unknown scenario: {', '.join(sorted(unknown))}")

    info = machine_info()
    budget = max(1, int(info["cpu_budget"]))
    if args.quick:
        timing = {"warm": 1.5, "measure": 4.0, "steady": 20.0, "last": 5.0, "idle": 15.0,
                  "linger": 1.0}
        statics = {"cpu": [1, 2], "io": [1, 4, MID_MAX]}
    else:
        timing = {"warm": 3.0, "measure": 8.0, "steady": 30.0, "last": 10.0, "idle": 20.0,
                  "linger": 2.0}
        statics = {"cpu": list(range(1, min(MID_MAX, budget + 1) + 1)),
                   "io": sorted({1, 2, 4, 6, MID_MAX})}
    lcg(0, CPU_WORK)  # warm
    t = time.perf_counter()
    for i in range(50):
        lcg(i, CPU_WORK)
    work_ms = (time.perf_counter() - t) / 50 * 1e3  # wall: CPU-time accounting in a VM can lie
    print(f"upipe autoscaler benchmark ({'quick' if args.quick else 'full'}): "
          f"{info['cpu_count']} CPUs ({info['cpu_model']}), autoscaler budget "
          f"{info['cpu_budget']:.2f} CPUs, Python {info['python']}, load average "
          f"{_fmt(info['loadavg_1min'], 2)}")
    print(f"mid: {CPU_WORK} LCG steps = {work_ms:.2f} ms per frame here, alone (cpu), "
          f"{IO_SLEEP * 1e3:.0f} ms sleep per frame (io); static allocations {statics}; "
          f"phases {timing}")
    if overrides:
        print(f"autoscaler knobs changed from the defaults: {overrides}")
    if args.note:
        print(f"note: {args.note}")
    print(f"upipe measured: {info['upipe_path']} (git {info['upipe_git']}, sources "
          f"{info['upipe_source_sha256']})")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    entries = asyncio.run(run_all(args, timing, statics))

    for sc, entry in entries.items():
        print_table(sc, entry, timing)
    targets = evaluate_targets(entries, timing)
    print_targets(targets)
    noisy = any(
        (s["ok"] and s["summary"]["bg_load_cpus"] > BG_LOAD_WARN) for e in entries.values()
        for s in e["static"]) or any(
        (e.get("auto") or {}).get("ok") and e["auto"]["summary"]["bg_load_cpus"] > BG_LOAD_WARN
        for e in entries.values())
    if noisy:
        print("\nnote: other processes used the CPUs during some runs (see 'bg CPU'): the "
              "throughputs are pessimistic and the autoscaler saw a busier machine than its "
              "budget says; re-run on a quiet machine")
    digest_after = machine_info()["upipe_source_sha256"]
    if digest_after != info["upipe_source_sha256"]:
        print("\nWARNING: upipe's sources changed during the run: results mix two versions")

    failures = [(sc, r) for sc, e in entries.items()
                for r in e["static"] + ([e["auto"]] if e.get("auto") else []) if not r["ok"]]
    report = {
        "machine": info,
        "mode": "quick" if args.quick else "full",
        "note": args.note,
        "timing": timing,
        "knobs": dataclasses.asdict(args.knobs or Knobs()),
        "knobs_overridden": overrides,
        "workload": {"cpu_work_steps": CPU_WORK, "cpu_work_ms": work_ms, "io_sleep_s": IO_SLEEP,
                     "mid_max": MID_MAX, "sink_max": SINK_MAX, "sample_s": SAMPLE_S,
                     "moving_average_s": MA_S, "statics": statics},
        "loadavg_1min_after": _loadavg(),
        "wall_seconds": time.monotonic() - started,
        "upipe_source_sha256_after": digest_after,
        "results": entries,
        "targets": targets,
        "failures": [{"scenario": sc, "static": r.get("static"), "failure": r["failure"],
                      "error": r["error"]} for sc, r in failures],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"\nresults written to {args.out}")
    if failures:
        print(f"\n{len(failures)} run(s) FAILED:", file=sys.stderr)
        for sc, r in failures:
            print(f"  [{sc}] {'auto' if r.get('static') is None else r['static']}: "
                  f"{r['failure']}: {r['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
