"""Monitoring: ``upipe status --json`` and ``upipe top`` against live pipes, the Prometheus
endpoint of ``Pipe(metrics_port=...)``, and ``wait_for_completion(progress=True)``.

Other engineers' pipes of the same user may run on this machine at the same time: every pipe
here has a name of its own and the commands are given ``--pipe NAME``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import monitor_workers as mw
import pipe_workers as pw
import psutil
import pytest

from upipe import Pipe, Processor

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
ENV = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50",
       "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def unique(what: str) -> str:
    return f"mon{os.getpid()}-{what}"


def upipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "upipe", *args]


def live_pipe(name: str, **kwargs: Any) -> Pipe:
    """src (endless, paced) -> plus (2 instances) -> sink."""
    pipe = Pipe(name, **kwargs)
    pipe.add(Processor("src", func=mw.paced_source)).add(
        Processor("plus", func=mw.relay, instances=2)).add(Processor("sink", func=mw.drain))
    return pipe


async def flowing(pipe: Pipe, timeout: float = 30.0) -> None:
    """Until frames reach the sink."""
    deadline = time.monotonic() + timeout
    while pipe.statistics().processors["sink"]["frames_in"] < 100:
        assert time.monotonic() < deadline, f"nothing reached the sink: {pipe.statistics()}"
        await asyncio.sleep(0.05)


def tcp_listeners(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body.decode()


# -- upipe status -----------------------------------------------------------------------------


def test_status_json_against_a_live_pipe(no_leaks: None) -> None:
    name = unique("status")
    listening = tcp_listeners(os.getpid())

    async def main() -> tuple[Any, ...]:
        pipe = live_pipe(name)
        await pipe.start()
        try:
            await flowing(pipe)
            assert tcp_listeners(os.getpid()) == listening, "a pipe listens on TCP unasked"
            before = pipe.statistics()
            res = await asyncio.to_thread(
                subprocess.run, upipe_cmd("status", "--json", "--pipe", name),
                capture_output=True, text=True, timeout=60, cwd=ROOT)
            after = pipe.statistics()
            text = await asyncio.to_thread(
                subprocess.run, upipe_cmd("status", "--pipe", name, "--interval", "0.2"),
                capture_output=True, text=True, timeout=60, cwd=ROOT)
        finally:
            await pipe.terminate()
        return before, res, after, text

    before, res, after, text = asyncio.run(main())
    assert res.returncode == 0, res.stderr
    pipes = json.loads(res.stdout)["pipes"]
    assert [(p["pipe"], p["pid"], p["state"]) for p in pipes] == [(name, os.getpid(), "running")]
    procs = pipes[0]["processors"]
    assert set(procs) == set(before.processors) == {"src", "plus", "sink"}
    for pname, row in procs.items():
        b, a = before.processors[pname], after.processors[pname]
        assert row["instances"] == b["instances"] == a["instances"]
        assert sorted(w["pid"] for w in row["workers"]) == sorted(w["pid"] for w in b["workers"])
        for key in ("frames_in", "frames_out", "bytes_out"):
            assert b[key] <= row[key] <= a[key], (pname, key)
        assert row["capacity"] == b["capacity"] and row["restarts"] == 0
        assert row["rss_bytes"] > 0 and row["cpu_percent"] is not None
        assert row["flag"] in ("-", "BP", "starved")
    assert procs["plus"]["instances"] == 2 and procs["plus"]["target_instances"] == 2
    # the second snapshot came half a second after the first: the counters grew
    assert procs["sink"]["frames_in"] > before.processors["sink"]["frames_in"]
    assert procs["sink"]["in_per_s"] > 0 and procs["src"]["out_per_s"] > 0
    assert procs["src"]["mb_per_s"] > 0  # 256-byte frames
    # Two counters, bumped one after the other by the worker and read by the snapshot while it
    # runs: bytes_out may be one frame behind frames_out, never more.
    assert 0 <= procs["src"]["frames_out"] - procs["src"]["bytes_out"] // 256 <= 1

    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"pipe {name}  pid {os.getpid()}  running")
    assert re.search(r"^\s+plus\s+2/2\s", text.stdout, re.M), text.stdout
    assert re.search(r"^\s+sink\s+1/1\s", text.stdout, re.M), text.stdout


def test_status_of_a_pipe_that_does_not_run() -> None:
    res = subprocess.run(upipe_cmd("status", "--json", "--pipe", unique("absent")),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1 and json.loads(res.stdout) == {"pipes": []}
    res = subprocess.run(upipe_cmd("status", "--pipe", unique("absent")),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1 and "no upipe pipes running" in res.stdout


# -- upipe top in a pseudo-terminal -------------------------------------------------------------


def open_terminal() -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    return master, slave


def read_screen(master: int, done: Callable[[str], bool], timeout: float) -> str:
    """What the terminal shows (escape sequences stripped) once ``done(text)`` holds."""
    raw = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                raw += os.read(master, 65536)
            except OSError:  # the other side is closed
                break
            if done(ANSI.sub("", raw.decode(errors="replace"))):
                return raw.decode(errors="replace")
    raise AssertionError("the screen never showed it; it showed:\n"
                         + ANSI.sub("", raw.decode(errors="replace"))[-3000:])


def drain_terminal(master: int) -> bytes:
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            part = os.read(master, 65536)
        except OSError:
            break
        if not part:
            break
        out += part
    return out


def rows_shown(name: str) -> Callable[[str], bool]:
    """Each processor's row, with a rate (not '-': the second refresh or later)."""
    rate = r"\d[\d.]*[kMG]?"

    def done(text: str) -> bool:
        return (f"pipe {name}" in text
                and re.search(rf"^\s*src\s+1/1\s+\S+\s+{rate}\s+{rate}\s", text, re.M) is not None
                and re.search(rf"^\s*plus\s+2/2\s+\S+\s+{rate}\s+{rate}\s", text, re.M)
                is not None
                and re.search(rf"^\s*sink\s+1/1\s+\S+\s+{rate}\s", text, re.M) is not None)

    return done


