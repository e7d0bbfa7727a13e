"""Zero-copy fan-out: one chunk named by several rings of a segment (upipe_put_shared).

The queue-level tests check the accounting (one chunk per frame whatever the number of
downstreams, every chunk back in its pool once the last holder lets go) and crashes of a
holder and of the producer; the pipe-level ones that a processor's downstreams receive the very
same chunk, read-only.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pipe_workers as pw
import pytest
import take_workers as tw

from upipe import Closed, Full, NotOwner, Pipe, Processor, Queue
from upipe.queue import fan_out, fan_out_async, ring_group, ring_queue

SPAWN = mp.get_context("spawn")
FORK = mp.get_context("fork")
KiB = 1 << 10


def group(n: int, maxsize: int = 8, max_bytes: int = 1 << 20) -> list[Queue]:
    return ring_group([{"maxsize": maxsize, "max_bytes": max_bytes}] * n)


def free_chunks(q: Queue) -> int:
    return sum(free for _, _, free in q.statistics().chunk_classes)


def total_chunks(q: Queue) -> int:
    return sum(total for _, total, _ in q.statistics().chunk_classes)


def address(arr: Any) -> int:
    return int(np.asarray(arr).__array_interface__["data"][0])


def detach_all(queues: list[Queue]) -> None:
    for q in queues:
        q.detach()


def test_one_chunk_for_every_downstream(no_leaks: None) -> None:
    qs = group(3)
    try:
        total = total_chunks(qs[0])
        frame = np.arange(8192, dtype=np.int64)  # 64 KiB: a chunk, not a slot
        fan_out(qs, frame)
        assert free_chunks(qs[0]) == total - 1, "one chunk for three rings, not three"
        got = [q.get(timeout=5) for q in qs]
        for arr in got:
            assert np.array_equal(arr, frame)
            assert not arr.flags.writeable, "other processes read the same bytes"
        del arr
        assert len({address(a) for a in got}) == 1, "the same memory, not copies"
        del got[0], got[0]
        assert free_chunks(qs[0]) == total - 1  # one holder is left
        got.clear()
        assert free_chunks(qs[0]) == total
    finally:
        detach_all(qs)


def test_an_alloc_buffer_is_fanned_out_in_place_and_moves(no_leaks: None) -> None:
    qs = group(2)
    try:
        total = total_chunks(qs[0])
        buf = qs[0].alloc_array(4096, np.float64)
        buf[:] = 1.5
        fan_out(qs, buf)
        a, b = qs[0].get(timeout=5), qs[1].get(timeout=5)
        assert address(a) == address(b) == address(buf)
        assert float(a.sum()) == float(b.sum()) == 1.5 * 4096
        with pytest.raises(NotOwner):
            qs[0].put(buf)  # it moved into the rings, as a put moves it
        del a, b
        assert free_chunks(qs[0]) == total, "moved: the producer's views hold nothing"
        del buf
    finally:
        detach_all(qs)


def test_small_items_are_copied_into_each_slot(no_leaks: None) -> None:
    qs = group(3, maxsize=32)
    try:
        total = total_chunks(qs[0])
        for i in range(20):
            fan_out(qs[:2] if i % 2 else qs, b"x%d" % i)
        assert free_chunks(qs[0]) == total
        assert [qs[0].get_nowait() for _ in range(20)] == [b"x%d" % i for i in range(20)]
        assert [qs[2].get_nowait() for _ in range(10)] == [b"x%d" % i for i in range(0, 20, 2)]
    finally:
        detach_all(qs)


def test_take_and_ack_of_a_shared_chunk(no_leaks: None) -> None:
    qs = group(2)
    try:
        total = total_chunks(qs[0])
        fan_out(qs, np.full(4096, 3, np.int64))
        a, ra = qs[0].take(timeout=5)
        b, rb = qs[1].take(timeout=5)
        del a  # a view dropped before its ack: the slot still names the chunk
        qs[0].ack(ra)
        assert free_chunks(qs[0]) == total - 1
        qs[1].ack(rb)
        assert int(b.sum()) == 3 * 4096  # acked, the view stays valid
        del b
        assert free_chunks(qs[0]) == total
    finally:
        detach_all(qs)


def test_a_full_ring_waits_and_the_others_are_not_held_up(no_leaks: None) -> None:
    qs = ring_group([{"maxsize": 1, "max_bytes": 1 << 20}, {"maxsize": 4, "max_bytes": 1 << 20}])
    try:
        total = total_chunks(qs[0])
        fan_out(qs, np.zeros(4096))
        with pytest.raises(Full):
            fan_out(qs, np.ones(4096), timeout=0.2)  # ring 0 stays full
        assert qs[1].qsize() == 2, "ring 1 had room: it got the frame"
        assert qs[0].qsize() == 1
        got0 = [qs[0].get_nowait()]
        got1 = [qs[1].get_nowait(), qs[1].get_nowait()]
        assert [float(x[0]) for x in got1] == [0.0, 1.0]
        del got0, got1
        assert free_chunks(qs[0]) == total, "the frame ring 0 never got is freed too"
    finally:
        detach_all(qs)


def test_fan_out_async_and_a_closed_ring(no_leaks: None) -> None:
    qs = group(3)
    try:
        total = total_chunks(qs[0])
        qs[1].close()
        with pytest.raises(Closed):
            asyncio.run(fan_out_async(qs, np.zeros(4096)))
        assert qs[0].qsize() == qs[2].qsize() == 1, "the open rings still get the frame"
        assert qs[0].get_nowait().shape == (4096,)
        qs[2].get_nowait()
        assert free_chunks(qs[0]) == total
    finally:
        detach_all(qs)


def test_fan_out_to_queues_of_several_segments_copies_per_segment(no_leaks: None) -> None:
    a, b = Queue(maxsize=4), Queue(maxsize=4)
    try:
        big = np.arange(4096, dtype=np.int64)
        fan_out([a, b], big)
        fan_out([a, b], b"x")
        x, y = a.get_nowait(), b.get_nowait()
        assert np.array_equal(x, big) and np.array_equal(y, big)
        assert address(x) != address(y), "two segments: one chunk each"
        assert a.get_nowait() == b.get_nowait() == b"x"
        with pytest.raises(ValueError, match="at least one"):
            fan_out([], b"x")
    finally:
        a.detach()
        b.detach()


def test_fan_out_refuses_a_spent_buffer_and_a_bad_timeout(no_leaks: None) -> None:
    qs = group(2)
    try:
        total = total_chunks(qs[0])
        buf = qs[0].alloc_array(4096, np.int64)
        with pytest.raises(ValueError, match="timeout"):
            fan_out(qs, buf, timeout=-1)
        qs[0].put(buf)  # the buffer is still ours after the refused call: put moves it
        with pytest.raises(NotOwner):
            fan_out(qs, buf)  # spent: not a silent copy of a chunk that is not ours
        del buf
        qs[0].get_nowait()
        assert free_chunks(qs[0]) == total
    finally:
        detach_all(qs)


def test_fan_out_with_every_ring_closed_and_no_chunk_raises_closed(no_leaks: None) -> None:
    qs = ring_group([{"maxsize": 4, "max_bytes": 1 << 20}] * 2)
    try:
        held = []
        while True:  # take every 1 MiB-class chunk... of the largest class the frame needs
            try:
                held.append(qs[0].alloc(200_000, block=False))
            except Full:
                break
        for q in qs:
            q.close()
        with pytest.raises(Closed):
            fan_out(qs, np.zeros(200_000 // 8), timeout=5)
        held.clear()
    finally:
        detach_all(qs)


def test_ring_group_checks_each_member_like_queue() -> None:
    for bad, match in [({"maxsize": 0}, "maxsize"), ({"maxsize": True}, "maxsize"),
                       ({"max_bytes": 0}, "max_bytes"),
                       ({"max_bytes": 1000, "max_message_size": 2000}, "larger than"),
                       ({"maxsize": 1 << 31}, "at most")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ring_group([{"maxsize": 4}, bad])
    with pytest.raises(TypeError, match="dict of Queue options"):
        ring_group(["abc"])  # type: ignore[list-item]


@pytest.mark.timeout(60)
def test_a_taker_killed_holding_a_shared_chunk(no_leaks: None) -> None:
    qs = group(3, maxsize=4)
    try:
        total = total_chunks(qs[0])
        fan_out(qs, np.full(4096, 9, np.int64))
        ready = SPAWN.Event()
        child = SPAWN.Process(target=tw.take_shared_and_die, args=(qs[1], ready))
        child.start()
        assert ready.wait(30)
        child.join(30)
        assert child.exitcode == -9
        qs[1].recover()
        again = qs[1].get(timeout=5)  # redelivered to its ring: at-least-once
        assert int(again.sum()) == 9 * 4096
        others = [qs[0].get(timeout=5), qs[2].get(timeout=5)]
        assert len({address(x) for x in [again, *others]}) == 1, "still the one chunk"
        del again, others
        assert free_chunks(qs[0]) == total, "the dead taker's hold was dropped"
    finally:
        detach_all(qs)


@pytest.mark.timeout(60)
def test_a_producer_killed_mid_fan_out(no_leaks: None) -> None:
    qs = ring_group([{"maxsize": 4, "max_bytes": 1 << 20}, {"maxsize": 1, "max_bytes": 1 << 20}])
    try:
        total = total_chunks(qs[0])
        ready = SPAWN.Event()
        # fork: the child inherits both rings' attachment (pickling two rings of one segment
        # for a spawn child would pass the same fds twice, which spawn refuses)
        child = FORK.Process(target=tw.fan_out_and_die, args=(qs, 2, ready))
        child.start()
        assert ready.wait(30)
        assert qs[0].qsize() == 2 and qs[1].qsize() == 1  # frame 1 waits for ring 1
        child.kill()
        child.join(30)
        qs[0].recover()
        got = [qs[0].get_nowait(), qs[0].get_nowait(), qs[1].get_nowait()]
        assert [int(x[0]) for x in got] == [0, 1, 0]
        del got
        assert free_chunks(qs[0]) == total, "the dead producer's hold was dropped"
    finally:
        detach_all(qs)


# -- in a pipe ------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def run_pipe(pipe: Pipe) -> None:
    await pipe.start()
    await pipe.wait_for_completion()


@pytest.mark.timeout(120)
def test_a_pipe_fans_1mib_frames_out_as_one_chunk(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")
    n = 200
    src = Processor("src", func=pw.frame_source, config={"count": n})
    pipe = Pipe("fan-out")
    pipe.add(src)
    for name in ("a", "b", "c"):
        src.add(Processor(name, func=pw.frame_chunks, config={"report": report}))
    run(run_pipe(pipe))
    reports = {r["name"]: r for r in pw.read_reports(report)}
    assert sorted(reports) == ["a", "b", "c"]
    for r in reports.values():
        assert r["frames"] == n and r["bad"] == 0
        assert not r["writable"], "a fanned-out frame is read-only"
    # Each frame is the same chunk in all three (chunk ids are per segment: one segment).
    assert min(reports["a"]["chunks"]) >= 0, "every frame arrived as a chunk"
    assert reports["a"]["chunks"] == reports["b"]["chunks"] == reports["c"]["chunks"]


@pytest.mark.timeout(120)
def test_pipe_emit_to_several_roots(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")

    async def main() -> None:
        pipe = Pipe("roots")
        pipe.add(Processor("a", func=pw.frame_chunks, config={"report": report, "scale": 1}))
        pipe.add(Processor("b", func=pw.frame_chunks, config={"report": report, "scale": 1}))
        await pipe.start()
        for i in range(20):
            await pipe.emit(np.full(262144, i, np.float32))
        await pipe.terminate()

    run(main())
    reports = {r["name"]: r for r in pw.read_reports(report)}
    assert reports["a"]["frames"] == reports["b"]["frames"] == 20
    assert reports["a"]["bad"] == reports["b"]["bad"] == 0
    assert min(reports["a"]["chunks"]) >= 0, "every frame arrived as a chunk"
    assert reports["a"]["chunks"] == reports["b"]["chunks"]


def test_fan_out_groups_are_rings_of_one_segment(no_leaks: None) -> None:
    pipe = Pipe("groups")
    src = pipe.add(Processor("src", func=pw.count_source, config={"count": 1}))
    x, y = src.add(Processor("x", func=pw.plus_one)), src.add(Processor("y", func=pw.plus_one))
    x.add(Processor("z", func=pw.collect, config={"report": os.devnull}))
    pipe._build()
    pipe._create_queues()
    try:
        nodes = pipe._nodes
        assert nodes["x"].input._seg is nodes["y"].input._seg  # type: ignore[union-attr]
        assert nodes["z"].input._seg is not nodes["x"].input._seg  # type: ignore[union-attr]
        assert nodes["src"].input._seg is not nodes["x"].input._seg  # type: ignore[union-attr]
        del y
    finally:
        for q in pipe._queues():
            q.detach()


@pytest.mark.timeout(180)
def test_sigkilled_fan_out_consumers_lose_nothing_and_leak_no_chunk(tmp_path: Path,
                                                                    no_leaks: None) -> None:
    """Frames of 64 KiB fanned out to 'a' (2 instances, SIGKILLed 6 times) and 'b': both get
    every frame (at-least-once), and when the pipe is done every chunk of the group is free
    again (a dead holder's references were dropped by recovery)."""
    report = str(tmp_path / "r")
    n = 600
    rng = random.Random(11)

    async def main() -> tuple[dict[str, int], int, int]:
        async with Pipe("fan-out-chaos", autoscaler=False) as pipe:
            src = pipe.add(Processor("src", func=pw.array_source,
                                     config={"count": n, "elems": 8192}))
            src.add(Processor("a", func=pw.array_collect, instances=2, restarts=20,
                              config={"report": report, "delay": 0.002}))
            src.add(Processor("b", func=pw.array_collect, config={"report": report}))
            await pipe.start()
            a_in = pipe._nodes["a"].input
            assert a_in is not None and pipe._nodes["b"].input is not None
            assert a_in._seg is pipe._nodes["b"].input._seg, "one group"
            # Our own queue over the group's segment, to look at its pool after the pipe is done.
            watch = ring_queue(a_in._seg, 0, 8)
            killed = 0
            while killed < 6:
                await asyncio.sleep(rng.uniform(0.05, 0.2))
                workers = [w for w in pipe._nodes["a"].workers.values() if w.joined]
                if workers and not pipe._nodes["a"].finished:
                    os.kill(rng.choice(workers).pid, signal.SIGKILL)
                    killed += 1
            await pipe.wait_for_completion()
        try:  # every worker is gone: every reference to a chunk must have been dropped
            watch.recover()
            return pipe.statistics().processors["a"], free_chunks(watch), total_chunks(watch)
        finally:
            watch.detach()

    a_stats, free, total = run(main())
    assert a_stats["restarts"] == 6
    by_name: dict[str, set[int]] = {"a": set(), "b": set()}
    counts = {"a": 0, "b": 0}
    for name in ("a", "b"):
        for r in pw.read_reports(f"{report}.{name}"):
            assert r["bad"] == 0
            by_name[name] |= set(r["seen"])
            counts[name] += len(r["seen"])
    assert by_name["b"] == set(range(n)) and counts["b"] == n, "b saw every frame once"
    assert by_name["a"] == set(range(n)), "a saw every frame despite the kills"
    assert free == total, f"{total - free} chunks still held after the pipe finished"


def test_no_group_member_is_downstream_of_another(no_leaks: None) -> None:
    """A -> B, A -> C, B -> C: B's output is C's input. In one segment, frames waiting for a
    slow B could hold every chunk of the pool while B waits for a chunk to emit into C: a
    deadlock. So B and C get segments of their own (and A's fan-out one chunk per segment)."""
    pipe = Pipe("diamond-groups")
    a = pipe.add(Processor("a", func=pw.frame_source, config={"count": 1}))
    b = a.add(Processor("b", func=pw.slow_frame_copy))
    c = a.add(Processor("c", func=pw.count_frames, config={"report": os.devnull}))
    b.add(c)
    d = a.add(Processor("d", func=pw.count_frames, config={"report": os.devnull}))
    pipe._build()
    groups = [sorted(n.name for n in g) for g in pipe._fan_out_groups()]
    assert sorted(x for g in groups for x in g) == ["a", "b", "c", "d"]
    assert ["a"] in groups
    assert not any({"b", "c"} <= set(g) for g in groups), "c is downstream of b"
    assert any(len(g) == 2 and "d" in g for g in groups), "d shares with b or c"
    del d


@pytest.mark.timeout(120)
def test_a_diamond_with_a_slow_branch_and_small_pools_completes(tmp_path: Path,
                                                                 no_leaks: None) -> None:
    report = str(tmp_path / "r")
    n = 60
    # 4 chunks of 1 MiB per input, 8 frames per queue. Grouped, b's and c's inputs would have
    # 8 chunks between them, all held by frames waiting for b, while b waits for one to emit
    # into c: this pipe hung before the groups were split (and does, forced into one group).
    opts = {"max_bytes": 12 << 20, "max_message_size": 1 << 20, "queue_size": 8}

    async def main() -> None:
        pipe = Pipe("diamond-small-pools")
        a = pipe.add(Processor("a", func=pw.frame_source, config={"count": n}, **opts))
        b = a.add(Processor("b", func=pw.slow_frame_copy, config={"delay": 0.005}, **opts))
        c = a.add(Processor("c", func=pw.count_frames, config={"report": report}, **opts))
        b.add(c)
        await pipe.start()
        await asyncio.wait_for(pipe.wait_for_completion(), 90)

    run(main())
    (r,) = pw.read_reports(report + ".c")
    assert r["frames"] == 2 * n, "c got every frame from a and from b"
