"""At-least-once delivery: Queue.take / take_async / ack, and redelivery after a SIGKILL.

A take leaves its item in its slot until the ack; a taker that dies (or detaches) first has its
items put back for another consumer, counted in statistics().redelivered, never lost.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import random
import signal
import time

import numpy as np
import pytest
import take_workers

from upipe import Closed, Empty, Full, NotOwner, Queue, Receipt, TooManyTakes

SPAWN = mp.get_context("spawn")
FORKSERVER = mp.get_context("forkserver")


def _chunks_all_free(q: Queue) -> bool:
    return all(free == total for _, total, free in q.statistics().chunk_classes)


# -- the API ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        b"small",
        b"x" * 5000,
        bytearray(b"abc"),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(20000, dtype=np.int64),
        {"a": [1, 2], "big": np.ones(4096)},
        memoryview(b"viewed"),
    ],
    ids=["inline", "chunk", "bytearray", "ndarray_inline", "ndarray_chunk", "pickle_oob", "view"],
)
def test_take_ack_round_trip_decodes_like_get(obj: object, no_leaks: None) -> None:
    q = Queue(maxsize=4, chunk_sizes={4096: 4, 65536: 4, 262144: 4})
    q.put(obj)
    q.put(obj)
    expected = q.get(timeout=5)
    item, receipt = q.take(timeout=5)
    assert isinstance(receipt, Receipt)
    assert type(item) is type(expected)
    if isinstance(obj, dict):
        assert item["a"] == obj["a"]
        np.testing.assert_array_equal(item["big"], obj["big"])
    elif isinstance(obj, np.ndarray):
        assert item.dtype == obj.dtype and item.shape == obj.shape
        np.testing.assert_array_equal(item, obj)
        assert not item.flags.writeable
    else:
        assert bytes(item) == bytes(obj)  # type: ignore[call-overload]
    assert q.qsize() == 0
    q.ack(receipt)
    del item, expected
    assert _chunks_all_free(q)
    st = q.statistics()
    assert st.redelivered == 0 and st.lost_items == 0


def test_ack_twice_or_bogus_receipts_raise_not_owner(no_leaks: None) -> None:
    q, other = Queue(maxsize=4), Queue(maxsize=4)
    q.put(b"a")
    other.put(b"b")
    _, receipt = q.take()
    _, foreign = other.take()
    with pytest.raises(NotOwner, match="not from a take"):
        q.ack(foreign)
    for bogus in (None, 0x40, "receipt", object()):
        with pytest.raises(NotOwner, match="needs the Receipt"):
            q.ack(bogus)  # type: ignore[arg-type]
    q.ack(receipt)
    with pytest.raises(NotOwner, match="already acked"):
        q.ack(receipt)
    assert isinstance(NotOwner("x"), ValueError)
    with pytest.raises(TypeError, match="only valid in the process"):
        pickle.dumps(receipt)
    other.ack(foreign)
    q.detach()
    with pytest.raises(Exception, match="detached"):
        q.ack(receipt)


def test_an_unacked_take_keeps_its_slot_busy(no_leaks: None) -> None:
    q = Queue(maxsize=4)  # 4 slots
    q.put(b"held")
    item, receipt = q.take()
    assert item == b"held" and q.qsize() == 0
    for i in range(3):
        q.put_nowait(b"%d" % i)
    with pytest.raises(Full):  # the next slot is the held one: head-of-line
        q.put_nowait(b"blocked")
    q.ack(receipt)
    q.put_nowait(b"3")
    assert [q.get_nowait() for _ in range(4)] == [b"0", b"1", b"2", b"3"]


def test_a_dropped_view_keeps_its_chunk_until_the_ack(no_leaks: None) -> None:
    q = Queue(maxsize=4, max_bytes=1 << 20, chunk_sizes={65536: 4})
    q.put(np.full(5000, 7, dtype=np.int64))
    arr, receipt = q.take()
    assert q.statistics().chunk_classes[0][2] == 3
    with pytest.raises(NotOwner, match="not acked yet"):
        q.put(arr)  # its slot still names the chunk
    q.release(arr)  # deferred to the ack
    del arr
    assert q.statistics().chunk_classes[0][2] == 3
    q.ack(receipt)
    assert _chunks_all_free(q)
    # acked first, viewed after: the view stays valid, then frees the chunk
    q.put(np.full(5000, 8, dtype=np.int64))
    arr, receipt = q.take()
    q.ack(receipt)
    assert int(arr.sum()) == 8 * 5000
    q.put(arr)  # an acked view is an ordinary zero-copy buffer: put moves it
    np.testing.assert_array_equal(q.get(), np.full(5000, 8))
    del arr
    assert _chunks_all_free(q)


def test_too_many_takes(no_leaks: None) -> None:
    q = Queue(maxsize=64)
    for i in range(40):
        q.put(b"%d" % i)
    held = [q.take()[1] for _ in range(32)]
    with pytest.raises(TooManyTakes, match="32 unacked"):
        q.take()
    assert q.get() == b"32"  # gets are not limited
    q.ack(held.pop())
    _, receipt = q.take()
    for r in [*held, receipt]:
        q.ack(r)


def test_take_blocks_times_out_and_wakes(no_leaks: None) -> None:
    q = Queue(maxsize=4)
    with pytest.raises(Empty):
        q.take(block=False)
    t0 = time.monotonic()
    with pytest.raises(Empty):
        q.take(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    import threading

    threading.Timer(0.05, q.put, args=(b"late",)).start()
    item, receipt = q.take(timeout=10)
    assert item == b"late"
    q.ack(receipt)


def test_take_async(no_leaks: None) -> None:
    q = Queue(maxsize=4, max_bytes=1 << 20)

    async def main() -> None:
        with pytest.raises(Empty):
            await q.take_async(timeout=0.02)
        task = asyncio.ensure_future(q.take_async())
        await asyncio.sleep(0.02)
        task.cancel()  # cancel-safe: takes nothing
        with pytest.raises(asyncio.CancelledError):
            await task
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, q.put, np.arange(9000))
        arr, receipt = await q.take_async(timeout=10)
        np.testing.assert_array_equal(arr, np.arange(9000))
        q.ack(receipt)
        q.put(b"next")
        item, receipt = await q.take_async()
        assert item == b"next"
        q.ack(receipt)

    asyncio.run(main())
    assert q.qsize() == 0 and _chunks_all_free(q)


def test_closed_queue_drains_only_once_no_held_item_can_come_back(no_leaks: None) -> None:
    # Our own unacked take cannot come back without us: it does not hold the end up for us.
    q = Queue(maxsize=4)
    q.put(b"a")
    _, mine = q.take()
    q.close()
    with pytest.raises(Closed):
        q.take(block=False)
    with pytest.raises(Closed):
        q.get_nowait()
    q.ack(mine)
    q.detach()
    # Another consumer's can (it may die, or detach): the queue is not drained until then.
    q = Queue(maxsize=4)
    token, _ = q.export()
    other = Queue.attach(token)  # a second attachment: "another consumer process"
    q.put(b"b")
    _, theirs = other.take()
    q.close()
    with pytest.raises(Empty):
        q.get_nowait()
    t0 = time.monotonic()
    with pytest.raises(Empty):
        q.take(timeout=0.05)
    assert time.monotonic() - t0 < 5
    other.detach()  # detaching gives its unacked take back, even into a closed queue
    assert q.get(timeout=5) == b"b"
    with pytest.raises(Closed):
        q.get(timeout=5)
    st = q.statistics()
    assert st.redelivered == 1 and st.recoveries == 0 and st.attached_processes == 1
    # and an ack by the other consumer ends the wait of a blocked get at once
    q2 = Queue(maxsize=4)
    other2 = Queue.attach(q2.export()[0])
    q2.put(b"c")
    _, theirs = other2.take()
    q2.close()
    import threading

    threading.Timer(0.1, other2.ack, args=(theirs,)).start()
    t0 = time.monotonic()
    with pytest.raises(Closed):
        q2.get(timeout=10)
    assert time.monotonic() - t0 < 1.0  # woken by the ack, not by a timeout
    other2.detach()
    assert q2.statistics().redelivered == 0


# -- processes ----------------------------------------------------------------------------------


def test_a_killed_takers_items_are_redelivered_to_another_consumer(no_leaks: None) -> None:
    n = 12
    q = Queue(maxsize=16, max_bytes=2 << 20, chunk_sizes={8192: 16, 65536: 8})
    for i in range(n + 4):
        q.put(take_workers.make(i))
    ready = SPAWN.Event()
    ids = SPAWN.Array("i", n, lock=False)
    p = SPAWN.Process(target=take_workers.take_and_hold, args=(q, n, ready, ids))
    p.start()
    try:
        assert ready.wait(60), "the taker never took its items"
        taken = sorted(ids)
        assert taken == list(range(n))
        assert q.qsize() == 4 and q.statistics().redelivered == 0
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
        p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert q.recover() == 1
    st = q.statistics()
    assert st.redelivered == n and st.lost_items == 0 and st.recoveries == 1
    assert st.attached_processes == 1
    # Every item comes out again, intact, to another consumer: the 4 never taken, then the n.
    got = []
    while q.qsize():
        item, receipt = q.take(timeout=5)
        got.append(take_workers.check(item))
        q.ack(receipt)
        del item
    assert sorted(got) == list(range(n + 4))
    assert got[:4] == [n, n + 1, n + 2, n + 3]
    assert _chunks_all_free(q)
    assert q.statistics().reclaimed_chunks == 0  # the chunks travelled with their items


def test_a_taker_that_exits_without_acking_gives_its_items_back(no_leaks: None) -> None:
    n = 6
    q = Queue(maxsize=8, max_bytes=1 << 20)
    for i in range(n):
        q.put(take_workers.make(i))
    p = FORKSERVER.Process(target=take_workers.take_and_exit, args=(q, n))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    st = q.statistics()
    assert st.redelivered == n and st.recoveries == 0 and st.attached_processes == 1
    assert sorted(take_workers.check(q.get(timeout=5)) for _ in range(n)) == list(range(n))
    assert _chunks_all_free(q)


@pytest.mark.timeout(600)
def test_random_sigkill_of_a_taker_loses_nothing(no_leaks: None) -> None:
    rounds = int(os.environ.get("UPIPE_TAKE_CRASH_ROUNDS", "6"))
    rng = random.Random(int(os.environ.get("UPIPE_CRASH_SEED", "4321")))
    total_dups = total_redelivered = 0
    for round_ in range(rounds):
        dups, redelivered = _crash_round(rng, round_)
        total_dups += dups
        total_redelivered += redelivered
    assert total_redelivered > 0, "no round killed the taker while it held anything"


def _crash_round(rng: random.Random, round_: int) -> tuple[int, int]:
    n = 400
    q = Queue(maxsize=8, max_bytes=2 << 20, chunk_sizes={8192: 24, 65536: 12})
    by_victim = FORKSERVER.Array("i", n, lock=False)
    by_survivor = FORKSERVER.Array("i", n, lock=False)
    start = FORKSERVER.Event()
    producer = FORKSERVER.Process(target=take_workers.produce, args=(q, n, start, 0.001))
    victim = FORKSERVER.Process(target=take_workers.take_mark_ack,
                                args=(q, by_victim, start, rng.randrange(1 << 30), 0.02))
    survivor = FORKSERVER.Process(target=take_workers.take_mark_ack,
                                  args=(q, by_survivor, start, rng.randrange(1 << 30), 0.0))
    procs = [producer, victim, survivor]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60
        while q.statistics().attached_processes < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # all three attached: the kill cannot come before the victim's
        start.set()
        time.sleep(rng.uniform(0.02, 0.4))  # the stream lasts about 0.5 s
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        victim.join(30)
        producer.join(120)
        assert producer.exitcode == 0, f"round {round_}: producer failed"
        q.close()
        survivor.join(120)
        assert survivor.exitcode == 0, f"round {round_}: survivor failed ({survivor.exitcode})"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(30)
    assert victim.exitcode == -signal.SIGKILL
    q.recover()
    st = q.statistics()
    victim_counts, survivor_counts = list(by_victim), list(by_survivor)
    # What the victim had not finished, the survivor received: nothing sent is missing...
    missing = [i for i in range(n) if victim_counts[i] + survivor_counts[i] == 0]
    assert not missing, f"round {round_}: lost {missing[:10]} ({st})"
    # ...and an item comes out twice only because it was redelivered (the victim was killed
    # between counting it and acking it).
    dups = sum(victim_counts) + sum(survivor_counts) - n
    assert 0 <= dups <= st.redelivered, (round_, dups, st)
    assert max(survivor_counts) == 1, f"round {round_}: the survivor got an item twice"
    assert st.lost_items == 0 and st.lost_leases == 0, st
    assert st.recoveries == 1 and st.attached_processes == 1, st
    assert _chunks_all_free(q), st.chunk_classes
    with pytest.raises(Closed):
        q.get_nowait()
    return dups, st.redelivered
