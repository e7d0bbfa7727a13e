"""Pipe: the pipeline. It wires processors together, starts their workers and supervises them.

``start()`` checks the topology, creates one shared-memory input queue per processor (and one
output queue for what the sinks emit), opens the control socket and starts every instance.
Then it supervises: a worker's exit is seen at once (a pidfd in the event loop). An exit with
status 0 is an instance that finished; when every instance of a processor has finished, the
input of each downstream processor whose upstreams have all finished is closed, so those
drain and finish in turn: that is how the end of the stream travels down the pipe. A worker
that raised fails the pipe with its traceback; a worker that died (killed, crashed) has the
queues repaired and is restarted, up to its processor's ``restarts``.

Nothing outlives the pipe: workers get a parent-death signal and watch the control socket,
and the pipe kills and reaps whatever is left when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import control, stats, worker
from .autoscale import Autoscaler, Knobs
from .errors import Closed, Empty, UpipeError
from .processor import RETIRE, Processor, ProcessorError, _check_main_guard
from .queue import Queue, fan_out_async, ring_group, share

if TYPE_CHECKING:
    import psutil  # imported by snapshot(): spawned workers import the pipe script, not psutil

__all__ = ["Pipe", "PipeStatistics"]

log = logging.getLogger("upipe.pipe")

DEFAULT_OUTPUT_SIZE = 256
_COUNTERS = ("frames_in", "frames_out", "bytes_out", "get_wait_ns", "emit_wait_ns")
TERMINATE_TIMEOUT = 30.0  # seconds terminate() lets in-flight frames finish before it kills
HANDSHAKE_TIMEOUT = 5.0  # seconds a connection has to say who it is
MAX_HELLO = 64 << 10  # bytes: a hello is a few dozen


@dataclass(eq=False)
class _Hello:
    """A connection that has not said who it is yet."""

    conn: socket.socket
    pid: int
    buf: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Worker:
    node: _Node
    instance: int
    handle: Any  # subprocess.Popen or multiprocessing.Process
    pid: int
    pidfd: int = -1
    conn: socket.socket | None = None
    inbox: bytearray = field(default_factory=bytearray)
    error: str | None = None
    joined: bool = False
    signalled: bool = False  # we sent it SIGTERM (terminate) or SIGKILL (kill)
    retired: bool = False  # it took a Retire from its input (scaled down) and is leaving
    row: int = -1  # its row in the stats block


@dataclass
class _Node:
    proc: Processor
    is_root: bool
    index: int = 0
    upstream: list[_Node] = field(default_factory=list)
    downstream: list[_Node] = field(default_factory=list)
    input: Queue | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)  # running, by instance
    restarts_used: int = 0
    finished: bool = False
    retired: dict[str, int] = field(default_factory=dict)  # counters of workers that exited
    target: int = 0  # instances wanted (scale() / the autoscaler)
    retiring: int = 0  # Retire requests sent and not yet answered by an exit
    reason: str = ""  # why the target is what it is (the last scaling decision)

    @property
    def name(self) -> str:
        return self.proc.name


@dataclass(frozen=True)
class PipeStatistics:
    """Per-processor counts: what the pipe knows about its workers and queues."""

    processors: dict[str, dict[str, Any]]
    discarded_outputs: int


class Pipe:
    """A pipeline of processors.

    ::

        pipe = Pipe('plus-one')
        pipe.add(a).add(b)
        await pipe.start()
        await pipe.wait_for_completion()

    :param name: shown in errors and in the monitor.
    :param start_method: ``"forkserver"`` (default) or ``"spawn"``: how ``func=`` workers
        start (``entry=`` scripts always start as a fresh ``python script``). The fork server
        (one per pipe script, with upipe preloaded) forks each worker from a clean process: a
        worker is up in a few ms instead of an interpreter start and upipe's imports (about
        0.25 s to the first frame of a cold 3-stage pipe, against about 0.45 s with spawn).
    :param output_size: the capacity of the queue that collects what sinks emit.
    :param metrics_port: serve Prometheus metrics of this pipe at
        ``http://metrics_host:metrics_port/metrics`` while it runs (0 picks a free port, then
        ``pipe.metrics_port`` is the one in use after ``start()``); None (default): no server.
        Needs ``pip install "upipe[monitor]"``. See docs/monitoring.md.
    :param metrics_host: the address the metrics server listens on (loopback by default).
    :param autoscaler: run the autoscaler (:mod:`upipe.autoscale`) for processors declared with
        ``autoscale=N`` / ``max_instances``: True (default), False, or a
        :class:`upipe.autoscale.Knobs` to tune it. Processors with a fixed count are left alone.
    """

    def __init__(self, name: str, *, start_method: str = "forkserver",
                 output_size: int = DEFAULT_OUTPUT_SIZE, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", autoscaler: bool | Knobs = True) -> None:
        if not isinstance(name, str) or not name or "\0" in name or "/" in name:
            raise ValueError(f"a pipe's name must be a non-empty string without '/', got {name!r}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError("start_method must be 'spawn' or 'forkserver' (a bare fork would "
                             f"copy a running event loop), got {start_method!r}")
        if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
            raise ValueError(f"output_size must be an int >= 1, got {output_size!r}")
        self.name = name
        self.start_method = start_method
        self.output_size = output_size
        self._roots: list[Processor | str] = []
        self._nodes: dict[str, _Node] = {}
        self._state = "new"
        self._output: Queue | None = None
        self._listener: socket.socket | None = None
        self._address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._terminating = False
        self._signal: int | None = None
        self._signals_installed: list[int] = []
        self._by_pid: dict[int, _Worker] = {}
        self._drain_task: asyncio.Task[None] | None = None
        self._pending_reply: asyncio.Future[Any] | None = None
        self._request_lock: asyncio.Lock | None = None
        self._discarded = 0
        self._stale_replies = 0  # replies still due to emit_sync calls that gave up
        self._hellos: set[_Hello] = set()  # connections that have not said who they are
        self._final: PipeStatistics | None = None  # the last statistics, kept after the end
        self._stats: stats.StatsBlock | None = None
        self._psutil: dict[int, psutil.Process] = {}  # one per worker pid (CPU times are deltas)
        self._started_ns = 0
        self._errors: list[str] = []
        self.autoscaler_knobs: Knobs | None = (
            autoscaler if isinstance(autoscaler, Knobs) else Knobs() if autoscaler else None)
        self._autoscaler: Autoscaler | None = None
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._metrics: Any = None  # upipe.metrics.MetricsServer while the pipe runs

    def __repr__(self) -> str:
        return f"<upipe.Pipe {self.name!r} {self._state} processors={list(self._nodes) or '?'}>"

    async def __aenter__(self) -> Pipe:
        return self

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        """Leave nothing running: after an exception every worker is killed at once; else
        the pipe is terminated (sources stopped, frames in flight finished)."""
        if self._state != "running":
            return
        if exc is not None:
            self._kill_all()
            self._complete(None)
            await self._finish()
        else:
            await self.terminate()

    # -- topology -----------------------------------------------------------------------------

    def add(self, proc: Processor | str) -> Processor | str:
        """Add a root processor (it receives what ``pipe.emit`` injects); returns it, so
        ``pipe.add(a).add(b)`` chains."""
        if self._state != "new":
            raise UpipeError(f"pipe {self.name!r} has started: its topology is fixed")
        if not isinstance(proc, (Processor, str)):
            raise TypeError(f"add() takes a Processor or a processor's name, got {proc!r}")
        self._roots.append(proc)
        return proc

    def _build(self) -> None:
        """Resolve names, refuse duplicates, unknown names, missing code and cycles."""
        objects: dict[str, Processor] = {}
        order: list[Processor] = []
        stack = [p for p in self._roots if isinstance(p, Processor)]
        seen: set[int] = set()
        while stack:
            p = stack.pop()
            if id(p) in seen:
                continue
            seen.add(id(p))
            other = objects.get(p.name)
            if other is not None and other is not p:
                raise ValueError(f"pipe {self.name!r}: two different processors are named "
                                 f"{p.name!r}; names must be unique within a pipe")
            objects[p.name] = p
            order.append(p)
            stack.extend(d for d in p.downstream if isinstance(d, Processor))
        if not objects:
            raise ValueError(f"pipe {self.name!r} has no processors: pipe.add(processor) first")

        def resolve(ref: Processor | str, who: str) -> Processor:
            if isinstance(ref, Processor):
                return ref
            if ref not in objects:
                raise ValueError(f"pipe {self.name!r}: {who} names an unknown processor {ref!r} "
                                 f"(the pipe has: {', '.join(sorted(objects))})")
            return objects[ref]

        roots = {resolve(r, "pipe.add()").name for r in self._roots}
        nodes = {p.name: _Node(p, p.name in roots, i) for i, p in enumerate(order)}
        for p in order:
            if p.func is None and p.entry is None:
                raise ValueError(
                    f"processor {p.name!r} has neither func= nor entry=: in the pipe script "
                    f"declare it with the code to run, e.g. Processor({p.name!r}, "
                    f"entry='./{p.name}.py') or Processor({p.name!r}, func=module_function)")
            if p.func is not None:
                _check_main_guard(p.name, require_file=False)
            try:
                pickle.dumps(p.config, protocol=5)
            except Exception as exc:
                raise TypeError(f"processor {p.name!r}: its config cannot be sent to its workers "
                                f"({exc}); use picklable values (dicts, lists, numbers, strings, "
                                "arrays)") from exc
            if p.entry is not None and not Path(p.entry).is_file():
                raise FileNotFoundError(
                    f"processor {p.name!r}: entry script {p.entry!r} not found (relative paths "
                    f"are from the current directory, {os.getcwd()})")
            for ref in p.downstream:
                d = nodes[resolve(ref, f"processor {p.name!r}").name]
                if d in nodes[p.name].downstream:
                    raise ValueError(f"pipe {self.name!r}: {p.name!r} is added to {d.name!r} twice")
                nodes[p.name].downstream.append(d)
                d.upstream.append(nodes[p.name])
        # cycles: depth-first, white/grey/black
        colour: dict[str, int] = {}

        def visit(n: _Node, path: list[str]) -> None:
            colour[n.name] = 1
            for d in n.downstream:
                if colour.get(d.name) == 1:
                    cycle = path[path.index(d.name):] + [d.name]
                    raise ValueError(f"pipe {self.name!r} has a cycle: {' -> '.join(cycle)}; "
                                     "frames must flow one way")
                if not colour.get(d.name):
                    visit(d, path + [d.name])
            colour[n.name] = 2

        for n in nodes.values():
            if not colour.get(n.name):
                visit(n, [n.name])
        self._nodes = nodes

    # -- starting -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the topology, create the queues and start every processor's instances."""
        if self._state != "new":
            raise UpipeError(f"pipe {self.name!r} was already started")
        self._build()
        self._loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._request_lock = asyncio.Lock()
        self._state = "running"
        self._started_ns = time.monotonic_ns()
        try:
            # a row per worker that may run at once, plus room for replacements (rows of
            # exited workers are reused)
            self._stats = stats.StatsBlock.create(
                sum(n.proc.max_instances for n in self._nodes.values()) + 16)
            self._open_control()
            self._install_signal_handlers()
            # Workers first: they take a few hundred ms to boot (an interpreter, imports), and
            # reserving the queues' memory meanwhile costs them nothing. They join through the
            # control socket, whose connections wait in its backlog until the queues exist.
            for node in self._nodes.values():
                node.target = node.proc.instances
                node.reason = "initial"
                for i in range(node.proc.instances):
                    self._spawn(node, i)
            self._create_queues()
            assert self._listener is not None
            loop.add_reader(self._listener.fileno(), self._accept)
            if self.metrics_port is not None:
                from . import metrics

                self._metrics = metrics.serve_pipe(self, self.metrics_port, self.metrics_host)
                self.metrics_port = self._metrics.port
            if self.autoscaler_knobs is not None and any(
                    n.proc.autoscaled for n in self._nodes.values()):
                self._autoscaler = Autoscaler(self, self.autoscaler_knobs)
                self._autoscaler.start()
        except BaseException:
            self._shutdown()
            raise
        self._drain_task = loop.create_task(self._drain_outputs())

    def _create_queues(self) -> None:
        """The processors' inputs and the pipe's output. Inputs that receive the same frames
        (the downstreams of one processor, or the roots, which pipe.emit feeds together) are
        rings of one segment where that is safe (see _fan_out_groups), so a fanned-out frame is
        one chunk for all of them."""
        for members in self._fan_out_groups():
            opts = [m.proc.queue_options for m in members]
            queues = [Queue(**opts[0])] if len(members) == 1 else ring_group(opts)
            for m, q in zip(members, queues, strict=True):
                m.input = q
        self._output = Queue(maxsize=self.output_size)

    def _fan_out_groups(self) -> list[list[_Node]]:
        """Processors whose inputs share a segment: those fed by a common upstream (or all
        roots), chained through shared upstreams, then split so that no member is downstream of
        another. A segment has one chunk pool: if a member's own output (or anything after it)
        drew on the pool that the frames waiting for that member fill up, the pipe could
        deadlock (the member waits for a chunk that only its own progress would free). With no
        member downstream of another, nothing a member waits on needs the group's pool."""
        nodes = list(self._nodes.values())
        parent: dict[str, str] = {n.name: n.name for n in nodes}  # union-find by name

        def find(x: str) -> str:
            while parent[x] != x:
                x = parent[x]
            return x

        def union(members: list[_Node]) -> None:
            for m in members[1:]:
                parent[find(m.name)] = find(members[0].name)

        union([n for n in nodes if n.is_root])
        for n in nodes:
            union(n.downstream)
        after: dict[str, set[str]] = {}  # every processor downstream of each one

        def below(n: _Node) -> set[str]:
            if n.name not in after:
                after[n.name] = set()  # the graph is a DAG (checked in _build)
                for d in n.downstream:
                    after[n.name] |= {d.name} | below(d)
            return after[n.name]

        candidates: dict[str, list[_Node]] = {}
        for n in nodes:
            candidates.setdefault(find(n.name), []).append(n)
        groups: list[list[_Node]] = []
        for members in candidates.values():
            split: list[list[_Node]] = []  # antichains, first fit
            for m in members:
                for g in split:
                    if all(m.name not in below(o) and o.name not in below(m) for o in g):
                        g.append(m)
                        break
                else:
                    split.append([m])
            groups += split
        return groups

    def _open_control(self) -> None:
        assert self._loop is not None
        self._address = control.new_address(self.name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(control.sockaddr(self._address))
        sock.listen(256)
        sock.setblocking(False)
        self._listener = sock  # accepting starts once the queues exist (start())

    def _spawn(self, node: _Node, instance: int) -> None:
        assert self._loop is not None
        env = {
            control.ENV_ADDRESS: self._address,
            control.ENV_PROCESSOR: node.name,
            control.ENV_INSTANCE: str(instance),
            "UPIPE_PIPE_PID": str(os.getpid()),
        }
        assert self._stats is not None
        row = self._stats.claim(0, node.index, instance, time.monotonic_ns())  # may raise: first
        # A Ctrl-C in the terminal must not kill a worker before it ignores SIGINT (it is the
        # pipe's to handle): the child starts with SIGINT blocked and unblocks it once ignored.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            handle = self._start_worker(node, instance, env)
        except BaseException:
            self._stats.release(row)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        pid = handle.pid
        self._stats.set_pid(row, pid)
        w = _Worker(node, instance, handle, pid)
        w.row = row
        node.workers[instance] = w
        self._by_pid[pid] = w
        w.pidfd = os.pidfd_open(pid)  # our child (or the fork server's): not reaped before this
        self._loop.add_reader(w.pidfd, self._on_exit, w)

    def _start_worker(self, node: _Node, instance: int, env: dict[str, str]) -> Any:
        proc = node.proc
        if proc.entry is not None:
            return subprocess.Popen(
                [sys.executable, proc.entry], env={**os.environ, **env}, process_group=0,
                close_fds=True,
            )
        else:
            ctx: Any = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                # Takes effect when this process's fork server starts: its workers then fork
                # with upipe already imported (and numpy if this script imported it; upipe
                # does not), a fraction of a cold start.
                ctx.set_forkserver_preload(["upipe.pipe", "upipe._forkserver"]
                                           + (["numpy"] if "numpy" in sys.modules else []))
            handle = ctx.Process(
                target=worker.run_worker, args=(proc.func, node.name, env),
                name=f"upipe:{self.name}:{node.name}:{instance}",
            )
            handle.start()
            # The pipe reaps its workers itself; multiprocessing's exit hook must not wait for
            # them (it would wait forever for workers that only die when this process does).
            multiprocessing.process._children.discard(handle)  # type: ignore[attr-defined]
            return handle

    # -- control plane ------------------------------------------------------------------------

    def _accept(self) -> None:
        """A connection: a worker joining, or a monitor asking for a snapshot. Its first
        message is read without blocking the loop (a reader, a size cap and one deadline), so
        a silent or slow peer cannot hold supervision up."""
        assert self._listener is not None and self._loop is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid, uid, _gid = (int.from_bytes(creds[i:i + 4], sys.byteorder, signed=True)
                              for i in (0, 4, 8))
            if uid != os.getuid():  # an abstract socket has no permissions: check the peer
                conn.close()
                return
            conn.setblocking(False)
        except OSError:
            conn.close()
            return
        hello = _Hello(conn, pid)
        hello.timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._drop_hello, hello)
        self._hellos.add(hello)
        self._loop.add_reader(conn.fileno(), self._on_hello, hello)

    def _drop_hello(self, hello: _Hello) -> None:
        assert self._loop is not None
        if hello in self._hellos:
            self._hellos.discard(hello)
            self._loop.remove_reader(hello.conn.fileno())
            if hello.timer is not None:
                hello.timer.cancel()
            hello.conn.close()

    def _on_hello(self, hello: _Hello) -> None:
        conn = hello.conn
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_hello(hello)
            return
        hello.buf += data
        if len(hello.buf) < 4:
            return
        n = int.from_bytes(hello.buf[:4], "little")
        if n > MAX_HELLO:
            log.warning("pipe %s: refused a %d-byte hello from pid %d", self.name, n, hello.pid)
            self._drop_hello(hello)
            return
        if len(hello.buf) < 4 + n:
            return
        payload = bytes(hello.buf[4:4 + n])
        assert self._loop is not None
        self._hellos.discard(hello)
        self._loop.remove_reader(conn.fileno())
        if hello.timer is not None:
            hello.timer.cancel()
        try:
            msg = pickle.loads(payload)  # a same-uid peer (checked); JSON would be safer still
            conn.settimeout(HANDSHAKE_TIMEOUT)  # the reply: a small local write
            self._answer_hello(conn, hello.pid, msg)
        except Exception as exc:  # noqa: BLE001 - a bad peer must not take the supervisor down
            log.warning("pipe %s: a join failed: %s", self.name, exc)
            conn.close()

    def _answer_hello(self, conn: socket.socket, pid: int, hello: Any) -> None:
        assert self._loop is not None
        if isinstance(hello, dict) and hello.get("request") == "snapshot":
            control.send_msg(conn, self.snapshot())  # a monitor (upipe status / top)
            conn.close()
            return
        w = self._by_pid.get(pid)
        name = hello.get("processor") if isinstance(hello, dict) else None
        if w is None or w.joined or name != w.node.name:
            why = (f"process {pid} was not started by pipe {self.name!r}" if w is None
                   else f"processor {w.node.name!r}'s worker already joined" if w.joined
                   else f"this process was started as processor {w.node.name!r}, not "
                        f"{name!r}")
            control.send_msg(conn, control.JoinReply(self.name, str(name), -1, None, None,
                                                     error=f"join refused: {why}"))
            conn.close()
            return
        self._send_join_reply(conn, w)
        conn.setblocking(False)
        w.conn = conn
        w.joined = True
        if self._stats is not None:
            self._stats.set_state(w.row, stats.RUNNING)
        self._loop.add_reader(conn.fileno(), self._on_control, w)

    def _send_join_reply(self, conn: socket.socket, w: _Worker) -> None:
        node = w.node
        assert node.input is not None and self._output is not None
        outputs = [d.input for d in node.downstream if d.input is not None] or [self._output]
        fds: list[int] = []
        shapes = []
        segment_fds: list[int] = []
        queue_segments: list[int] = []
        seen: dict[int, int] = {}  # id(segment) -> its index in this reply
        for q in [node.input, *outputs]:
            qfds, shape = share(q)
            shapes.append(shape)
            k = seen.setdefault(id(q._seg), len(segment_fds))
            if k == len(segment_fds):  # a segment not sent yet: its fds go once
                fds.extend(qfds)
                segment_fds.append(len(qfds))
            queue_segments.append(k)
        assert self._stats is not None
        fds.append(self._stats.fd)
        reply = control.JoinReply(self.name, node.name, w.instance, node.proc.config,
                                  shapes[0], shapes[1:], stats_rows=self._stats.rows,
                                  stats_row=w.row,
                                  terminating=self._terminating and node.is_root,
                                  is_root=node.is_root, segment_fds=segment_fds,
                                  queue_segments=queue_segments)
        control.send_msg(conn, reply, fds)

    def _on_control(self, w: _Worker) -> None:
        """Messages from a worker: error reports. EOF: the worker is going."""
        conn = w.conn
        if conn is None:
            return
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    self._close_conn(w)
                    break
                w.inbox += data
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close_conn(w)
        while len(w.inbox) >= 4:
            n = int.from_bytes(w.inbox[:4], "little")
            if len(w.inbox) < 4 + n:
                break
            payload = bytes(w.inbox[4:4 + n])
            del w.inbox[:4 + n]
            try:
                msg = pickle.loads(payload)
            except Exception:  # noqa: BLE001 - a garbled message must not kill the supervisor
                continue
            if isinstance(msg, dict) and isinstance(msg.get("error"), str) and w.error is None:
                w.error = msg["error"]
            elif isinstance(msg, dict) and msg.get("retired"):
                w.retired = True

    def _close_conn(self, w: _Worker) -> None:
        if w.conn is not None:
            assert self._loop is not None
            self._loop.remove_reader(w.conn.fileno())
            w.conn.close()
            w.conn = None

    # -- supervision --------------------------------------------------------------------------

    def _on_exit(self, w: _Worker) -> None:
        assert self._loop is not None
        self._loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        w.pidfd = -1
        if isinstance(w.handle, subprocess.Popen):
            rc = w.handle.wait()
        else:
            w.handle.join()
            rc = w.handle.exitcode
        self._on_control(w)  # an error report sent just before the exit
        self._close_conn(w)
        node = w.node
        node.workers.pop(w.instance, None)
        self._by_pid.pop(w.pid, None)
        if self._stats is not None:
            row = self._stats.read(w.row, time.monotonic_ns())  # a wait cut short counts too
            for key in _COUNTERS:
                node.retired[key] = node.retired.get(key, 0) + row[key]
            self._stats.set_state(w.row, stats.EXITED)
        if self._state != "running" or self._done is None or self._done.done():
            return  # failed, killed or finished: nothing to restart or to pass on
        if w.error is not None:
            self._fail(ProcessorError(
                f"processor {node.name!r} (instance {w.instance}, pid {w.pid}) raised an "
                "exception", node.name, w.pid, w.error, rc))
            return
        if w.retired and rc != 0:  # killed after it took its retire request: not restarted
            self._repair()
        if w.retired:
            node.retiring = max(0, node.retiring - 1)
            log.info("pipe %s: processor %r instance %d (pid %d) retired", self.name, node.name,
                     w.instance, w.pid)
            if not node.workers:
                self._maybe_finished(node)
            return
        if rc == 0 or (w.signalled and self._terminating):
            self._maybe_finished(node)
            return
        self._repair()
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        if not w.joined and rc > 0:
            # It never reached join(): a script error before it (its traceback is on stderr),
            # which a restart would only repeat.
            self._fail(ProcessorError(
                f"processor {node.name!r} (instance {w.instance}, pid {w.pid}) {how} before "
                "joining the pipe (see its error output above)", node.name, w.pid, None, rc))
            return
        if self._terminating and node.is_root:
            self._maybe_finished(node)
            return
        if rc > 0:  # it chose to exit with an error (sys.exit(2), os._exit): a restart would too
            self._fail(ProcessorError(
                f"processor {node.name!r} (instance {w.instance}, pid {w.pid}) {how}",
                node.name, w.pid, None, rc))
            return
        if node.restarts_used < node.proc.restarts:
            node.restarts_used += 1
            log.warning("pipe %s: processor %r instance %d (pid %d) %s; restarting it (%d of %d)",
                        self.name, node.name, w.instance, w.pid, how, node.restarts_used,
                        node.proc.restarts)
            self._errors.append(f"{node.name}[{w.instance}] pid {w.pid} {how}: restarted")
            try:
                self._spawn(node, w.instance)
            except Exception as exc:  # noqa: BLE001 - no fork, no fds, stats table full
                self._fail(ProcessorError(f"processor {node.name!r}: cannot restart a worker: "
                                          f"{exc}", node.name, w.pid, None, rc))
            return
        self._fail(ProcessorError(
            f"processor {node.name!r} (instance {w.instance}, pid {w.pid}) {how}, and its "
            f"restart limit ({node.proc.restarts}) is used up", node.name, w.pid, None, rc))

    def _repair(self) -> None:
        """A worker died: hand back what it held and count what it had taken unfinished."""
        seen: set[int] = set()
        for q in self._queues():
            if id(q._seg) in seen:
                continue  # another ring of a segment recovered already
            seen.add(id(q._seg))
            with contextlib.suppress(UpipeError):
                q.recover()

    def _queues(self) -> list[Queue]:
        qs = [n.input for n in self._nodes.values() if n.input is not None]
        return qs + ([self._output] if self._output is not None else [])

    def _maybe_finished(self, node: _Node) -> None:
        if node.workers or node.finished:
            return
        node.finished = True
        for d in node.downstream:
            if all(u.finished for u in d.upstream) and (not d.is_root or self._terminating):
                self._close_input(d)
        if not node.downstream and self._output is not None and all(
                n.finished for n in self._nodes.values() if not n.downstream):
            with contextlib.suppress(UpipeError):
                self._output.close()
        if all(n.finished for n in self._nodes.values()):
            self._complete(None)

    def _close_input(self, node: _Node) -> None:
        if node.input is not None:
            with contextlib.suppress(UpipeError):
                node.input.close()

    def _fail(self, exc: BaseException) -> None:
        self._errors.append(str(exc).split("\n", 1)[0])
        if self._error is None:
            self._error = exc
        self._kill_all()
        self._complete(exc)

    def _complete(self, exc: BaseException | None) -> None:
        fut = self._pending_reply
        if fut is not None and not fut.done():
            fut.set_exception(exc or UpipeError(f"pipe {self.name!r} ended before a reply"))
        if self._done is not None and not self._done.done():
            if exc is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(exc)
                self._done.exception()  # retrieved: wait_for_completion re-raises it

    def _kill_all(self) -> None:
        for node in self._nodes.values():
            for w in node.workers.values():
                w.signalled = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)

    # -- scaling ------------------------------------------------------------------------------

    def processor_bounds(self) -> dict[str, tuple[int, int]]:
        """(min_instances, max_instances) of every processor."""
        return {n: (node.proc.min_instances, node.proc.max_instances)
                for n, node in self._nodes.items()}

    def topology(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(upstream names, downstream names) of every processor."""
        return ({n: [u.name for u in node.upstream] for n, node in self._nodes.items()},
                {n: [d.name for d in node.downstream] for n, node in self._nodes.items()})

    def targets(self) -> dict[str, int]:
        """The instance count each processor is being brought to."""
        return {n: node.target for n, node in self._nodes.items()}

    def scalable(self, processor: str) -> bool:
        """Whether scale() may change this processor now (running, not terminating, not done)."""
        node = self._nodes[processor]
        return (self._state == "running" and not self._terminating and self._done is not None
                and not self._done.done() and not node.finished)

    def input_closed(self, processor: str) -> bool:
        """No more frames will reach this processor's input."""
        node = self._nodes[processor]
        return node.finished or node.input is None or node.input.closed

    async def scale(self, processor: str | Processor, instances: int,
                    reason: str | None = "by hand") -> None:
        """Run ``instances`` workers of a processor (by name, or the Processor itself) from
        now on (between its ``min_instances`` and ``max_instances``). Up: new workers start at
        once. Down: the pipe puts a retire request in the processor's input for each worker too
        many; the worker that takes one has no frame in hand, finishes and exits (a busy worker
        is never killed)."""
        if self._state != "running" or self._done is None or self._done.done():
            raise UpipeError(f"pipe {self.name!r} is not running (it is {self._state})")
        if isinstance(processor, Processor):
            processor = processor.name
        node = self._nodes.get(processor)
        if node is None:
            raise ValueError(f"pipe {self.name!r} has no processor {processor!r} "
                             f"(it has: {', '.join(self._nodes)})")
        low, top = node.proc.min_instances, node.proc.max_instances
        if isinstance(instances, bool) or not isinstance(instances, int) \
                or not low <= instances <= top:
            raise ValueError(f"processor {processor!r} can run {low} to {top} instances "
                             f"(min_instances..autoscale), not {instances!r}")
        node.target = instances
        if reason is not None:  # None: keep the reason of the last change
            node.reason = reason
        running = len(node.workers) - node.retiring
        # Workers whose retire request waits behind queued frames are still running: never
        # more than max_instances processes at once.
        room = top - len(node.workers)
        if instances > running and room > 0:
            log.info("pipe %s: %r %d -> %d instances (%s)", self.name, processor, running,
                     instances, node.reason)
            for _ in range(min(instances - running, room)):
                free = next(i for i in range(len(node.workers) + 1) if i not in node.workers)
                self._spawn(node, free)
        elif instances < running and node.input is not None and not node.finished:
            log.info("pipe %s: %r %d -> %d instances (%s)", self.name, processor, running,
                     instances, node.reason)
            for _ in range(running - instances):
                node.retiring += 1
                try:
                    await node.input.put_async(RETIRE)
                except Closed:  # its input ended meanwhile: every worker is leaving anyway
                    node.retiring -= 1
                    break

    # -- completion and termination -----------------------------------------------------------

    async def wait_for_completion(self, progress: bool = False) -> None:
        """Return when every source has finished and every frame is drained.

        :param progress: meanwhile, show a line per processor on stderr (frames in and out,
            rate, input queue fill), drawn by this process: redrawn in place 4 times a second
            when stderr is a terminal, else written every 5 s and once at the end.
        :raises ProcessorError: the first failure: a processor raised (with its remote
            traceback, processor name and pid) or died more often than its ``restarts``.
        :raises KeyboardInterrupt: the pipe was stopped by Ctrl-C (SIGINT), after it drained
            (first Ctrl-C) or at once (second); ``SystemExit`` likewise for SIGTERM.
        """
        if self._state == "new":
            raise UpipeError(f"pipe {self.name!r} has not started: await pipe.start() first")
        assert self._done is not None
        drawer = None
        if progress and not self._done.done():
            from . import view

            drawer = asyncio.get_running_loop().create_task(
                view.draw_progress(self.name, self.statistics))
        try:
            await asyncio.shield(self._done)
        finally:
            if drawer is not None:
                drawer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drawer
            if self._done.done():
                await self._finish()
        self._raise_for_signal()

    def _raise_for_signal(self) -> None:
        if self._signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self._signal == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)

    async def terminate(self, timeout: float = TERMINATE_TIMEOUT) -> None:
        """Stop the sources, let the frames in flight finish, and return.

        Root processors' inputs are closed and their workers asked to stop (a generator stops
        before its next emit; a reader finishes what its input still holds); downstream
        processors then drain and finish as usual. After ``timeout`` seconds whatever is still
        running is killed.
        """
        if self._state == "new" or self._done is None:
            return
        if not self._done.done():
            self._terminating = True
            for node in self._nodes.values():
                # A root that is also downstream of others ends when they do (_maybe_finished):
                # its input stays open while they may still emit into it.
                if node.is_root and all(u.finished for u in node.upstream):
                    self._close_input(node)
                    for w in list(node.workers.values()):
                        w.signalled = True
                        if not w.joined:
                            # Still starting: SIGTERM could kill it before its handler is in
                            # place (and the frames already in its input with it). Its join
                            # reply says "terminating" instead.
                            continue
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._done), timeout)
            except TimeoutError:
                log.warning("pipe %s: still running %s s after terminate(): killing it",
                            self.name, timeout)
                self._kill_all()
                self._complete(None)
            except UpipeError:
                pass  # a processor failed meanwhile: raised below, and by wait_for_completion
        await self._finish()
        if self._error is not None:
            raise self._error

    async def _finish(self) -> None:
        if self._state != "running":
            return
        self._state = "stopping"
        if self._autoscaler is not None:
            await self._autoscaler.stop()
        self._kill_all()
        # Reap: _on_exit does it, one pidfd event after each (SIGKILLed) worker's exit.
        for _ in range(1000):
            if not any(n.workers for n in self._nodes.values()):
                break
            await asyncio.sleep(0.01)
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._drain_task
        self._shutdown()

    def _shutdown(self) -> None:
        """Release everything the pipe holds in this process (idempotent)."""
        loop = self._loop
        for node in self._nodes.values():
            for w in list(node.workers.values()):
                if w.pidfd >= 0 and loop is not None:
                    loop.remove_reader(w.pidfd)
                    os.close(w.pidfd)
                    w.pidfd = -1
                self._close_conn(w)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                if isinstance(w.handle, subprocess.Popen):
                    w.handle.wait()
                else:
                    w.handle.join()
            node.workers.clear()
        self._by_pid.clear()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for hello in list(self._hellos):
            self._drop_hello(hello)
        if self._listener is not None:
            if loop is not None:
                loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._final is None and self._nodes:
            with contextlib.suppress(UpipeError):
                self._final = self.statistics()
                lost = {n: p["lost_frames"] for n, p in self._final.processors.items()
                        if p.get("lost_frames")}
                if lost:
                    log.warning("pipe %s: frames lost with workers that died holding them: %s",
                                self.name, lost)
                left = {n: p["queued"] for n, p in self._final.processors.items()
                        if p.get("queued")}
                if left and self._error is None:
                    log.warning("pipe %s: frames left unprocessed in inputs at the end (their "
                                "processors' workers all exited first): %s", self.name, left)
        for q in self._queues():
            with contextlib.suppress(UpipeError):
                q.detach()
        for node in self._nodes.values():
            node.input = None
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        self._output = None
        if loop is not None:
            for sig in self._signals_installed:
                loop.remove_signal_handler(sig)
        self._signals_installed = []
        self._state = "done"

    # -- signals ------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        assert self._loop is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                continue
            self._signals_installed.append(sig)

    def _on_signal(self, sig: int) -> None:
        assert self._loop is not None
        if self._signal is None:
            self._signal = sig
            log.warning("pipe %s: %s: stopping the sources and draining (again to kill now)",
                        self.name, signal.Signals(sig).name)
            self._loop.create_task(self.terminate())
        else:
            log.warning("pipe %s: %s again: killing every worker", self.name,
                        signal.Signals(sig).name)
            self._kill_all()
            self._complete(None)

    # -- the pipe as a service ----------------------------------------------------------------

    async def emit(self, data: Any, timeout: float | None = None) -> None:
        """Inject a frame into every root processor's input (waits for room)."""
        if data is None:
            raise ValueError(f"pipe {self.name!r}: emit(None): None marks the end of the "
                             "stream in a processor's get(); emit a value")
        inputs = [n.input for n in self._running_roots() if n.input is not None]
        if len(inputs) == 1:
            await inputs[0].put_async(data, timeout)
        else:  # the roots' inputs are rings of one segment: one chunk for all of them
            await fan_out_async(inputs, data, timeout)

    async def emit_sync(self, data: Any, timeout: float | None = None) -> Any:
        """Inject a frame and return the first frame a sink emits after it: a request and its
        response. Requests are served one at a time (a lock), so do not mix them with
        :meth:`emit` of frames whose outputs could be taken for the response.

        :raises TimeoutError: no response within ``timeout`` seconds.
        """
        self._running_roots()  # not started, or ended: say so now
        assert self._request_lock is not None and self._loop is not None
        async with self._request_lock:
            fut: asyncio.Future[Any] = self._loop.create_future()
            self._pending_reply = fut
            emitted = False
            try:
                await self.emit(data, timeout)
                emitted = True
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            finally:
                self._pending_reply = None
                if emitted and not fut.done():
                    # Timed out or cancelled: its reply may still come; it must not be taken
                    # for the next request's.
                    self._stale_replies += 1

    def _running_roots(self) -> list[_Node]:
        if self._state != "running" or self._done is None or self._done.done():
            state = "ended" if self._state != "new" else "new"
            raise UpipeError(f"pipe {self.name!r} is not running (it has {state}): "
                             + ("await pipe.start() first" if self._state == "new" else
                                "start a new Pipe"))
        roots = [n for n in self._nodes.values() if n.is_root]
        done = [n.name for n in roots if n.finished]
        if done:
            raise UpipeError(f"pipe {self.name!r}: root processor(s) {', '.join(done)} have "
                             "finished: nothing would read what you emit")
        return roots

    async def _drain_outputs(self) -> None:
        """What sinks emit: the answer to a pending emit_sync, or discarded (counted)."""
        q = self._output
        assert q is not None
        while True:
            try:
                item = await q.get_async()
            except (Closed, Empty, UpipeError):
                fut = self._pending_reply
                if fut is not None and not fut.done():
                    fut.set_exception(UpipeError(f"pipe {self.name!r} ended before a reply"))
                return
            fut = self._pending_reply
            if self._stale_replies:
                self._stale_replies -= 1  # the late reply of a request that gave up
                self._discarded += 1
            elif fut is not None and not fut.done():
                fut.set_result(item)
            else:
                self._discarded += 1

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> PipeStatistics:
        """Per processor: running ``instances`` and their ``workers`` (pid, instance and
        counters each), ``restarts``, ``finished``, frames ``queued`` in its input and its
        ``capacity``, the counters summed over every worker it ever ran (``frames_in``,
        ``frames_out``, ``bytes_out``, ``get_wait_ns``: time starved, ``emit_wait_ns``: time
        under back-pressure; waits in progress count up to now), and ``lost_frames``: items
        its input queue counted lost (0 in a pipe: processors take frames with a receipt, and
        a dead worker's frame is redelivered). Kept after the pipe ends."""
        if self._final is not None:
            return self._final
        procs: dict[str, dict[str, Any]] = {}
        now = time.monotonic_ns()  # waits still in progress count up to now
        for name, node in self._nodes.items():
            totals = {key: node.retired.get(key, 0) for key in _COUNTERS}
            workers = []
            for w in sorted(node.workers.values(), key=lambda w: w.instance):
                row = self._stats.read(w.row, now) if self._stats is not None else {}
                for key in _COUNTERS:
                    totals[key] += row.get(key, 0)
                workers.append({"pid": w.pid, "instance": w.instance, "joined": w.joined,
                                **{key: row.get(key, 0) for key in _COUNTERS}})
            entry: dict[str, Any] = {
                "instances": len(node.workers), "restarts": node.restarts_used,
                "finished": node.finished, **totals, "workers": workers,
            }
            if node.input is not None:
                q = node.input
                st = q.statistics()
                lost = st.lost_items  # (lost_items counts leases too, segment-wide: in a fan-out
                if q._seg.config.nrings > 1 and q._ring != 0:  # group, counted on ring 0 only)
                    lost -= st.lost_leases
                entry.update(queued=st.qsize, capacity=st.maxsize, lost_frames=lost)
            procs[name] = entry
        return PipeStatistics(procs, self._discarded)

    def snapshot(self) -> dict[str, Any]:
        """Everything a monitor shows, as plain data: the pipe, each processor's statistics
        (see :meth:`statistics`), topology and instance bounds, and each worker's CPU time and
        memory (psutil). ``upipe status`` and ``upipe top`` get this over the control socket."""
        import psutil

        st = self.statistics()
        procs: dict[str, Any] = {}
        for name, entry in st.processors.items():
            node = self._nodes[name]
            workers = []
            for w in entry["workers"]:
                info = dict(w)
                ps = self._psutil.get(w["pid"])
                try:
                    if ps is None:
                        ps = self._psutil[w["pid"]] = psutil.Process(w["pid"])
                    times = ps.cpu_times()
                    info.update(cpu_s=times.user + times.system, rss=ps.memory_info().rss)
                except psutil.Error:
                    info.update(cpu_s=0.0, rss=0)
                workers.append(info)
            procs[name] = {
                **entry, "workers": workers,
                "kind": "entry" if node.proc.entry else "func",
                "upstream": [u.name for u in node.upstream] + (["(pipe)"] if node.is_root else []),
                "downstream": [d.name for d in node.downstream],
                "max_instances": node.proc.max_instances,
                "target_instances": node.target, "retiring": node.retiring,
                "reason": node.reason,
            }
        live = {w["pid"] for p in procs.values() for w in p["workers"]}
        for pid in list(self._psutil):
            if pid not in live:
                del self._psutil[pid]
        return {
            "pipe": self.name, "pid": os.getpid(), "state": self._state,
            "t_ns": time.monotonic_ns(), "uptime_s": (time.monotonic_ns() - self._started_ns) / 1e9,
            "processors": procs, "discarded_outputs": st.discarded_outputs,
            "events": list(self._errors[-20:]),
        }
