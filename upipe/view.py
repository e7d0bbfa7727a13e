"""What the monitors show, computed from pipe snapshots (no third-party packages needed here).

A snapshot (:meth:`upipe.Pipe.snapshot`) holds counters that only grow (frames in and out,
bytes out, time spent waiting for input and for room downstream, CPU seconds); rates come from
the difference of two snapshots of the same pipe. ``upipe status`` takes two about half a
second apart, ``upipe top`` compares consecutive refreshes, and
``Pipe.wait_for_completion(progress=True)`` compares consecutive ``Pipe.statistics()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from . import control, monitor

__all__ = ["PipeView", "ProcessorRow", "MonitorDependencyError", "poll", "pipe_view",
           "processor_rows", "text_report", "draw_progress", "require"]

BACK_PRESSURE_SHARE = 0.5  # workers waited in emit more than half of the interval
STARVED_SHARE = 0.5  # workers waited for input more than half of the interval
QUEUE_FULL_SHARE = 0.9  # the input queue is more than 90 % full
PROGRESS_INTERVAL = 0.25  # seconds between redraws of the progress lines on a terminal
PROGRESS_PLAIN_INTERVAL = 5.0  # seconds between progress blocks when stderr is not a terminal


class MonitorDependencyError(ImportError):
    """``rich`` or ``prometheus-client`` is missing: they come with the ``monitor`` extra."""


def require(module: str, package: str, what: str) -> Any:
    """Import ``module`` or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MonitorDependencyError(
            f"{what} needs the {package!r} package: pip install \"upipe[monitor]\"") from exc


@dataclass
class ProcessorRow:
    """One processor of one pipe, as the monitors show it. Rates are None without a previous
    snapshot to compare with."""

    processor: str
    instances: int
    target_instances: int | None
    reason: str | None
    finished: bool
    frames_in: int
    frames_out: int
    bytes_out: int
    queued: int | None
    capacity: int | None
    restarts: int
    lost_frames: int
    errors: int
    rss_bytes: int
    workers: list[dict[str, Any]] = field(default_factory=list)
    in_per_s: float | None = None
    out_per_s: float | None = None
    mb_per_s: float | None = None
    cpu_percent: float | None = None
    emit_wait_share: float | None = None  # share of the interval spent waiting in emit
    get_wait_share: float | None = None  # share of the interval spent waiting for input
    back_pressure: bool = False
    starved: bool = False

    @property
    def queue_fill(self) -> float | None:
        if self.queued is None or not self.capacity:
            return None
        return self.queued / self.capacity

    @property
    def flag(self) -> str:
        if self.back_pressure:
            return "BP"
        if self.starved:
            return "starved"
        if self.finished:
            return "done"
        return "-"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["queue_fill"] = self.queue_fill
        out["flag"] = self.flag
        return out


@dataclass
class PipeView:
    """One pipe: its identity and a row per processor."""

    address: str
    pipe: str
    pid: int
    state: str
    uptime_s: float
    interval_s: float | None
    rows: list[ProcessorRow]
    discarded_outputs: int = 0
    events: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"pipe": self.pipe, "pid": self.pid, "address": self.address,
                "state": self.state, "uptime_s": self.uptime_s, "interval_s": self.interval_s,
                "discarded_outputs": self.discarded_outputs, "events": self.events,
                "processors": {r.processor: r.to_json() for r in self.rows}}


def _errors(name: str, entry: dict[str, Any], events: list[str]) -> int:
    """A processor's errors: the snapshot's own count when it has one, else the events of the
    pipe's recent log (its last 20) that name it: restarts after a crash, failures."""
    if isinstance(entry.get("errors"), int):
        return int(entry["errors"])
    return sum(1 for e in events if e.startswith(f"{name}[") or f"processor {name!r}" in e)


