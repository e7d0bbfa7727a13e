"""Processor and Pipe: topology, frames, lifecycle, failures, signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pipe_workers as pw
import psutil
import pytest

from upipe import Pipe, Processor, ProcessorError, UpipeError, monitor

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def run_pipe(pipe: Pipe) -> None:
    await pipe.start()
    await pipe.wait_for_completion()


async def until(condition: Any, timeout: float = 30) -> None:
    """Poll condition() until it holds (a loaded machine starts workers slowly)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.02)


def seen_by(report: str, name: str) -> list[int]:
    return [x for r in pw.read_reports(report + "." + name) for x in r["seen"]]


# -- declarations and topology -------------------------------------------------------------


def local_function_holder() -> Any:
    async def local(proc: Processor) -> None:
        pass

    return local


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"func": pw.collect, "entry": "./x.py"}, "not both"),
        ({"func": lambda proc: None}, "lambda"),
        ({"func": local_function_holder()}, "inside another function"),
        ({"func": 42}, "must be a function"),
        ({"func": pw.collect, "instances": 0}, "instances must be an int >= 1"),
        ({"func": pw.collect, "instances": 3, "autoscale": 2}, "outside 1..2"),
        ({"func": pw.collect, "min_instances": 3, "autoscale": 2}, "min_instances=3 is more"),
        ({"func": pw.collect, "autoscale": 2, "max_instances": 3}, "disagree"),
        ({"func": pw.collect, "restarts": -1}, "restarts"),
        ({"func": pw.collect, "queue_size": 0}, "queue_size"),
    ],
)
def test_bad_declarations_are_refused_at_once(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Processor("p", **kwargs)


def test_bad_names_are_refused() -> None:
    for name in ("", "a/b", 3):
        with pytest.raises(ValueError, match="name"):
            Processor(name, func=pw.collect)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        Pipe("")


def topology_error(pipe: Pipe) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        run(pipe.start())
    return str(info.value)


def test_topology_errors_name_what_is_wrong(no_leaks: None) -> None:
    pipe = Pipe("dup")
    pipe.add(Processor("a", func=pw.count_source)).add(Processor("a", func=pw.collect))
    assert "two different processors are named 'a'" in topology_error(pipe)

    pipe = Pipe("unknown")
    pipe.add(Processor("a", func=pw.count_source)).add("nope")
    msg = topology_error(pipe)
    assert "unknown processor 'nope'" in msg and "the pipe has: a" in msg

    a, b, c = (Processor(n, func=pw.plus_one) for n in "abc")
    pipe = Pipe("cycle")
    pipe.add(a).add(b).add(c).add(a)
    assert "cycle: a -> b -> c -> a" in topology_error(pipe)

    pipe = Pipe("no-code")
    pipe.add(Processor("a"))
    assert "neither func= nor entry=" in topology_error(pipe)

    pipe = Pipe("no-file")
    pipe.add(Processor("a", entry="./does-not-exist.py"))
    assert "not found" in topology_error(pipe)

    with pytest.raises(ValueError, match="no processors"):
        run(Pipe("empty").start())


def test_instance_bounds() -> None:
    fixed = Processor("f", func=pw.collect, instances=3)
    assert (fixed.instances, fixed.min_instances, fixed.max_instances, fixed.autoscaled) == (
        3, 3, 3, False)
    seed = Processor("s", func=pw.collect, autoscale=4)  # the seed's "at most 4"
    assert (seed.instances, seed.min_instances, seed.max_instances, seed.autoscaled) == (
        1, 1, 4, True)
    both = Processor("b", func=pw.collect, min_instances=2, max_instances=5, instances=3)
    assert (both.instances, both.min_instances, both.max_instances) == (3, 2, 5)


def test_add_returns_what_it_added() -> None:
    pipe = Pipe("p")
    a, b, c = (Processor(n, func=pw.plus_one) for n in "abc")
    assert pipe.add(a) is a
    assert a.add(b) is b
    assert a.add(c) is c
    assert a.downstream == [b, c]


def test_join_outside_a_pipe_says_how_to_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPIPE_PIPE", raising=False)
    with pytest.raises(UpipeError, match="not started by a upipe Pipe"):
        run(Processor("b").join())
    with pytest.raises(UpipeError, match="has not joined"):
        run(Processor("b").get())


# -- frames through the pipe ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_plus_one_100k_frames_count_and_sum(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")
    n = 100_000
    pipe = Pipe("plus-one")
    pipe.add(Processor("a", func=pw.count_source, config={"count": n})).add(
        Processor("b", func=pw.plus_one)).add(Processor("sink", func=pw.collect,
                                                        config={"report": report}))
    run(run_pipe(pipe))
    seen = seen_by(report, "sink")
    assert len(seen) == n and sum(seen) == n * (n + 1) // 2
    assert seen == list(range(1, n + 1)), "one producer, one consumer: order is kept"


def test_fan_out_and_fan_in(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")
    n = 2000
    src = Processor("src", func=pw.count_source, config={"count": n})
    x2 = Processor("x2", func=pw.times, config={"factor": 2})
    x3 = Processor("x3", func=pw.times, config={"factor": 3})
    sink = Processor("sink", func=pw.collect_blocking, config={"report": report})
    pipe = Pipe("diamond")
    pipe.add(src)
    src.add(x2).add(sink)
    src.add(x3).add(sink)
    run(run_pipe(pipe))
    seen = sorted(seen_by(report, "sink"))
    assert seen == sorted([2 * i for i in range(n)] + [3 * i for i in range(n)])


def test_instances_share_the_input_each_frame_once(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")
    n = 5000
    pipe = Pipe("shared")
    pipe.add(Processor("src", func=pw.count_source, config={"count": n})).add(
        Processor("sink", func=pw.collect, config={"report": report}, instances=3))
    run(run_pipe(pipe))
    reports = pw.read_reports(report + ".sink")
    assert len(reports) == 3
    seen = [x for r in reports for x in r["seen"]]
    assert sorted(seen) == list(range(n))


def test_entry_scripts_plus_one_example(no_leaks: None) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / "plus_one" / "pipe.py"), "20000"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "b received 20,000 frames" in out.stdout


def test_numpy_frames_zero_copy_through_three_stages(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")
    pipe = Pipe("frames")
    pipe.add(Processor("gen", func=pw.frame_source, config={"count": 200})).add(
        Processor("scale", func=pw.frame_scale)).add(
        Processor("check", func=pw.frame_check, config={"report": report}))
    run(run_pipe(pipe))
    (r,) = pw.read_reports(report + ".check")
    assert r == {"frames": 200, "bad": 0, "writable": False}


def test_processor_faces_get_emit_config(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")
    cfg = {"report": report, "tag": "hello", "count": 0}
    probe = Processor("probe", func=pw.probe_faces, config=cfg)
    pipe = Pipe("faces")
    pipe.add(probe).add(Processor("sink", func=pw.idle_sink, config=cfg, queue_size=2))
    run(run_pipe(pipe))
    (r,) = pw.read_reports(report + ".probe")
    assert r["get_empty"] is None
    assert r["get_sync_timeout"] == "TimeoutError"
    assert r["config"] == "hello"
    assert r["emit_results"] == [True, True, False, False]  # back-pressure: False, no wait
    assert "None marks the end of the stream" in r["emit_none"]


def test_emit_sync_returns_what_reaches_the_sink(no_leaks: None) -> None:
    async def main() -> list[Any]:
        pipe = Pipe("service")
        pipe.add(Processor("double", func=pw.doubler))
        await pipe.start()
        try:
            return [await pipe.emit_sync(x, timeout=30) for x in (1, 21, "ab")]
        finally:
            await pipe.terminate()

    assert run(main()) == [2, 42, "abab"]


# -- failures ------------------------------------------------------------------------------


def test_an_exception_fails_the_pipe_with_its_traceback(no_leaks: None) -> None:
    pipe = Pipe("fails")
    pipe.add(Processor("src", func=pw.count_source, config={"count": 100})).add(
        Processor("bad", func=pw.raises))
    with pytest.raises(ProcessorError) as info:
        run(run_pipe(pipe))
    err = info.value
    assert err.processor == "bad" and err.pid > 0
    assert err.remote_traceback and "frame 3 is cursed" in err.remote_traceback
    assert "in raises" in err.remote_traceback  # the remote frame, by function name
    assert "'bad'" in str(err) and str(err.pid) in str(err)


def test_a_killed_worker_is_restarted_then_the_limit_fails_the_pipe(no_leaks: None) -> None:
    pipe = Pipe("suicidal")
    pipe.add(Processor("k", func=pw.kills_itself, restarts=2))
    start = time.monotonic()
    with pytest.raises(ProcessorError, match=r"killed by SIGKILL.*restart limit \(2\)") as info:
        run(run_pipe(pipe))
    assert info.value.exitcode == -signal.SIGKILL
    assert time.monotonic() - start < 20


def test_sigkilled_workers_are_restarted_and_no_frame_is_lost(tmp_path: Path,
                                                              no_leaks: None) -> None:
    """12 SIGKILLs of random plus-one workers mid-stream: each is restarted, the frame it had
    in hand goes to a sibling (at-least-once), and the sink gets every frame."""
    report = str(tmp_path / "r")
    n = 20_000
    rng = random.Random(7)

    async def main() -> Pipe:
        async with Pipe("chaos", autoscaler=False) as pipe:
            pipe.add(Processor("src", func=pw.count_source, config={"count": n})).add(
                Processor("mid", func=pw.plus_one, instances=2, restarts=20,
                          config={"delay": 0.0002})).add(
                Processor("sink", func=pw.collect, config={"report": report}))
            await pipe.start()
            killed = 0
            while killed < 12:
                await asyncio.sleep(rng.uniform(0.05, 0.25))
                mids = [w for w in pipe._nodes["mid"].workers.values() if w.joined]
                if mids and not pipe._nodes["mid"].finished:
                    os.kill(rng.choice(mids).pid, signal.SIGKILL)
                    killed += 1
            await pipe.wait_for_completion()
        return pipe

    pipe = run(main())
    mid = pipe.statistics().processors["mid"]
    assert mid["restarts"] == 12
    seen = seen_by(report, "sink")
    assert set(seen) == set(range(1, n + 1)), "every frame reached the sink"
    duplicates = len(seen) - n  # frames a killed worker had emitted before it could ack them
    assert 0 <= duplicates <= 12, duplicates
    assert mid["lost_frames"] == 0


def test_terminate_mid_stream_stops_the_source_and_drains(tmp_path: Path,
                                                          no_leaks: None) -> None:
    report = str(tmp_path / "r")

    async def main() -> None:
        pipe = Pipe("endless")
        pipe.add(Processor("src", func=pw.endless_source)).add(
            Processor("mid", func=pw.plus_one)).add(
            Processor("sink", func=pw.collect, config={"report": report}))
        await pipe.start()
        await until(lambda: pipe.statistics().processors["sink"]["frames_in"] >= 100)
        t0 = time.monotonic()
        await pipe.terminate()
        assert time.monotonic() - t0 < 10
        await pipe.wait_for_completion()  # returns at once: already drained

    run(main())
    seen = seen_by(report, "sink")
    assert seen and seen == list(range(1, len(seen) + 1)), "a gap-free prefix reached the sink"


def wait_for_frames(pid: int, processor: str, n: int, timeout: float = 30) -> None:
    """Until the pipe run by process ``pid`` has passed n frames to ``processor`` (asked
    over its control socket, as upipe status does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snap in monitor.snapshots():
            if snap["pid"] == pid and snap["processors"][processor]["frames_in"] >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"{processor} did not get {n} frames within {timeout} s")


PIPE_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    import pipe_workers as pw
    from upipe import Pipe, Processor

    async def main():
        pipe = Pipe("sigint")
        pipe.add(Processor("src", func=pw.endless_source)).add(
            Processor("sink", func=pw.collect, config={{"report": {report!r}}}))
        await pipe.start()
        print("Running", flush=True)
        await pipe.wait_for_completion()

    if __name__ == "__main__":
        asyncio.run(main())
""")


@pytest.mark.parametrize(("sig", "signals"), [(signal.SIGINT, 1), (signal.SIGINT, 2),
                                              (signal.SIGTERM, 1), (signal.SIGTERM, -1)],
                         ids=["sigint-graceful", "sigint-second-kills", "sigterm-graceful",
                              "sigterm-to-every-process"])
def test_a_signal_to_a_pipe_script_stops_it_leaving_nothing(tmp_path: Path, sig: int,
                                                            signals: int, no_leaks: None) -> None:
    script = tmp_path / "pipe_script.py"
    report = str(tmp_path / "r")
    script.write_text(PIPE_SCRIPT.format(tests=str(ROOT / "tests"), report=report))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "Running"
        wait_for_frames(proc.pid, "sink", 100)
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) >= 3
        if signals < 0:  # as systemd stops a service: every process of it at once
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        for _ in range(max(signals, 0)):
            proc.send_signal(sig)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:
        assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    else:
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and
                                              psutil.Process(p).status() != "zombie"
                                              for p in family):
        time.sleep(0.05)
    assert not [p for p in family if psutil.pid_exists(p)
                and psutil.Process(p).status() != "zombie"], "a worker outlived its pipe"
    if signals != 2:
        seen = seen_by(report, "sink")
        assert seen and seen == list(range(len(seen))), "graceful: the sink drained a prefix"


def test_workers_die_with_a_sigkilled_pipe_script(tmp_path: Path, no_leaks: None) -> None:
    script = tmp_path / "pipe_script.py"
    script.write_text(PIPE_SCRIPT.format(tests=str(ROOT / "tests"), report=str(tmp_path / "r")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "Running"
        kids = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"workers outlived a SIGKILLed pipe: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close() if proc.stdout else None


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_start_methods_and_statistics_after_the_end(tmp_path: Path, method: str,
                                                    no_leaks: None) -> None:
    report = str(tmp_path / "r")
    pipe = Pipe("fs", start_method=method)
    pipe.add(Processor("src", func=pw.count_source, config={"count": 500})).add(
        Processor("sink", func=pw.collect, config={"report": report}))
    run(run_pipe(pipe))
    assert seen_by(report, "sink") == list(range(500))
    sink = pipe.statistics().processors["sink"]
    assert {k: sink[k] for k in ("instances", "restarts", "finished", "queued", "lost_frames",
                                 "frames_in", "frames_out", "workers")} == {
        "instances": 0, "restarts": 0, "finished": True, "queued": 0, "lost_frames": 0,
        "frames_in": 500, "frames_out": 0, "workers": []}
    src = pipe.statistics().processors["src"]
    assert src["frames_out"] == 500 and src["bytes_out"] == 500 * 8
    with pytest.raises(ValueError, match="start_method"):
        Pipe("x", start_method="fork")


def test_scale_up_and_down_without_losing_a_frame(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")

    async def main() -> tuple[list[int], list[int], Pipe]:
        pipe = Pipe("scaling", autoscaler=False)  # scaled by hand here
        pipe.add(Processor("src", func=pw.endless_source)).add(
            Processor("mid", func=pw.plus_one, autoscale=3, instances=1)).add(
            Processor("sink", func=pw.collect, config={"report": report}))
        async with pipe:
            return await scale_around(pipe)

    async def scale_around(pipe: Pipe) -> tuple[list[int], list[int], Pipe]:
        await pipe.start()
        counts = []
        await pipe.scale("mid", 3, reason="test: up")
        await asyncio.sleep(1.0)
        counts.append(len(pipe._nodes["mid"].workers))
        await pipe.scale("mid", 1, reason="test: down")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(pipe._nodes["mid"].workers) == 1:
                break
        counts.append(len(pipe._nodes["mid"].workers))
        with pytest.raises(ValueError, match="1 to 3 instances"):
            await pipe.scale("mid", 4)
        with pytest.raises(ValueError, match="no processor 'nope'"):
            await pipe.scale("nope", 1)
        snap = pipe.snapshot()["processors"]["mid"]
        restarts = [pipe._nodes["mid"].restarts_used, snap["target_instances"]]
        assert snap["reason"] == "test: down"
        await pipe.terminate()
        await pipe.wait_for_completion()
        return counts, restarts, pipe

    counts, (restarts, target), pipe = run(main())
    assert counts == [3, 1] and restarts == 0 and target == 1
    seen = seen_by(report, "sink")
    assert len(seen) == len(set(seen)), "no frame twice"
    assert sorted(seen) == list(range(1, len(seen) + 1)), "no frame lost (retired workers " \
        "finished theirs)"
    assert pipe.statistics().processors["mid"]["lost_frames"] == 0


def test_async_with_kills_and_cleans_up_after_an_exception(no_leaks: None) -> None:
    async def main() -> None:
        async with Pipe("oops") as pipe:
            pipe.add(Processor("src", func=pw.endless_source)).add(
                Processor("mid", func=pw.plus_one))
            await pipe.start()
            await asyncio.sleep(0.3)
            raise RuntimeError("the caller's own bug")

    with pytest.raises(RuntimeError, match="the caller's own bug"):
        run(main())


def test_terminate_right_after_start_still_processes_what_was_emitted(tmp_path: Path,
                                                                     no_leaks: None) -> None:
    """terminate() before the root's worker has even joined: no SIGTERM kills it early; it
    learns at its join that the pipe is terminating, drains its input and ends."""
    report = str(tmp_path / "r")

    async def main() -> None:
        async with Pipe("early") as pipe:
            pipe.add(Processor("mid", func=pw.plus_one)).add(
                Processor("sink", func=pw.collect, config={"report": report}))
            await pipe.start()
            for i in range(100):
                await pipe.emit(i.to_bytes(8, "little"))
            await pipe.terminate()

    run(main())
    assert seen_by(report, "sink") == list(range(1, 101))


def test_terminate_with_a_root_that_is_also_downstream(tmp_path: Path, no_leaks: None) -> None:
    """b is a root (pipe.emit feeds it) and a's downstream: terminate() must not close its
    input while a still emits into it."""
    report = str(tmp_path / "r")

    async def main() -> None:
        async with Pipe("two-roots") as pipe:
            a = Processor("a", func=pw.plus_one)
            b = Processor("b", func=pw.collect, config={"report": report})
            pipe.add(a)
            pipe.add(b)
            a.add(b)
            await pipe.start()
            for i in range(200):
                await pipe.emit(i.to_bytes(8, "little"))
            await pipe.terminate()  # raises if a's emit into b hit a closed input

    run(main())
    seen = seen_by(report, "b")
    assert sorted(seen) == sorted(list(range(200)) + list(range(1, 201)))


def test_emit_sync_after_a_timeout_gets_its_own_reply(no_leaks: None) -> None:
    async def main() -> list[Any]:
        async with Pipe("late") as pipe:
            pipe.add(Processor("svc", func=pw.slow_doubler, config={"delay": 0.3}))
            await pipe.start()
            with pytest.raises(TimeoutError):
                await pipe.emit_sync(1, timeout=0.05)  # its reply (2) comes late
            return [await pipe.emit_sync(21, timeout=30), await pipe.emit_sync(5, timeout=30)]

    assert run(main()) == [42, 10]


def test_scale_never_runs_more_than_max_instances(no_leaks: None) -> None:
    async def main() -> list[int]:
        async with Pipe("bounded", autoscaler=False) as pipe:
            pipe.add(Processor("src", func=pw.endless_source)).add(
                Processor("mid", func=pw.plus_one, autoscale=3, config={"delay": 0.01}))
            await pipe.start()
            counts = []
            for n in (1, 3, 1, 3, 1, 3):
                await pipe.scale("mid", n)
                counts.append(len(pipe._nodes["mid"].workers))
                await asyncio.sleep(0.05)
            return counts

    assert max(run(main())) <= 3


def test_a_silent_connection_does_not_hold_the_pipe_up(no_leaks: None) -> None:
    """A same-uid process that connects to the control socket and says nothing: the pipe's
    loop goes on (it used to wait up to 5 s for the hello), and the connection is dropped."""
    import socket as socketmod

    from upipe import control

    async def main() -> tuple[float, int]:
        async with Pipe("silent", autoscaler=False) as pipe:
            pipe.add(Processor("src", func=pw.endless_source)).add(
                Processor("mid", func=pw.plus_one, restarts=2))
            await pipe.start()
            await until(lambda: any(w.joined for w in pipe._nodes["mid"].workers.values()))
            silent = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
            silent.connect(control.sockaddr(pipe._address))
            try:
                await asyncio.sleep(0.05)  # the pipe accepts it meanwhile
                (w,) = pipe._nodes["mid"].workers.values()
                os.kill(w.pid, signal.SIGKILL)
                t0 = time.monotonic()
                await until(lambda: pipe._nodes["mid"].restarts_used == 1, timeout=4.0)
                return time.monotonic() - t0, len(pipe._hellos)
            finally:
                silent.close()

    noticed, waiting = run(main())
    assert noticed < 4.0 and waiting == 1  # the silent one was still waiting, not blocking
