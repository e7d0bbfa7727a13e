"""The autoscaling policy: a pure function from stats snapshots to target instance counts.

:func:`decide` reads a short history of :class:`Snapshot` (counters of every processor, taken by
the pipe's loop every half second or so) and returns one :class:`Decision` per processor: keep,
add or retire instances, with a sentence saying why, with the numbers. It does no I/O and reads
no clock (time is the snapshots' ``t_ns``): same history and state, same decisions. Only
:func:`cpu_budget` and :func:`memory_available` look at the machine, for the loop to put in its
snapshots. The loop applies the targets (retiring a worker lets it finish its frame: a busy
worker is never killed) and shows every decision in the monitor.

What the counters say, over a window of ``n`` instances and ``T`` seconds (instance-time
``n*T``): ``starved`` = get waits / instance-time, ``blocked`` = emit waits / instance-time,
``busy`` = 1 - starved - blocked (time in the processor's own code, computing or sleeping),
``cpu`` = CPU time / instance-time, and ``cost`` = cpu / busy: the CPU an instance burns while
busy. ``cost`` below ``Knobs.io_bound`` marks an I/O-bound processor (it waits on something
else: a network, a disk, a sleep) whose extra instances cost little CPU; above it, a CPU-bound
one whose every instance counts as one CPU.

Why it decides the way it does (the peers' failures it avoids, in brackets):

* **Scale up only the bottleneck** [reacting to symptoms]. A processor is the bottleneck when
  it is busy (``busy >= busy_up``), frames wait for it (its input is at least ``fill_high``
  full, or filling at ``fill_growth`` of its capacity per second) and its output is free (it
  waits on emit less than ``blocked_max`` and no downstream input is ``fill_high`` full).
  Upstream of a bottleneck the queues are full too, but those processors wait on emit: that is
  back-pressure, not work, so they are never scaled up (their ``busy`` is low, if anything
  they shrink). Downstream of it processors are starved. Sources are not scaled (more
  instances of a generator would change what it generates) unless ``scale_sources``.
* **Sustained, not transient** [reacting to transient load]. The bottleneck test must hold in
  every ``slice_s`` slice of the last ``sustain_s`` seconds, not just on average: a burst that
  backs a queue up for one window (``window_s``, shorter than ``sustain_s``) and drains
  scales nothing.
* **Only fresh evidence**. Data from before a change of the processor's instance count, or of
  a neighbour's (upstream or downstream), plus ``settle_s``, describes another configuration
  and is not used; nor is data from before the processor took its first frame (workers
  starting up look busy: they neither wait nor work).
* **Step by the measured shortfall, capped** [slow convergence, a staircase of +1s]. The
  bottleneck is sized for what the pipe could do, not for what its upstream sends today:
  what the sources would send if nothing blocked them (their emit waits are time they would
  spend producing: ``rate_out / (1 - blocked)``), no more than the CPU budget allows at the
  pipe's measured CPU per frame, nor than the processors upstream of it can pass at their
  ``max_instances``; scaled by its share of the source frames (1 in a chain, 2 behind a merge
  of two branches). The step is what its measured rate per busy instance needs for that, at
  least one, at most ``max_step``. So when two processors are short, the second one needs a
  single step once the first is sized, and a CPU-bound one is sized to the budget at once.
* **Within the budget** [oversubscription]. A CPU-bound instance counts as one CPU: the k-th
  new one is added only if at least ``cpu_min_gain`` of a CPU would be left for it in
  ``Snapshot.cpu_budget`` after what every worker of the pipe uses now (measured, or more if
  a change is pending). I/O-bound instances count what they burn, so they may outnumber the
  cores. No instance is added if its RSS (the processor's RSS per instance) does not fit in
  ``memory_available`` minus ``memory_headroom``.
* **Hysteresis** [oscillation]. Scale down only if the load would still fit comfortably:
  with ``n'`` instances the busiest ``down_slice_s`` slice of the last ``down_window_s`` would
  be at most ``busy_up - hysteresis`` busy (``busy * n / n' <= 0.70`` by default). The load
  that made ``n`` instances at least ``busy_up`` busy keeps ``n+1`` at least
  ``busy_up * n/(n+1)`` busy, above the ``(busy_up - hysteresis) * n/(n+1)`` that going back to
  ``n`` requires; and a processor scaled down to ``n'`` is at most ``busy_up - hysteresis``
  busy, below the ``busy_up`` that scaling it up requires. With a steady load it settles.
* **Cooldowns** [flapping]: at most one change per processor per ``up_cooldown_s`` (the next
  up) or ``down_cooldown_s`` (any down, longer); a change not yet in effect (workers starting,
  retire requests waiting behind the queued frames) is waited for, up to ``pending_timeout_s``.
* **Scale down when idle** [never scaling down]. No frame in ``down_window_s`` (input empty,
  CPU below ``idle_cpu``): straight to ``min_instances``. Input closed (its upstreams
  finished) and drained: straight to ``min_instances``, without cooldown (no frame can come).

Waits in progress count: a worker publishes when a wait begins (upipe/stats.py), so a worker
blocked in ``get`` for a whole window shows the whole window as starved. The idle rule needs no
cooldown beyond its own evidence (``down_window_s`` without a frame since the last change), so
a stage scaled down a little as its load stopped still goes to the minimum promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("upipe.autoscale")

__all__ = [
    "Autoscaler",
    "Decision",
    "Knobs",
    "PolicyState",
    "ProcessorSample",
    "Snapshot",
    "cpu_budget",
    "decide",
    "memory_available",
]

Kind = Literal["up", "down", "hold"]

_NS = 1_000_000_000
_MIB = 1 << 20


@dataclass(frozen=True)
class ProcessorSample:
    """One processor at one instant. Counters are cumulative over every worker it ever ran
    (exited ones included), so differences between two samples are what happened between."""

    name: str
    instances: int  # running workers (starting and retiring ones included)
    min_instances: int
    max_instances: int
    frames_in: int = 0
    frames_out: int = 0
    get_wait_ns: int = 0  # time starved, summed over its workers
    emit_wait_ns: int = 0  # time under back-pressure, summed over its workers
    cpu_ns: int = 0  # user + system CPU time of its workers
    rss_bytes: int = 0  # current total resident memory of its workers
    queued: int = 0  # frames in its input queue
    capacity: int = 0  # its input queue's maxsize
    input_closed: bool = False  # its upstreams finished: no more frames will come
    upstream: tuple[str, ...] = ()
    downstream: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """Every processor of a pipe at one instant (``t_ns``: CLOCK_MONOTONIC), and the budget."""

    t_ns: int
    processors: dict[str, ProcessorSample]
    cpu_budget: float  # CPUs this pipe may use (see cpu_budget())
    memory_available: int  # bytes (see memory_available())


@dataclass(frozen=True)
class Decision:
    """What the policy wants for one processor: ``target`` instances (``current`` run now).
    ``kind`` is "up" or "down" for a change (log it, apply it), "hold" otherwise; a hold's
    target is the count to keep: ``current``, or a change decided earlier and still under way
    (workers starting, retiring ones finishing their frame)."""

    processor: str
    current: int
    target: int
    reason: str
    kind: Kind


@dataclass(frozen=True)
class Knobs:
    """The policy's parameters. Times in seconds, fractions in 0..1."""

    window_s: float = 3.0  # averages shown in reasons, CPU use counted against the budget
    sustain_s: float = 3.5  # the bottleneck test must hold over this long...
    slice_s: float = 0.5  # ...in every slice of this length
    down_window_s: float = 4.0  # evidence for scaling down (idle, or under-used)...
    down_slice_s: float = 1.0  # ...under-used: the busiest slice of this length counts
    settle_s: float = 0.5  # data this soon after a change (here or next door) is not evidence
    up_cooldown_s: float = 2.0  # from this processor's last change to its next scale-up
    down_cooldown_s: float = 5.0  # from this processor's last change to its next scale-down
    pending_timeout_s: float = 10.0  # stop waiting for a change to take effect after this
    busy_up: float = 0.85  # a bottleneck is at least this busy
    hysteresis: float = 0.15  # scale down only to a count that would be <= busy_up - this
    fill_high: float = 0.5  # an input this full is backed up
    fill_growth: float = 0.1  # an input filling by this share of its capacity per second too
    blocked_max: float = 0.1  # more emit wait than this: the output is the constraint
    idle_cpu: float = 0.05  # CPU per instance below which a processor without frames is idle
    io_bound: float = 0.5  # cost (CPU per busy second) below which a processor is I/O-bound
    cpu_min_gain: float = 0.5  # a new CPU-bound instance needs this much free CPU
    memory_headroom: int = 256 * _MIB  # bytes kept free when adding instances
    max_step: int = 8  # most instances added at once
    max_step_down: int = 2  # most instances retired at once (idle: straight to the minimum)
    scale_sources: bool = False  # scale sources too (up when every downstream is starved)
    source_starved: float = 0.5  # ... that is, waits on get at least this much

    def __post_init__(self) -> None:
        for name in ("window_s", "sustain_s", "slice_s", "down_window_s", "down_slice_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Knobs.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_step < 1 or self.max_step_down < 1:
            raise ValueError("Knobs.max_step and max_step_down must be >= 1")
        if not 0 < self.busy_up - self.hysteresis <= 1:
            raise ValueError("Knobs: busy_up - hysteresis must be in (0, 1]")

    @property
    def horizon_s(self) -> float:
        """How much history :func:`decide` looks at (the loop may drop older snapshots)."""
        return max(self.window_s, self.sustain_s, self.down_window_s) + 1.0


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between calls (start with ``PolicyState()``)."""

    last_change_ns: Mapping[str, int] = field(default_factory=dict)  # last up/down decided
    changed_ns: Mapping[str, int] = field(default_factory=dict)  # last count change (or decision)
    seen_instances: Mapping[str, int] = field(default_factory=dict)  # count at the last call
    pending: Mapping[str, int] = field(default_factory=dict)  # decided targets not yet in effect


# -- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Win:
    """One processor's averages between two snapshots."""

    seconds: float
    instances: float  # mean running instances
    frames_in: int
    rate_in: float  # frames/s
    rate_out: float
    starved: float  # share of instance-time waiting on get
    blocked: float  # share of instance-time waiting on emit
    busy: float  # share of instance-time in its own code
    cpu: float  # CPU per instance (1.0: one core)
    cpu_rate: float  # CPUs used by all its workers
    fill: float  # mean input fill (share of capacity)
    growth: float  # input fill change per second (share of capacity)
    arrival: float  # frames/s arriving in its input
    empty: bool  # its input was empty at every snapshot

    @property
    def cost(self) -> float:
        """CPU per busy instance-second (1.0 when it was hardly ever busy: assume the worst)."""
        return min(1.0, self.cpu / self.busy) if self.busy >= 0.05 else 1.0


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"


def _index_at(times: Sequence[int], t: int) -> int:
    """The last snapshot taken at or before ``t`` (-1: none)."""
    return bisect_right(times, t) - 1


def _window(hist: Sequence[Snapshot], name: str, i0: int, i1: int, source: bool) -> _Win | None:
    if i1 <= i0:
        return None
    a, b = hist[i0].processors.get(name), hist[i1].processors.get(name)
    if a is None or b is None:
        return None
    dt_ns = hist[i1].t_ns - hist[i0].t_ns
    if dt_ns <= 0:
        return None
    inst_ns = 0.0
    fills: list[float] = []
    empty = True
    prev: ProcessorSample | None = None
    prev_t = 0
    for k in range(i0, i1 + 1):
        s = hist[k].processors.get(name)
        if s is None:
            prev = None
            continue
        if prev is not None:
            inst_ns += (prev.instances + s.instances) / 2 * (hist[k].t_ns - prev_t)
        prev, prev_t = s, hist[k].t_ns
        fills.append(min(1.0, s.queued / s.capacity) if s.capacity > 0 else 0.0)
        empty = empty and s.queued == 0
    seconds = dt_ns / _NS
    d_in = max(0, b.frames_in - a.frames_in)
    d_out = max(0, b.frames_out - a.frames_out)
    d_cpu = max(0, b.cpu_ns - a.cpu_ns)
    if inst_ns > 0:
        starved = 0.0 if source else min(1.0, max(0, b.get_wait_ns - a.get_wait_ns) / inst_ns)
        blocked = min(1.0, max(0, b.emit_wait_ns - a.emit_wait_ns) / inst_ns)
        cpu = d_cpu / inst_ns
    else:
        starved = blocked = cpu = 0.0
    busy = max(0.0, 1.0 - starved - blocked) if inst_ns > 0 else 0.0
    if not source and d_in == 0 and empty:
        busy = min(busy, cpu)  # waits in progress are invisible: trust the CPU time
    growth = (b.queued - a.queued) / b.capacity / seconds if b.capacity > 0 else 0.0
    return _Win(
        seconds=seconds, instances=inst_ns / dt_ns, frames_in=d_in, rate_in=d_in / seconds,
        rate_out=d_out / seconds, starved=starved, blocked=blocked, busy=busy, cpu=cpu,
        cpu_rate=d_cpu / dt_ns, fill=sum(fills) / len(fills), growth=growth,
        arrival=max(0.0, d_in / seconds + (b.queued - a.queued) / seconds), empty=empty,
    )


@dataclass
class _Proposal:
    kind: Kind
    target: int
    reason: str
    want: int = 0  # up: instances wanted (before the budget)
    cost: float = 1.0  # up: CPUs per new instance
    rss: float = 0.0  # up: bytes per new instance
    urgency: float = 0.0  # up: demand / throughput (most urgent gets the budget first)


class _Context:
    """What every processor's evaluation needs from one call of :func:`decide`."""

    def __init__(self, hist: Sequence[Snapshot], knobs: Knobs, changed: Mapping[str, int],
                 last_change: Mapping[str, int], pending: Mapping[str, int]) -> None:
        self.hist = hist
        self.knobs = knobs
        self.times = [s.t_ns for s in hist]
        self.now = hist[-1]
        self.t = self.now.t_ns
        self.last = len(hist) - 1
        self.changed = changed
        self.last_change = last_change
        self.pending = pending
        iw = max(0, _index_at(self.times, self.t - int(knobs.window_s * _NS)))
        self.avg = {name: _window(hist, name, iw, self.last, not p.upstream)
                    for name, p in self.now.processors.items()}
        sources = [w for name, p in self.now.processors.items()
                   if not p.upstream and (w := self.avg[name]) is not None]
        self.src_rate = sum(w.rate_out for w in sources)  # frames/s the sources send
        self.src_potential = sum(w.rate_out / max(1.0 - w.blocked, 0.05) for w in sources)
        cpu = sum(w.cpu_rate for w in self.avg.values() if w is not None)
        self.budget_rate = (self.now.cpu_budget * self.src_rate / cpu if cpu > 0
                            else math.inf)  # source frames/s the CPU budget allows

    def slices(self, span_s: float, start_ns: int,
               slice_s: float) -> tuple[list[tuple[int, int]], float]:
        """Slices of the last ``span_s`` (empty if the history since ``start_ns`` is shorter)
        and how many seconds of usable history there are."""
        have = max(0.0, (self.t - start_ns) / _NS)
        span_ns = int(span_s * _NS)
        i0 = _index_at(self.times, self.t - span_ns)
        if i0 < 0 or self.times[i0] < start_ns:
            return [], have
        m = max(1, round(span_s / slice_s))
        bounds = [max(i0, _index_at(self.times, self.t - span_ns + j * span_ns // m))
                  for j in range(m)] + [self.last]
        return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a], have

    def evidence_start(self, p: ProcessorSample, neighbours: bool) -> int:
        names = [p.name, *p.upstream, *p.downstream] if neighbours else [p.name]
        start = max((self.changed[n] for n in names if n in self.changed), default=-(1 << 62))
        return start + int(self.knobs.settle_s * _NS)

    def first_frame_ns(self, p: ProcessorSample) -> int:
        """When the processor had taken (source: emitted) its first frame, as far as the
        history shows (beyond the end: not yet)."""
        for s in self.hist:
            q = s.processors.get(p.name)
            if q is not None and (q.frames_out if not p.upstream else q.frames_in) > 0:
                return s.t_ns
        return self.t + 1

    def window(self, name: str, i0: int, i1: int) -> _Win | None:
        p = self.now.processors.get(name)
        return None if p is None else _window(self.hist, name, i0, i1, not p.upstream)


def _summary(w: _Win | None, source: bool) -> str:
    if w is None:
        return "no data yet"
    if source:
        return (f"busy {_pct(w.busy)} (CPU {_pct(w.cpu)}), emit wait {_pct(w.blocked)}, "
                f"{w.rate_out:.0f}/s out")
    return (f"busy {_pct(w.busy)} (CPU {_pct(w.cpu)}), input {_pct(w.fill)} full, "
            f"{w.rate_in:.0f}/s in, starved {_pct(w.starved)}, emit wait {_pct(w.blocked)}")


def _up_signal(ctx: _Context, p: ProcessorSample, i0: int, i1: int) -> tuple[bool, str]:
    """Is ``p`` the bottleneck between snapshots i0 and i1? (and if not, why not)"""
    k = ctx.knobs
    w = ctx.window(p.name, i0, i1)
    if w is None:
        return False, "no data"
    downs = [(d, ctx.window(d, i0, i1)) for d in p.downstream]
    if w.blocked >= k.blocked_max:
        return False, f"back-pressure: emit wait {_pct(w.blocked)}"
    for d, dw in downs:
        if dw is not None and dw.fill >= k.fill_high:
            return False, f"back-pressure: {d}'s input {_pct(dw.fill)} full"
    if w.busy < k.busy_up:
        return False, f"busy {_pct(w.busy)} < {_pct(k.busy_up)}"
    if not p.upstream:  # a source (scale_sources): every downstream must be starved
        for d, dw in downs:
            if dw is None or dw.starved < k.source_starved:
                starved = 0.0 if dw is None else dw.starved
                return False, f"{d} starved only {_pct(starved)}"
        return True, ""
    if w.fill < k.fill_high and w.growth < k.fill_growth:
        return False, f"input {_pct(w.fill)} full, not filling"
    return True, ""


def _demand(ctx: _Context, p: ProcessorSample, w: _Win) -> tuple[float, str]:
    """Frames/s this processor should be able to take, and what limits that figure.

    In units of source frames: what the sources would send if nothing blocked them (their
    emit waits are time they would spend producing: ``rate_out / (1 - blocked)``), no more
    than the CPU budget allows at the pipe's measured CPU per frame, nor than any processor
    upstream of this one can pass at its ``max_instances``; times this processor's share of
    the source frames (1 in a chain, 2 behind a merge of two branches, less behind a filter).
    So the bottleneck is sized for the pipe's next bottleneck too, not just for the rate its
    upstream happens to reach today."""
    local = max(w.arrival, w.rate_in)
    if ctx.src_rate <= 0 or w.rate_in <= 0:
        could = sum(uw.rate_out / max(1.0 - uw.blocked, 0.05)
                    for u in p.upstream if (uw := ctx.avg.get(u)) is not None)
        return max(local, could), "what its upstreams could send"
    bounds = [(ctx.src_potential, "what the sources could send"),
              (ctx.budget_rate, "what the CPU budget allows")]
    seen: set[str] = set()
    todo = list(p.upstream)
    while todo:
        a = todo.pop()
        if a in seen:
            continue
        seen.add(a)
        ap, aw = ctx.now.processors.get(a), ctx.avg.get(a)
        if ap is None or aw is None or not ap.upstream:
            continue
        todo.extend(ap.upstream)
        if aw.rate_in > 0 and aw.busy > 0 and aw.instances > 0:
            per_instance = aw.rate_in / (aw.instances * aw.busy)
            share = aw.rate_in / ctx.src_rate
            bounds.append((per_instance * ap.max_instances / share,
                           f"what {a} can pass at max_instances {ap.max_instances}"))
    rate, why = min(bounds)
    wanted = rate * w.rate_in / ctx.src_rate
    return (wanted, why) if wanted > local else (local, "its arrivals")


def _evaluate(ctx: _Context, p: ProcessorSample) -> _Proposal:
    k = ctx.knobs
    n, lo, hi = p.instances, p.min_instances, p.max_instances
    source = not p.upstream
    w = ctx.avg.get(p.name)
    info = _summary(w, source)

    if n <= 0:
        return _Proposal("hold", n, "no running worker (finished or restarting)")
    if p.name in ctx.pending:
        target = ctx.pending[p.name]
        return _Proposal("hold", target, f"waiting for {n} -> {target} to take effect")
    if n > hi:
        return _Proposal("down", hi, f"above max_instances {hi}: -{n - hi} ({n} -> {hi})")
    if n < lo:
        return _Proposal("up", lo, f"below min_instances {lo}: +{lo - n} ({n} -> {lo})")
    if source and not k.scale_sources:
        return _Proposal("hold", n, f"source, not scaled: {info}")
    if not source and p.input_closed:
        if p.queued == 0 and n > lo:
            return _Proposal("down", lo, f"input closed and drained: -{n - lo} ({n} -> {lo})")
        if p.queued == 0:
            return _Proposal("hold", n, "input closed and drained, at min_instances")

    since_change = (ctx.t - ctx.last_change[p.name]) / _NS if p.name in ctx.last_change \
        else math.inf

    # -- up: the bottleneck, sustained over fresh evidence --
    start = max(ctx.evidence_start(p, neighbours=True), ctx.first_frame_ns(p))
    slices, have = ctx.slices(k.sustain_s, start, k.slice_s)
    if not slices:
        up_note = f"gathering evidence ({have:.1f} of {k.sustain_s:.1f} s since a change)"
    else:
        results = [_up_signal(ctx, p, a, b) for a, b in slices]
        hits = sum(ok for ok, _ in results)
        if hits == len(results) and w is not None:
            if n >= hi:
                return _Proposal("hold", n, f"bottleneck at max_instances {hi}: {info}")
            if since_change < k.up_cooldown_s:
                return _Proposal("hold", n, f"bottleneck, cooling down ({since_change:.1f} s "
                                            f"since the last change): {info}")
            demand, bound = _demand(ctx, p, w)
            if w.rate_in > 0 and w.busy > 0:
                per_instance = w.rate_in / (w.instances * w.busy)
                need = math.ceil(demand / per_instance - 0.05)
            else:
                need = n + 1
            want = min(max(need - n, 1), k.max_step, hi - n)
            urgency = demand / w.rate_in if w.rate_in > 0 else math.inf
            if source:
                starved = min((dw.starved for d in p.downstream
                               if (dw := ctx.avg.get(d)) is not None), default=0.0)
                head = (f"busy {_pct(w.busy)} (CPU {_pct(w.cpu)}), {w.rate_out:.0f}/s out, "
                        f"downstream starved {_pct(starved)}")
                want = 1
            else:
                starved = min((dw.starved for d in p.downstream
                               if (dw := ctx.avg.get(d)) is not None), default=1.0)
                down = f"downstream starved {_pct(starved)}" if p.downstream else "a sink"
                head = (f"busy {_pct(w.busy)} (CPU {_pct(w.cpu)}), input {_pct(w.fill)} full, "
                        f"{w.rate_in:.0f}/s in of ~{demand:.0f}/s ({bound}), emit wait "
                        f"{_pct(w.blocked)}, {down}")
            rss = p.rss_bytes / n
            cost = w.cost if w.cost < k.io_bound else 1.0
            return _Proposal("up", n + want, head, want=want, cost=cost, rss=rss,
                             urgency=urgency)
        reasons = [why for ok, why in results if not ok]
        if hits:
            up_note = f"not sustained (bottleneck in {hits} of {len(results)} slices, " \
                      f"not in the others: {reasons[-1]})"
        else:
            up_note = reasons[-1]

    # -- down: idle, or under-used with room to spare --
    # idle: its own evidence (down_window_s without a frame since its last change) is the
    # cooldown; an under-used step taken as the load stopped must not delay it
    own = ctx.evidence_start(p, neighbours=False)
    dslices, _ = ctx.slices(k.down_window_s, own, k.down_slice_s)
    if dslices and not source and n > lo:
        dw = ctx.window(p.name, dslices[0][0], ctx.last)
        if dw is not None and dw.frames_in == 0 and dw.empty and dw.cpu < k.idle_cpu:
            return _Proposal("down", lo, f"idle: no frame in {dw.seconds:.1f} s, input "
                                         f"empty, CPU {_pct(dw.cpu)}: -{n - lo} ({n} -> {lo})")
    if since_change >= k.down_cooldown_s:
        fresh = max(ctx.evidence_start(p, neighbours=True), ctx.first_frame_ns(p))
        dslices, _ = ctx.slices(k.down_window_s, fresh, k.down_slice_s)
        if dslices and n > lo:
            ws = [x for a, b in dslices if (x := ctx.window(p.name, a, b)) is not None]
            stopped = bool(ws) and ws[-1].frames_in == 0 and ws[-1].empty
            if ws and not stopped:  # stopped: not less load but none; the idle rule decides
                peak = max(x.busy for x in ws)
                ceiling = k.busy_up - k.hysteresis
                fit = max(lo, math.ceil(n * peak / ceiling - 1e-9), n - k.max_step_down)
                if fit < n:
                    return _Proposal(
                        "down", fit,
                        f"under-used: busy {_pct(peak)} at most over {k.down_window_s:.0f} s "
                        f"(CPU {_pct(max(x.cpu for x in ws))}), {fit} would be ~"
                        f"{_pct(n * peak / fit)} busy (<= {_pct(ceiling)}): "
                        f"-{n - fit} ({n} -> {fit})")
    return _Proposal("hold", n, f"steady: {info}; {up_note}" if w is not None else up_note)


def decide(history: Sequence[Snapshot], state: PolicyState,
           knobs: Knobs | None = None) -> tuple[list[Decision], PolicyState]:
    """Target instance counts for every processor of the last snapshot of ``history``
    (oldest first; only the last ``knobs.horizon_s`` seconds are read), with the state to
    pass to the next call. Pure: no clock, no I/O, same inputs same outputs."""
    knobs = knobs or Knobs()
    if not history:
        return [], state
    t = history[-1].t_ns
    first = len(history) - 1
    horizon = t - int(knobs.horizon_s * _NS)
    while first > 0 and history[first].t_ns > horizon:
        first -= 1
    hist = history[first:]
    now = hist[-1]

    last_change = {n: v for n, v in state.last_change_ns.items() if n in now.processors}
    changed = {n: v for n, v in state.changed_ns.items() if n in now.processors}
    pending = {n: v for n, v in state.pending.items() if n in now.processors}
    seen: dict[str, int] = {}
    for name, p in now.processors.items():
        before = state.seen_instances.get(name)
        if before is None:
            changed.setdefault(name, hist[0].t_ns if len(state.seen_instances) == 0 else t)
        elif before != p.instances:
            changed[name] = t
        seen[name] = p.instances
        if name in pending:
            late = t - last_change.get(name, t) > int(knobs.pending_timeout_s * _NS)
            if p.instances == pending[name] or late:
                del pending[name]

    ctx = _Context(hist, knobs, changed, last_change, pending)
    proposals = {name: _evaluate(ctx, p) for name, p in now.processors.items()}

    # The budget: what the pipe's workers use now (or will, once pending changes are in).
    used = 0.0
    for name, p in now.processors.items():
        w = ctx.avg.get(name)
        if w is not None:
            standing = pending.get(name, p.instances)
            used += max(w.cpu_rate, w.cpu * standing)
    budget = now.cpu_budget
    memory = float(now.memory_available - knobs.memory_headroom)
    ups = sorted((name for name, pr in proposals.items() if pr.kind == "up" and pr.want > 0),
                 key=lambda name: (-proposals[name].urgency, name))
    for name in ups:
        pr = proposals[name]
        n = now.processors[name].instances
        k_cpu = math.floor((budget - used) / pr.cost - knobs.cpu_min_gain) + 1 \
            if pr.cost > 0 else pr.want
        k_mem = math.floor(memory / pr.rss) if pr.rss > 0 else pr.want
        grant = max(0, min(pr.want, k_cpu, k_mem))
        kind_of = "CPU-bound: 1 CPU each" if pr.cost >= 1.0 else \
            f"I/O-bound: {pr.cost:.2f} CPU each"
        budget_note = f"CPUs {used:.2f} of {budget:.2f} used, {kind_of}"
        if grant == 0:
            if k_cpu <= 0:
                why = f"bottleneck but CPU budget full: {budget_note}"
            else:
                why = (f"bottleneck but memory: {pr.rss / _MIB:.0f} MiB per instance, "
                       f"{max(0.0, memory) / _MIB:.0f} MiB to spare")
            proposals[name] = _Proposal("hold", n, f"{why}; {pr.reason}")
            continue
        capped = ""
        if grant < pr.want:
            capped = f"; wanted +{pr.want}, " + (
                budget_note if k_cpu < pr.want and k_cpu <= k_mem else
                f"memory for {k_mem} more ({pr.rss / _MIB:.0f} MiB each)")
        used += grant * pr.cost
        memory -= grant * pr.rss
        proposals[name] = _Proposal("up", n + grant,
                                    f"{pr.reason}: +{grant} ({n} -> {n + grant}){capped}")

    decisions = []
    for name, p in now.processors.items():
        pr = proposals[name]
        decisions.append(Decision(name, p.instances, pr.target, pr.reason, pr.kind))
        if pr.kind != "hold":
            last_change[name] = t
            changed[name] = t
            pending[name] = pr.target
    return decisions, PolicyState(last_change, changed, seen, pending)


# -- the budget -------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _cgroup_dirs(root: Path, proc_cgroup: Path, controller: str) -> list[Path]:
    """The directories of this process's cgroup for ``controller`` (v1) or the unified
    hierarchy (``controller=""``), itself first then its ancestors (limits of ancestors apply
    too). A path that is not under ``root`` (another cgroup namespace) falls back to
    ``root``'s directory itself."""
    text = _read(proc_cgroup)
    if text is None:
        return []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controller:
            names = controllers.split(",")
            if controller not in names:
                continue
            bases = [root / controllers, root / controller]
        else:
            if controllers != "":
                continue
            bases = [root, root / "unified"]
        for base in bases:
            if not base.is_dir():
                continue
            rel_parts = [x for x in rel.split("/") if x]
            dirs = [base.joinpath(*rel_parts[:i]) for i in range(len(rel_parts), -1, -1)]
            found = [d for d in dirs if d.is_dir()]
            return found or [base]
    return []


def cpu_budget(root: str | os.PathLike[str] = "/sys/fs/cgroup",
               proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
               affinity: int | None = None) -> float:
    """CPUs this process may use: the CPUs it may run on (``os.sched_getaffinity``), or fewer
    if a cgroup CPU quota says so (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``, the tightest of its cgroup and their ancestors)."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    budget = float(max(1, affinity))
    root_p, proc_p = Path(root), Path(proc_cgroup)
    for d in _cgroup_dirs(root_p, proc_p, ""):
        text = _read(d / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            try:
                if quota != "max" and int(period or "100000") > 0:
                    budget = min(budget, int(quota) / int(period or "100000"))
            except ValueError:
                pass
    for d in _cgroup_dirs(root_p, proc_p, "cpu"):
        quota_s, period_s = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        try:
            if quota_s and period_s and int(quota_s) > 0 and int(period_s) > 0:
                budget = min(budget, int(quota_s) / int(period_s))
        except ValueError:
            pass
    return budget


def memory_available(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                     proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
                     machine: int | None = None) -> int:
    """Bytes this process's pipe may still allocate: the machine's available memory (psutil),
    or less if a cgroup memory limit is closer (v2 ``memory.max - memory.current``, v1
    ``memory.limit_in_bytes - memory.usage_in_bytes``, the tightest of its cgroup and their
    ancestors)."""
    if machine is None:
        import psutil

        machine = int(psutil.virtual_memory().available)
    best = machine
    root_p, proc_p = Path(root), Path(proc_cgroup)
    for files, controller in ((("memory.max", "memory.current"), ""),
                              (("memory.limit_in_bytes", "memory.usage_in_bytes"), "memory")):
        for d in _cgroup_dirs(root_p, proc_p, controller):
            limit_s, usage_s = _read(d / files[0]), _read(d / files[1])
            try:
                if limit_s and usage_s and limit_s != "max":
                    limit = int(limit_s)
                    if limit < 1 << 60:  # v1 writes "unlimited" as a huge number
                        best = min(best, max(0, limit - int(usage_s)))
            except ValueError:
                pass
    return best


# -- the loop that applies it --------------------------------------------------------------------


class Autoscaler:
    """Samples a running pipe every ``interval`` seconds, runs :func:`decide` and applies its
    targets with ``pipe.scale`` (which retires workers through their input, so a busy worker
    is never killed). Every up/down decision is logged and kept in :attr:`decisions` (the
    monitor shows the last reason per processor).

    It takes the pipe as a duck (``statistics()``, ``scale()``, ``processor_bounds()``,
    ``input_closed()``, ``topology()``), so the policy module does not import the pipe.
    """

    def __init__(self, pipe: Any, knobs: Knobs | None = None, interval: float = 0.5) -> None:
        self.pipe = pipe
        self.knobs = knobs or Knobs()
        self.interval = interval
        self.history: deque[Snapshot] = deque()
        self.state = PolicyState()
        self.decisions: deque[tuple[int, Decision]] = deque(maxlen=200)
        self.budget = cpu_budget()
        self._cpu: dict[int, int] = {}  # pid -> its last CPU reading (ns), kept after it exits
        self._cpu_gone: dict[str, int] = {}  # processor -> CPU of its exited workers
        self._ps: dict[int, Any] = {}  # pid -> psutil.Process (one per worker)
        self._owner: dict[int, str] = {}  # pid -> its processor
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the pipe must outlive a bad sample
                log.exception("autoscaler: a step failed (the pipe carries on)")

    def sample(self) -> Snapshot:
        import psutil

        st = self.pipe.statistics().processors
        bounds = self.pipe.processor_bounds()
        up, down = self.pipe.topology()
        procs: dict[str, ProcessorSample] = {}
        live: set[int] = set()
        for name, p in st.items():
            cpu = rss = 0
            for w in p["workers"]:
                pid = w["pid"]
                live.add(pid)
                self._owner[pid] = name
                ps = self._ps.get(pid)
                try:
                    if ps is None:
                        ps = self._ps[pid] = psutil.Process(pid)
                    with ps.oneshot():
                        t = ps.cpu_times()
                        self._cpu[pid] = int((t.user + t.system) * _NS)
                        rss += int(ps.memory_info().rss)
                except psutil.Error:
                    pass
                cpu += self._cpu.get(pid, 0)
            procs[name] = ProcessorSample(
                name=name, instances=p["instances"], min_instances=bounds[name][0],
                max_instances=bounds[name][1], frames_in=p["frames_in"],
                frames_out=p["frames_out"], get_wait_ns=p["get_wait_ns"],
                emit_wait_ns=p["emit_wait_ns"], cpu_ns=cpu + self._cpu_gone.get(name, 0),
                rss_bytes=rss, queued=p.get("queued", 0), capacity=p.get("capacity", 0),
                input_closed=self.pipe.input_closed(name), upstream=tuple(up[name]),
                downstream=tuple(down[name]))
        # A worker that exited keeps its last CPU reading in its processor's total (the
        # policy takes differences of counters, which must only grow).
        for pid in [pid for pid in self._cpu if pid not in live]:
            name = self._owner.pop(pid, None)
            if name is not None:
                self._cpu_gone[name] = self._cpu_gone.get(name, 0) + self._cpu[pid]
            del self._cpu[pid]
            self._ps.pop(pid, None)
        return Snapshot(time.monotonic_ns(), procs, self.budget, memory_available())

    async def step(self) -> list[Decision]:
        snap = self.sample()
        self.history.append(snap)
        horizon = snap.t_ns - int(self.knobs.horizon_s * _NS)
        while len(self.history) > 2 and self.history[1].t_ns < horizon:
            self.history.popleft()
        decisions, self.state = decide(list(self.history), self.state, self.knobs)
        targets = self.pipe.targets()
        for d in decisions:
            if d.kind != "hold":
                self.decisions.append((snap.t_ns, d))
                log.info("autoscaler: %s %s: %s", d.processor, d.kind, d.reason)
            else:  # every half second per processor: for when you need to know why not
                log.debug("autoscaler: %s hold: %s", d.processor, d.reason)
            if d.target != targets.get(d.processor, d.target) and self.pipe.scalable(d.processor):
                await self.pipe.scale(d.processor, d.target,
                                      reason=None if d.kind == "hold" else d.reason)
        return decisions