def processor_rows(cur: dict[str, Any], prev: dict[str, Any] | None = None) -> list[ProcessorRow]:
    """The rows of a pipe's snapshot ``cur``, with rates against the earlier snapshot ``prev``
    of the same pipe (or none). Also takes ``{"t_ns": ..., "processors": Pipe.statistics()
    .processors}`` (no CPU or memory then)."""
    events = list(cur.get("events", []))
    dt_ns = (cur.get("t_ns", 0) - prev.get("t_ns", 0)) if prev is not None else 0
    rows = []
    for name, e in cur.get("processors", {}).items():
        target = e.get("target_instances")
        reason = e.get("reason")
        workers = list(e.get("workers", []))
        row = ProcessorRow(
            processor=name, instances=int(e.get("instances", 0)),
            target_instances=int(target) if isinstance(target, int) else None,
            reason=str(reason) if reason else None, finished=bool(e.get("finished")),
            frames_in=int(e.get("frames_in", 0)), frames_out=int(e.get("frames_out", 0)),
            bytes_out=int(e.get("bytes_out", 0)), queued=e.get("queued"),
            capacity=e.get("capacity"), restarts=int(e.get("restarts", 0)),
            lost_frames=int(e.get("lost_frames", 0)), errors=_errors(name, e, events),
            rss_bytes=sum(int(w.get("rss", 0)) for w in workers), workers=workers)
        p = prev.get("processors", {}).get(name) if prev is not None else None
        if p is not None and dt_ns > 0:
            dt = dt_ns / 1e9
            row.in_per_s = max(0, row.frames_in - int(p.get("frames_in", 0))) / dt
            row.out_per_s = max(0, row.frames_out - int(p.get("frames_out", 0))) / dt
            row.mb_per_s = max(0, row.bytes_out - int(p.get("bytes_out", 0))) / dt / 1e6
            before = {w["pid"]: w for w in p.get("workers", []) if "cpu_s" in w}
            cpu = [w["cpu_s"] - before[w["pid"]]["cpu_s"] for w in workers
                   if "cpu_s" in w and w["pid"] in before]
            if "pid" in cur:  # a snapshot (statistics alone have no CPU times)
                row.cpu_percent = 100.0 * max(0.0, sum(cpu)) / dt
            busy = max(row.instances, 1) * dt_ns
            row.emit_wait_share = max(0, e.get("emit_wait_ns", 0) - p.get("emit_wait_ns", 0)) / busy
            row.get_wait_share = max(0, e.get("get_wait_ns", 0) - p.get("get_wait_ns", 0)) / busy
        fill = row.queue_fill
        if row.instances:
            row.back_pressure = ((row.emit_wait_share or 0.0) > BACK_PRESSURE_SHARE
                                 or (fill is not None and fill > QUEUE_FULL_SHARE))
            row.starved = not row.back_pressure and (row.get_wait_share or 0.0) > STARVED_SHARE
        rows.append(row)
    return rows


def pipe_view(address: str, cur: dict[str, Any], prev: dict[str, Any] | None = None) -> PipeView:
    dt = (cur["t_ns"] - prev["t_ns"]) / 1e9 if prev is not None else None
    return PipeView(address=address, pipe=str(cur.get("pipe", "?")), pid=int(cur.get("pid", 0)),
                    state=str(cur.get("state", "?")), uptime_s=float(cur.get("uptime_s", 0.0)),
                    interval_s=dt, rows=processor_rows(cur, prev),
                    discarded_outputs=int(cur.get("discarded_outputs", 0)),
                    events=list(cur.get("events", [])))