def run_top(args: list[str], until: Callable[[str], bool], finish: Callable[[int, Any], None],
            ) -> tuple[str, int, bytes, bool]:
    """Start ``upipe top`` in a pseudo-terminal, read its screen until ``until(screen)``, call
    ``finish(master, proc)`` (q or a signal); its screen, exit status, the last output and
    whether the terminal's modes came back as they were."""
    master, slave = open_terminal()
    modes = termios.tcgetattr(slave)
    proc = subprocess.Popen(upipe_cmd("top", *args), stdin=slave, stdout=slave, stderr=slave,
                            env=ENV, cwd=ROOT, start_new_session=True)
    try:
        screen = read_screen(master, until, 45)
        finish(master, proc)
        # Keep reading the terminal while top exits: its last redraws and the restore
        # sequences must not fill the pty's buffer (a full buffer blocks top's writes and its
        # tcsetattr(TCSADRAIN), and it would never exit).
        tail = b""
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            tail += drain_terminal(master)
        rc = proc.wait(1)
        tail += drain_terminal(master)
        restored = termios.tcgetattr(slave) == modes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    return screen, rc, tail, restored


def test_top_in_a_terminal_shows_the_rows_and_q_quits(no_leaks: None) -> None:
    name = unique("top")
    port = free_port()
    scraped: list[str] = []

    def press_q(master: int, _proc: Any) -> None:
        scraped.append(scrape(f"http://127.0.0.1:{port}/metrics"))  # top --prometheus
        os.write(master, b"q")

    async def main() -> tuple[str, int, bytes, bool]:
        pipe = live_pipe(name)
        await pipe.start()
        try:
            await flowing(pipe)
            return await asyncio.to_thread(
                run_top, ["--pipe", name, "--prometheus", str(port)], rows_shown(name), press_q)
        finally:
            await pipe.terminate()

    screen, rc, tail, restored = asyncio.run(main())
    assert rc == 0, ANSI.sub("", tail.decode(errors="replace"))
    assert "q quits" in ANSI.sub("", screen)
    assert b"\x1b[?1049l" in tail, "the alternate screen was not left"
    assert restored, "the terminal's modes were not restored"
    assert f'upipe_frames_in_total{{pipe="{name}",processor="sink",worker="0"}}' in scraped[0]


def test_top_with_no_pipe_says_so_and_ctrl_c_restores_the_terminal(no_leaks: None) -> None:
    def interrupt(_master: int, proc: Any) -> None:
        proc.send_signal(signal.SIGINT)

    screen, rc, tail, restored = run_top(
        ["--pipe", unique("absent")], lambda text: "no upipe pipes running" in text, interrupt)
    assert rc == 130
    assert b"\x1b[?1049l" in tail and restored
    assert "Traceback" not in tail.decode(errors="replace")


# -- Prometheus ---------------------------------------------------------------------------------


COUNTERS = {"upipe_frames_in", "upipe_frames_out", "upipe_bytes_out",
            "upipe_get_wait_seconds", "upipe_emit_wait_seconds", "upipe_restarts",
            "upipe_lost_frames", "upipe_worker_cpu_seconds"}
GAUGES = {"upipe_instances", "upipe_queue_depth", "upipe_queue_capacity",
          "upipe_worker_rss_bytes"}


