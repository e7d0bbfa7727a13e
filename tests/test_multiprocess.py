"""Several processes on one queue: start methods, subprocess attach, stress with checksums."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import workers

from upipe import Queue


def _run(ctx_name: str, n_prod: int, n_cons: int, n: int, consumer_kinds: list[str],
         maxsize: int = 64) -> None:
    ctx = mp.get_context(ctx_name)
    q = Queue(maxsize=maxsize, max_bytes=8 << 20)
    results = ctx.Queue()
    start = ctx.Event()
    consumers = []
    for i in range(n_cons):
        target = workers.async_consumer if consumer_kinds[i % len(consumer_kinds)] == "async" \
            else workers.sync_consumer
        consumers.append(ctx.Process(target=target, args=(q, results, start)))
    producers = [ctx.Process(target=workers.producer, args=(q, p, n, start))
                 for p in range(n_prod)]
    procs = consumers + producers
    try:
        for p in procs:
            p.start()
        start.set()
        for p in producers:
            p.join(120)
            assert p.exitcode == 0, f"producer exit code {p.exitcode}"
        q.close()
        reports = [results.get(timeout=120) for _ in consumers]
        for c in consumers:
            c.join(60)
            assert c.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        results.close()
        results.join_thread()
    errors = [r for r in reports if r[0] != "ok"]
    assert not errors, errors
    union: dict[int, list[int]] = {}
    for _, _, seen in reports:
        for producer_id, seqs in seen.items():
            assert seqs == sorted(seqs), "per-producer order broken within a consumer"
            union.setdefault(producer_id, []).extend(seqs)
    assert sorted(union) == list(range(n_prod))
    for producer_id, seqs in union.items():
        assert sorted(seqs) == list(range(n)), f"producer {producer_id}: lost or duplicated items"
    st = q.statistics()
    assert st.lost_items == 0 and st.aborted_puts == 0
    assert all(free == total for _, total, free in st.chunk_classes), st.chunk_classes


@pytest.mark.stress
@pytest.mark.timeout(300)
@pytest.mark.parametrize("consumer_kinds", [["sync"], ["async"], ["sync", "async"]])
def test_stress_2x2_spawn(consumer_kinds: list[str], no_leaks: None) -> None:
    n = int(os.environ.get("UPIPE_STRESS_ITEMS", "20000"))
    _run("spawn", 2, 2, n, consumer_kinds)


@pytest.mark.stress
@pytest.mark.timeout(300)
def test_stress_3x2_forkserver_small_ring(no_leaks: None) -> None:
    n = int(os.environ.get("UPIPE_STRESS_ITEMS", "20000")) // 2
    _run("forkserver", 3, 2, n, ["sync", "async"], maxsize=2)


@pytest.mark.timeout(120)
def test_fork_child_gets_its_own_attachment(no_leaks: None) -> None:
    ctx = mp.get_context("fork")
    q = Queue(maxsize=16)
    results = ctx.Queue()
    start = ctx.Event()
    start.set()
    c = ctx.Process(target=workers.sync_consumer, args=(q, results, start))
    c.start()
    for i in range(100):
        q.put(workers.make_item(0, i, __import__("random").Random(i), arrays=True))
    q.close()
    status, _, seen = results.get(timeout=60)
    c.join(30)
    results.close()
    results.join_thread()
    assert status == "ok" and seen[0] == list(range(100))


@pytest.mark.timeout(120)
def test_subprocess_child_attaches_with_a_token(no_leaks: None) -> None:
    inq, outq = Queue(maxsize=8), Queue(maxsize=8)
    token_in, fds_in = inq.export()
    token_out, fds_out = outq.export()
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import workers
        workers.attach_from_token_and_echo({token_in!r}, {token_out!r}, 3)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], pass_fds=fds_in + fds_out)
    try:
        for item in (b"ab", np.arange(3), b"x" * 5000):
            inq.put(item)
        got = [outq.get(timeout=60) for _ in range(3)]
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert got[0] == b"abab"
    np.testing.assert_array_equal(got[1], np.arange(3) * 2)
    assert got[2] == b"x" * 10000


def test_attach_with_a_bad_token_names_the_fix() -> None:
    with pytest.raises(ValueError, match="export"):
        Queue.attach("nonsense")
    q = Queue(maxsize=2)
    token, _ = q.export()
    memfd = token.split(":")[2]
    bad = token.replace(f":{memfd}:", ":987:", 1)
    with pytest.raises(Exception, match="pass_fds"):
        Queue.attach(bad)


def test_attach_to_something_that_is_not_a_segment() -> None:
    from upipe import SegmentError
    from upipe.segment import Segment

    q = Queue(maxsize=2)
    config = q._seg.config
    fd = os.memfd_create("not-upipe")
    os.ftruncate(fd, 1 << 16)
    efd = os.eventfd(0)
    try:
        with pytest.raises(SegmentError):
            Segment.attach((fd, efd, efd), config, timeout=0.1)
    finally:
        os.close(fd)
        os.close(efd)