def poll(name: str | None = None, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """A snapshot of every running pipe of this user (only those called ``name`` if given),
    by control address. Pipes that vanish or do not answer meanwhile are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for p in monitor.list_pipes():
        if name is not None and p.name != name:
            continue
        try:
            out[p.address] = monitor.request_snapshot(p.address, timeout)
        except control.ControlError:
            continue
    return out


def views(cur: dict[str, dict[str, Any]], prev: dict[str, dict[str, Any]]) -> list[PipeView]:
    return [pipe_view(addr, snap, prev.get(addr)) for addr, snap in cur.items()]


# -- formatting ---------------------------------------------------------------------------------


def fmt_count(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}" if x == int(x) or abs(x) >= 10 else f"{x:.1f}"


def fmt_float(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.0f}M" if n >= 10 * 2**20 else f"{n / 2**20:.1f}M"


def fmt_queue(row: ProcessorRow) -> str:
    if row.queued is None or not row.capacity:
        return "-"
    return f"{row.queued}/{row.capacity} {100 * row.queued / row.capacity:.0f}%"


def fmt_instances(row: ProcessorRow) -> str:
    target = "-" if row.target_instances is None else str(row.target_instances)
    return f"{row.instances}/{target}"


COLUMNS = ("processor", "inst", "reason", "in/s", "out/s", "MB/s", "queue", "flag", "CPU%",
           "RSS", "restarts", "errors")


def row_cells(row: ProcessorRow) -> list[str]:
    return [row.processor, fmt_instances(row), row.reason or "-", fmt_count(row.in_per_s),
            fmt_count(row.out_per_s), fmt_float(row.mb_per_s, 2), fmt_queue(row), row.flag,
            fmt_float(row.cpu_percent), fmt_bytes(row.rss_bytes), str(row.restarts),
            str(row.errors) + (f" (lost {row.lost_frames})" if row.lost_frames else "")]


def pipe_title(v: PipeView) -> str:
    return (f"pipe {v.pipe}  pid {v.pid}  {v.state}  up {v.uptime_s:.0f} s"
            + (f"  discarded outputs {v.discarded_outputs}" if v.discarded_outputs else ""))


def text_report(pipes: list[PipeView]) -> str:
    """The plain-text table of ``upipe status``."""
    if not pipes:
        return "no upipe pipes running\n"
    out = []
    for v in pipes:
        out.append(pipe_title(v))
        table = [list(COLUMNS)] + [row_cells(r) for r in v.rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
        for r in table:
            cells = [c.ljust(w) if i < 3 or i == 7 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            out.append("  " + "  ".join(cells).rstrip())
        for e in v.events[-3:]:
            out.append(f"  event: {e}")
        out.append("")
    return "\n".join(out)


# -- progress lines (Pipe.wait_for_completion(progress=True)) ------------------------------------


def progress_lines(pipe_name: str, cur: dict[str, Any], prev: dict[str, Any] | None) -> list[str]:
    rows = processor_rows(cur, prev)
    width = max((len(r.processor) for r in rows), default=0)
    lines = []
    for r in rows:
        state = "done" if r.finished else f"{r.instances} running"
        rate = f" {fmt_count(r.out_per_s if r.frames_out else r.in_per_s)}/s" if (
            r.in_per_s is not None) else ""
        lines.append(f"{pipe_name}: {r.processor.ljust(width)}  in {r.frames_in:>10,}  "
                     f"out {r.frames_out:>10,}{rate:>10}  queue {fmt_queue(r):>14}  {state}")
    return lines


async def draw_progress(pipe_name: str, statistics: Callable[[], Any],
                        stream: TextIO | None = None) -> None:
    """Draw a pipe's progress lines until cancelled, then once more (the final counts).

    On a terminal the lines are redrawn in place every :data:`PROGRESS_INTERVAL` seconds;
    otherwise a block of lines is written every :data:`PROGRESS_PLAIN_INTERVAL` seconds and at
    the end, with the average rates since the start (the lines before give the rates over
    the last interval). ``statistics`` is ``Pipe.statistics`` (called in the pipe's event
    loop)."""
    out = stream if stream is not None else sys.stderr
    tty = out.isatty()
    interval = PROGRESS_INTERVAL if tty else PROGRESS_PLAIN_INTERVAL
    drawn = 0

    def take() -> dict[str, Any]:
        return {"t_ns": time.monotonic_ns(), "processors": statistics().processors}

    def draw(snap: dict[str, Any], prev: dict[str, Any]) -> None:
        nonlocal drawn
        lines = progress_lines(pipe_name, snap, prev)
        with contextlib.suppress(OSError, ValueError):
            if tty:
                # back to the first line drawn last time, each line cleared as it is rewritten
                head = f"\x1b[{drawn}F" if drawn else ""
                out.write(head + "".join(f"\x1b[2K{line}\n" for line in lines))
                drawn = len(lines)
            else:
                out.write("".join(line + "\n" for line in lines))
            out.flush()

    first = prev = take()
    try:
        if tty:
            draw(prev, prev)
        while True:
            await asyncio.sleep(interval)
            snap = take()
            draw(snap, prev)
            prev = snap
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            draw(take(), first)
        raise