def test_metrics_endpoint_of_a_pipe_over_loopback(no_leaks: None) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    name = unique("metrics")

    async def main() -> tuple[Any, ...]:
        pipe = live_pipe(name, metrics_port=0)
        await pipe.start()
        try:
            port = pipe.metrics_port
            assert port
            listening = tcp_listeners(os.getpid())
            await flowing(pipe)
            body = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
            stats = pipe.statistics()
        finally:
            await pipe.terminate()
        return port, listening, body, stats

    port, listening, body, stats = asyncio.run(main())
    assert ("127.0.0.1", port) in listening and not any(p == port and ip != "127.0.0.1"
                                                        for ip, p in listening)
    assert not any(p == port for _, p in tcp_listeners(os.getpid())), "still listening"
    with pytest.raises(OSError):
        scrape(f"http://127.0.0.1:{port}/metrics")

    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert COUNTERS | GAUGES <= set(families), sorted(families)
    for fname in COUNTERS:
        assert families[fname].type == "counter"
        assert all(s.name == fname + "_total" for s in families[fname].samples), fname
    for fname in GAUGES - {"upipe_worker_rss_bytes"}:
        assert families[fname].type == "gauge"
    assert all(n.startswith("upipe_") for n in families)

    def samples(fname: str) -> dict[tuple[str, ...], float]:
        return {tuple(s.labels[k] for k in sorted(s.labels)): s.value
                for s in families[fname].samples}

    frames_in = samples("upipe_frames_in")  # keys: (pipe, processor, worker)
    assert {k[0] for k in frames_in} == {name}
    assert {k[1] for k in frames_in} == {"src", "plus", "sink"}
    assert {k[2] for k in frames_in if k[1] == "plus"} == {"0", "1"}
    sink_in = sum(v for k, v in frames_in.items() if k[1] == "sink")
    assert 0 < sink_in <= stats.processors["sink"]["frames_in"]
    assert samples("upipe_instances") == {(name, "plus"): 2.0, (name, "sink"): 1.0,
                                          (name, "src"): 1.0}
    assert samples("upipe_queue_capacity")[(name, "plus")] == stats.processors["plus"]["capacity"]
    assert set(samples("upipe_worker_rss_bytes")) == {(name, p, str(w["instance"]))
                                                      for p, e in stats.processors.items()
                                                      for w in e["workers"]}
    for labels in (s.labels for f in families.values() for s in f.samples):
        assert set(labels) in ({"pipe"}, {"pipe", "processor"},
                               {"pipe", "processor", "worker"}), labels


def test_missing_monitor_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str],
                                                 no_leaks: None) -> None:
    from upipe import cli, view

    monkeypatch.setitem(sys.modules, "rich.console", None)
    assert cli.main(["top"]) == 1
    assert 'pip install "upipe[monitor]"' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    pipe = Pipe(unique("noprom"), metrics_port=0)
    pipe.add(Processor("sink", func=mw.drain))
    with pytest.raises(view.MonitorDependencyError, match=r'pip install "upipe\[monitor\]"'):
        asyncio.run(pipe.start())


def test_import_upipe_needs_neither_rich_nor_prometheus_client() -> None:
    code = ("import sys; sys.modules['rich'] = sys.modules['prometheus_client'] = None\n"
            "import upipe, upipe.cli, upipe.view, upipe.metrics, upipe.monitor\n"
            "print(upipe.cli.main(['status', '--pipe', 'no-such-pipe-here']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "1"


# -- wait_for_completion(progress=True) -----------------------------------------------------------


def test_progress_lines_when_stderr_is_not_a_terminal(capfd: pytest.CaptureFixture[str],
                                                      no_leaks: None) -> None:
    name = unique("progress")
    pipe = Pipe(name)
    pipe.add(Processor("src", func=pw.count_source, config={"count": 3000})).add(
        Processor("sink", func=mw.drain))

    async def main() -> None:
        await pipe.start()
        await pipe.wait_for_completion(progress=True)

    asyncio.run(main())
    err = capfd.readouterr().err
    assert re.search(rf"^{name}: src\s+in\s+0\s+out\s+3,000\b.*done$", err, re.M), err
    assert re.search(rf"^{name}: sink\s+in\s+3,000\s+out\s+0\b.*done$", err, re.M), err
    assert "\x1b[" not in err


PROGRESS_SCRIPT = textwrap.dedent("""
    import asyncio
    import monitor_workers as mw
    import pipe_workers as pw
    from upipe import Pipe, Processor

    async def main():
        pipe = Pipe({name!r})
        pipe.add(Processor("src", func=pw.count_source,
                           config={{"count": 2000, "delay": 0.0005}})).add(
            Processor("plus", func=pw.plus_one)).add(Processor("sink", func=mw.drain))
        await pipe.start()
        await pipe.wait_for_completion(progress=True)

    if __name__ == "__main__":
        asyncio.run(main())
""")


def test_progress_lines_redrawn_on_a_terminal(tmp_path: Path, no_leaks: None) -> None:
    name = unique("ttyprogress")
    script = tmp_path / "progress_script.py"
    script.write_text(PROGRESS_SCRIPT.format(name=name))
    master, slave = open_terminal()
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=ENV, cwd=ROOT)
    try:
        out = b""
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            out += drain_terminal(master)
        assert proc.wait(30) == 0
        out += drain_terminal(master)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    text = out.decode(errors="replace")
    assert text.count("\x1b[3F") >= 2, "the three lines were not redrawn in place"
    final = ANSI.sub("", text.rsplit("\x1b[3F", 1)[-1]).splitlines()
    assert [line.split()[:2] for line in final if line.strip()] == [
        [f"{name}:", "src"], [f"{name}:", "plus"], [f"{name}:", "sink"]], final
    assert re.search(r"sink\s+in\s+2,000\s", final[-1]) and final[-1].endswith("done"), final
