"""Processor: the user's face of one stage of a pipe.

A Processor has two lives. In the pipe script it is a *declaration*: a name, the code to run
(``func=`` an importable function, or ``entry=`` a script) and a config, wired into a
:class:`~upipe.pipe.Pipe` with ``add``. In a worker process it is the *runtime*:
``proc = Processor('b'); await proc.join()`` connects to the pipe that started the process and
then ``get``/``emit`` frames through shared-memory queues.

Every processor has one input queue, shared by its instances (each frame goes to exactly one of
them), and emits into the input queue of every downstream processor (each receives every
frame). A sink (no downstream) emits into the pipe's own output queue, which feeds
``pipe.emit_sync``.

Two faces, like :class:`~upipe.Queue`: the async one (``await proc.get()``, ``emit``,
``get_sync``, ``emit_sync``, ``async for``), and a blocking one for plain code
(``join_blocking``, ``get_blocking``, ``emit_blocking``, ``for data in proc``).
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import control, stats
from .errors import Closed, Empty, Full, UpipeError
from .queue import _NOTHING, Queue, attach_fds, fan_out, fan_out_async
from .segment import Segment

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Processor", "ProcessorError"]

DEFAULT_RESTARTS = 3
DEFAULT_QUEUE_SIZE = 256
_PR_SET_PDEATHSIG = 1
# hot: module globals, not attributes
_FRAMES_IN, _FRAMES_OUT, _BYTES_OUT = stats.FRAMES_IN, stats.FRAMES_OUT, stats.BYTES_OUT


class Retire:
    """The pipe's request, travelling in a processor's input like a frame, that the one
    instance which takes it finish (it has no frame in hand then) and exit: how a processor
    scales down without killing a busy worker. Never seen by user code."""

    __slots__ = ()

    def __reduce__(self) -> str:
        return "RETIRE"


RETIRE = Retire()


class ProcessorError(UpipeError):
    """A processor's worker failed: it raised (``remote_traceback`` says where) or died.

    ``processor`` and ``pid`` name the worker; ``exitcode`` is its exit status (negative: the
    signal that killed it).
    """

    def __init__(self, message: str, processor: str = "", pid: int = 0,
                 remote_traceback: str | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.processor = processor
        self.pid = pid
        self.remote_traceback = remote_traceback
        self.exitcode = exitcode

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nIn the worker:\n" + self.remote_traceback
        return text


def _check_func(name: str, func: Callable[..., Any]) -> None:
    """Refuse, before any process starts, a function a spawned worker could not import."""
    if not callable(func):
        raise TypeError(f"Processor {name!r}: func must be a function, got {func!r}")
    qualname = getattr(func, "__qualname__", "")
    module = getattr(func, "__module__", None)
    if getattr(func, "__name__", "") == "<lambda>":
        raise ValueError(
            f"Processor {name!r}: func is a lambda, which a worker process cannot import; "
            "define it with `def` at the top level of a module"
        )
    if "<locals>" in qualname:
        raise ValueError(
            f"Processor {name!r}: func {qualname} is defined inside another function, so a "
            "worker process cannot import it; move it to the top level of a module"
        )
    mod = sys.modules.get(module or "")
    target: Any = mod
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if mod is None or target is not func:
        raise ValueError(
            f"Processor {name!r}: func {module}.{qualname} cannot be imported by that name in a "
            "worker process; use a function defined with `def` at the top level of a module"
        )
    if module == "__main__":
        _check_main_guard(name)


def _check_main_guard(name: str, require_file: bool = True) -> None:
    """Spawned (and forkserver) workers import the pipe script as their main module, so the
    code that builds and starts the pipe must sit under ``if __name__ == '__main__':``.
    ``require_file``: the function itself lives in the main module, which must then be a file."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if not path or not Path(path).is_file():
        if require_file:
            raise ValueError(
                f"Processor {name!r}: func is defined in an interactive session, which worker "
                "processes cannot import; put it in a module (a .py file) and import it from "
                "there")
        return  # no main file: workers do not import one
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return  # not ours to judge; multiprocessing will say if it cannot import it
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) \
                and "__main__" in ast.unparse(node.test):
            return
    raise ValueError(
        f"Processor {name!r} runs func= workers, which import the main script {path}; it has no "
        "`if __name__ == '__main__':` guard, so each worker would run the pipe again. Put the "
        "code that builds and starts the pipe under that guard"
    )


def _payload_size(data: Any) -> int:
    """Bytes of a frame's payload for the stats (0 for objects without a buffer)."""
    if data.__class__ is bytes:
        return len(data)
    nbytes = getattr(data, "nbytes", None)  # ndarray, memoryview
    if isinstance(nbytes, int):
        return nbytes
    return len(data) if isinstance(data, bytearray) else 0


def _set_parent_death_signal(pipe_pid: int) -> None:
    """Die with the pipe. When the pipe is our parent (spawn, entry scripts), the kernel sends
    SIGKILL when it goes (Linux prctl); then make sure it has not already gone (the race between
    the fork and the prctl). Under forkserver the parent is the fork server: the control
    socket's watcher (Processor._watch_pipe) sees the pipe go instead."""
    if sys.platform.startswith("linux") and os.getppid() == pipe_pid:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
            pass
    if pipe_pid:
        try:
            os.kill(pipe_pid, 0)
        except ProcessLookupError:
            os._exit(70)  # the pipe is already gone: nobody would ever read what we emit
        except PermissionError:
            pass


class Processor:
    """One stage of a pipe: declared in the pipe script, joined in a worker process.

    Declaration (pipe script)::

        a = Processor('a', entry='./a.py', config={'n': 100})
        b = Processor('b', func=plus_one, instances=2)

    Runtime (a worker)::

        proc = Processor('b')
        await proc.join()
        async for data in proc:
            await proc.emit_sync(data + 1)

    :param name: unique within its pipe.
    :param func: an importable function run by each instance: ``async def f(proc)`` (or a
        plain ``def f(proc)`` for the blocking face), with ``proc`` already joined.
    :param entry: a Python script run by each instance (``python entry``); it joins with
        ``Processor(name)`` and ``await proc.join()``.
    :param config: any picklable object, ``proc.config`` in the worker (default ``{}``).
    :param instances: worker processes sharing the input (each frame goes to one of them):
        the count started. Alone, it is fixed.
    :param autoscale: the seed's "at most N instances": the autoscaler moves the count between
        ``min_instances`` and N, starting from ``instances`` (default: ``min_instances``).
    :param min_instances: the fewest instances the autoscaler leaves (default 1).
    :param max_instances: the same as ``autoscale``.
    :param restarts: how many times a worker that dies (killed, crashed) is replaced before the
        pipe fails. A worker that raises is never restarted: the pipe fails with its traceback.
    :param queue_size: the input queue's ``maxsize`` (frames).
    :param max_bytes: the input queue's chunk memory (see :class:`~upipe.Queue`); processors
        fed by a common upstream pool theirs (one chunk per fanned-out frame).
    :param max_message_size: the largest frame the input queue takes.
    """

    def __init__(
        self,
        name: str,
        func: Callable[..., Any] | None = None,
        entry: str | os.PathLike[str] | None = None,
        config: Any = None,
        *,
        instances: int | None = None,
        autoscale: int | None = None,
        min_instances: int | None = None,
        max_instances: int | None = None,
        restarts: int = DEFAULT_RESTARTS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_bytes: int | None = None,
        max_message_size: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or "\0" in name or "/" in name:
            raise ValueError(f"a processor's name must be a non-empty string without '/', "
                             f"got {name!r}")
        if func is not None and entry is not None:
            raise ValueError(
                f"Processor {name!r}: give func= (a function run in a worker) or entry= (a "
                "script run as a worker), not both"
            )
        if func is not None:
            _check_func(name, func)
        if entry is not None and not isinstance(entry, (str, os.PathLike)):
            raise TypeError(f"Processor {name!r}: entry must be a path, got {entry!r}")
        for label, value in (("instances", instances), ("autoscale", autoscale),
                             ("min_instances", min_instances), ("max_instances", max_instances)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"Processor {name!r}: {label} must be an int >= 1, got {value!r}")
        if autoscale is not None and max_instances is not None and autoscale != max_instances:
            raise ValueError(f"Processor {name!r}: autoscale={autoscale} and max_instances="
                             f"{max_instances} disagree (they are the same setting)")
        top = autoscale or max_instances
        low = min_instances or 1
        if top is not None and low > top:
            raise ValueError(f"Processor {name!r}: min_instances={low} is more than "
                             f"autoscale/max_instances={top}")
        if top is None and min_instances is not None and instances is not None \
                and instances < min_instances:
            raise ValueError(f"Processor {name!r}: instances={instances} is fewer than "
                             f"min_instances={min_instances}")
        if top is not None and instances is not None and not low <= instances <= top:
            raise ValueError(f"Processor {name!r}: instances={instances} is outside "
                             f"{low}..{top} (min_instances..autoscale)")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"Processor {name!r}: restarts must be an int >= 0, got {restarts!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"Processor {name!r}: queue_size must be an int >= 1, "
                             f"got {queue_size!r}")
        self.name = name
        self.func = func
        self.entry = None if entry is None else os.fspath(entry)
        self.config = {} if config is None else config
        if top is None:  # a fixed count
            self.instances = instances or low
            self.min_instances = self.max_instances = self.instances
        else:
            self.instances = instances or low
            self.min_instances, self.max_instances = low, top
        self.autoscaled = self.max_instances > self.min_instances
        self.restarts = restarts
        self.queue_options: dict[str, Any] = {"maxsize": queue_size}
        if max_bytes is not None:
            self.queue_options["max_bytes"] = max_bytes
        if max_message_size is not None:
            self.queue_options["max_message_size"] = max_message_size
        self.downstream: list[Processor | str] = []
        # runtime (a joined worker)
        self.instance = -1
        self.pipe_name = ""
        self._input: Queue | None = None
        self._outputs: list[Queue] = []
        self._ctrl: socket.socket | None = None
        self._ctrl_lock = threading.Lock()
        self._stopping = False  # the pipe is terminating and this processor is a source
        # (put, inline_max) of the only output, for emit_sync's fast path; None when there are
        # several outputs, or once stopping (the slow path checks it).
        self._emit1: tuple[Callable[[bytes, int], int], int] | None = None
        self._term_requested = False  # a SIGTERM came (perhaps before the join)
        self._is_root = False  # known at the join
        self._leaving = False  # close() was called: the control connection ends on purpose
        self._waiting_to_emit = False
        self._reads = False  # it has asked for input: it ends with its input, not at an emit
        self._ended = False
        self._retired = False  # took a Retire: its input has ended for it alone
        # The frame in hand: a Receipt (from a take that waited), or the fast path's receipt,
        # which lives in the take buffer (_tbuf.held) and is acked by the next take itself.
        self._held: Any = None
        self._tbuf: Any = None
        self._tview: Any = None
        self._take_next: Any = None
        # This worker's row of counters in the pipe's stats block (a list until joined).
        self._st: Any = [0] * stats.ROW_WORDS
        self._stats: stats.StatsBlock | None = None

    def __repr__(self) -> str:
        what = (f"func={getattr(self.func, '__qualname__', self.func)}" if self.func
                else f"entry={self.entry!r}" if self.entry else "joined" if self._ctrl else "")
        return f"<upipe.Processor {self.name!r} {what}>"

    # -- topology (pipe script) ---------------------------------------------------------------

    def add(self, downstream: Processor | str) -> Processor | str:
        """Send every frame this processor emits to ``downstream`` too; returns it, so
        ``a.add(b).add(c)`` chains and ``a.add(b); a.add(c)`` fans out. A name (str) is looked
        up among the pipe's processors at ``start()``."""
        if not isinstance(downstream, (Processor, str)):
            raise TypeError(f"add() takes a Processor or a processor's name, got {downstream!r}")
        self.downstream.append(downstream)
        return downstream

    # -- joining (worker) ---------------------------------------------------------------------

    async def join(self) -> Processor:
        """Connect to the pipe that started this process; afterwards get/emit work."""
        loop = asyncio.get_running_loop()
        try:  # before connecting: a terminate() from then on is a graceful stop, not a kill
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
        self._join()
        return self

    def join_blocking(self) -> Processor:
        """:meth:`join` for plain (non-async) code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._on_sigterm())
        self._join()
        return self

    def _join(self) -> None:
        if self._ctrl is not None:
            raise UpipeError(f"Processor {self.name!r} has already joined its pipe")
        if self.func is not None or self.entry is not None:
            raise UpipeError(
                f"Processor {self.name!r} was declared with func=/entry= (it belongs in the pipe "
                "script); in a worker create it by name only: Processor('name')"
            )
        address = os.environ.get(control.ENV_ADDRESS)
        if not address:
            raise UpipeError(
                f"Processor({self.name!r}).join(): this process was not started by a upipe Pipe "
                f"(no {control.ENV_ADDRESS} in the environment); add the processor to a Pipe "
                "with entry= or func= and start the pipe instead of running this script alone"
            )
        started_as = os.environ.get(control.ENV_PROCESSOR, "")
        if started_as and started_as != self.name:
            raise UpipeError(
                f"this process was started by the pipe as processor {started_as!r}, but joins as "
                f"{self.name!r}: use Processor({started_as!r}) in this script"
            )
        instance = int(os.environ.get(control.ENV_INSTANCE, "0"))
        parent = int(os.environ.get("UPIPE_PIPE_PID", "0"))
        _set_parent_death_signal(parent)
        try:  # Ctrl-C in the terminal is the pipe's to handle (it stops us gracefully)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # started blocked
        except ValueError:  # not the main thread
            pass
        sock, reply, fds = control.connect(address, self.name, instance)
        try:
            shapes = ([reply.input_shape] if reply.input_shape is not None else []) + list(
                reply.output_shapes)
            # The fds come per segment; queues that are rings of one segment (a fan-out group)
            # share one attachment, so a chunk received on one can be named on another.
            starts = [sum(reply.segment_fds[:i]) for i in range(len(reply.segment_fds))]
            attached: dict[int, Queue] = {}
            queues = []
            for shape, k in zip(shapes, reply.queue_segments, strict=True):
                seg_fds = fds[starts[k]:starts[k] + reply.segment_fds[k]]
                seg = attached[k]._seg if k in attached else None
                q = attach_fds(seg_fds, shape, seg)
                attached.setdefault(k, q)
                queues.append(q)
            if reply.stats_rows:
                self._stats = stats.StatsBlock.attach(fds[sum(reply.segment_fds)],
                                                      reply.stats_rows)
                self._st = self._stats.row(reply.stats_row)
        except BaseException:
            sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        if reply.input_shape is not None:
            self._input, self._outputs = queues[0], queues[1:]
        else:
            self._outputs = queues
        for q in self._outputs:
            q._copy_held = True  # forwarding the frame in hand into the same segment copies it
        if len(self._outputs) == 1 and not self._stopping:
            self._emit1 = (self._outputs[0]._put_b, self._outputs[0]._inline_max)
        if self._input is not None:  # the input's fast path: ack the last frame, take the next
            self._tbuf, self._tview = self._input._seg.new_take_buffer(self._input._ring)
            self._take_next = Segment.take_next_fast_path()
        self._ctrl = sock
        self.instance = reply.instance
        self.pipe_name = reply.pipe
        self.config = reply.config
        self._is_root = reply.is_root
        if reply.terminating or self._term_requested:  # terminating began before we joined
            self._on_sigterm()
        self._install_excepthook()
        atexit.register(self._ack_held)  # a normal exit: the frame in hand was done
        threading.Thread(target=self._watch_pipe, name="upipe-pipe-watch", daemon=True).start()

    def _watch_pipe(self) -> None:
        """The control connection closes only when the pipe goes: then nobody is left to read
        what we emit or to stop us, so go too (the parent-death signal covers most cases)."""
        sock = self._ctrl
        try:
            while sock is not None and sock.recv(4096):
                pass
        except OSError:
            pass
        if not self._leaving:  # not our own close(): the pipe is gone
            os._exit(70)

    def _install_excepthook(self) -> None:
        previous = sys.excepthook

        def report(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
            if not issubclass(kind, (SystemExit, KeyboardInterrupt)):
                self.report_error("".join(traceback.format_exception(kind, exc, tb)))
            previous(kind, exc, tb)

        sys.excepthook = report

    def report_error(self, text: str) -> None:
        """Send an exception's traceback to the pipe (it raises it from wait_for_completion)."""
        sock = self._ctrl
        if sock is None:
            return
        try:
            with self._ctrl_lock:
                control.send_msg(sock, {"error": text})
        except OSError:
            pass

    def _on_sigterm(self) -> None:
        """SIGTERM: the pipe is terminating. Only a root acts on it (others end with their
        input, which the pipe closes in order; a SIGTERM sent to every process, as systemd does,
        must not close inputs that upstreams still feed). A root stops at a frame boundary: one
        that reads ends with its input (which the pipe closes); a pure generator (it never
        asked for input) ends, with exit status 0, at its next emit, or now if it is waiting to
        emit. Before the join it is only noted."""
        self._term_requested = True
        if not self._is_root:
            return
        self._stopping = True
        self._emit1 = None
        if self._waiting_to_emit and not self._reads:
            raise SystemExit(0)

    def _check_joined(self) -> None:
        if self._ctrl is None:
            raise UpipeError(f"Processor {self.name!r} has not joined a pipe: call "
                             "`await proc.join()` first")

    # -- getting ------------------------------------------------------------------------------

    def _source(self) -> Queue:
        self._check_joined()
        self._reads = True
        q = self._input
        assert q is not None  # every joined processor has an input queue
        return q

    # Frames are taken from the input with a receipt and acknowledged when this processor asks
    # for the next one (or reaches the end, or its worker exits normally): if the worker dies
    # in between, the queue puts the frame back for a sibling (at-least-once delivery).

    def _poll(self, q: Queue) -> Any:
        """Ack the frame in hand, then take the next without waiting: a frame or _NOTHING.
        Raises Closed at the end of the stream."""
        held = self._held
        if held is not None:  # a Receipt, from a take that waited
            self._held = None
            q._ack_token(held._token)  # (-ESTALE, moved away by recovery, as the fast path)
        buf = self._tbuf
        n = self._take_next(buf)  # one C call: ack the fast path's frame in hand, take the next
        if n >= 0:
            return self._tview[48:48 + n]  # Segment.TAKE_DATA: plain bytes, the common case
        if n == -errno.EBADMSG:  # taken, but not plain bytes (a chunk, an array, an object)
            _rc, kind, meta, payload = q._seg.taken_item(int(buf.item), buf)
            try:
                return q._decode_taken(kind, meta, payload, int(buf.held))
            except BaseException:
                buf.held = 0  # acked or given back already
                raise
        if n == -errno.ENOTRECOVERABLE:
            raise UpipeError(f"processor {self.name!r}: the ack of the frame in hand failed")
        q._take_failed(n)
        return _NOTHING

    @staticmethod
    def _ack(q: Queue, held: Any) -> None:
        if held.__class__ is int:
            q._ack_token(held)
        else:
            q.ack(held)  # a Receipt, from a take that waited

    def _ack_held(self) -> None:
        """The frame in hand is done (the end of the stream, or the worker leaving normally)."""
        held, q = self._held, self._input
        if q is None:
            return
        if held is not None:
            self._held = None
            with contextlib.suppress(UpipeError):
                self._ack(q, held)
        buf = self._tbuf
        if buf is not None and buf.held:
            token, buf.held = int(buf.held), 0
            with contextlib.suppress(UpipeError):
                q._ack_token(token)

    def _arrived(self, data: Any) -> Any:
        """A frame came in: count it, or act on a retire request."""
        if data.__class__ is Retire:
            self._ack_held()  # the request itself: consumed
            return self._retire()
        self._st[stats.FRAMES_IN] += 1
        return data

    def _at_end(self) -> None:
        self._ended = True
        self._ack_held()

    async def get(self) -> Any:
        """The next frame, or None at once if there is none (or the input has ended)."""
        q = self._source()
        if self._retired:
            return None
        try:
            data = self._poll(q)  # no exception for "nothing yet": this is the common case
        except Closed:
            self._at_end()
            return None
        if data is _NOTHING:
            return None
        return self._arrived(data)

    async def get_sync(self, timeout: float | None = None) -> Any:
        """The next frame, waiting for one (up to ``timeout`` seconds).

        Returns None at the end of the stream: every upstream has finished and the input is
        drained (``async for data in proc`` ends there).

        :raises TimeoutError: no frame within ``timeout`` seconds.
        """
        q = self._source()
        if self._retired:
            return None
        try:
            data = self._poll(q)
            if data is _NOTHING:
                t0 = self._wait_begins(stats.GET_WAIT)
                try:
                    data, self._held = await q.take_async(timeout)
                finally:
                    self._wait_ends(stats.GET_WAIT, t0)
        except Empty:
            raise TimeoutError(f"processor {self.name!r}: no frame within {timeout} s") from None
        except Closed:
            self._at_end()
            return None
        return self._arrived(data)

    def get_blocking(self, timeout: float | None = None) -> Any:
        """:meth:`get_sync` for plain code: waits; None at the end of the stream."""
        q = self._source()
        if self._retired:
            return None
        try:
            data = self._poll(q)
            if data is _NOTHING:
                t0 = self._wait_begins(stats.GET_WAIT)
                try:
                    data, self._held = q.take(True, timeout)
                finally:
                    self._wait_ends(stats.GET_WAIT, t0)
        except Empty:
            raise TimeoutError(f"processor {self.name!r}: no frame within {timeout} s") from None
        except Closed:
            self._at_end()
            return None
        return self._arrived(data)

    def _wait_begins(self, kind: int) -> int:
        """Publish that a wait began (readers count it while it lasts); its start time."""
        st = self._st
        t0 = time.monotonic_ns()
        st[stats.WAIT_KIND] = kind
        st[stats.WAIT_SINCE] = t0
        return t0

    def _wait_ends(self, kind: int, t0: int) -> None:
        st = self._st
        st[stats.WAIT_SINCE] = 0  # first: a reader may miss this wait for an instant, never
        st[kind] += time.monotonic_ns() - t0  # count it twice

    def _retire(self) -> None:
        """This instance is scaled down: its input ends here (the end of the stream for it),
        so its code finishes as at the real end, and the pipe knows not to restart it."""
        self._retired = self._ended = True
        sock = self._ctrl
        if sock is not None:
            try:
                with self._ctrl_lock:
                    control.send_msg(sock, {"retired": True})
            except OSError:
                pass
        return None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        q = self._source()
        st = self._st
        while True:
            # The next frame without an await when one is there (most of the time under load);
            # else get_sync's wait.
            data = _NOTHING
            if not self._retired:
                try:
                    data = self._poll(q)
                except Closed:
                    self._at_end()
                    return
            if data is _NOTHING:
                data = await self.get_sync()
                if data is None and self._ended:
                    return
            elif data.__class__ is Retire:
                self._arrived(data)
                return
            else:
                st[_FRAMES_IN] += 1
            yield data
            data = None  # ours no more: a zero-copy frame's chunk can go back while we wait

    def __iter__(self) -> Iterator[Any]:
        while True:
            data = self.get_blocking()
            if data is None and self._ended:
                return
            yield data

    # -- emitting -----------------------------------------------------------------------------

    def _targets(self, data: Any) -> list[Queue]:
        self._check_joined()
        if self._stopping and not self._reads:
            raise SystemExit(0)  # terminating: a generator stops before its next frame
        if data is None:
            raise ValueError(f"processor {self.name!r}: emit(None): None marks the end of the "
                             "stream in get(); emit a value")
        return self._outputs

    async def emit(self, data: Any = b"") -> bool:
        """Emit a frame to every downstream processor without waiting: False (nothing sent)
        when one of them has no room (back-pressure), else True. Without data (as in the uPipe
        README's ``await proc.emit()``) the frame is empty (``b""``)."""
        outs = self._targets(data)
        size = _payload_size(data)
        if len(outs) == 1:
            try:
                outs[0].put(data, False)
            except Full:
                return False
        else:
            if any(q.full() for q in outs):
                return False
            await self._fan_out(data, outs, None)
        st = self._st
        st[stats.FRAMES_OUT] += 1
        st[stats.BYTES_OUT] += size
        return True

    async def emit_sync(self, data: Any = b"", timeout: float | None = None) -> None:
        """Emit a frame to every downstream processor, waiting for room (back-pressure).
        Without data the frame is empty (``b""``), as :meth:`emit`.

        :raises upipe.Full: still no room after ``timeout`` seconds.
        """
        fast = self._emit1
        if fast is not None and data.__class__ is bytes:
            # The common case, small bytes to one downstream with room: the queue's own fast
            # path (one C call), nothing else.
            n = len(data)
            if n <= fast[1] and fast[0](data, n) == 0:
                st = self._st
                st[_FRAMES_OUT] += 1
                st[_BYTES_OUT] += n
                return
        outs = self._targets(data)
        size = _payload_size(data)
        st = self._st
        if len(outs) == 1:
            t0 = 0

            def begin() -> None:  # called only if the put has to wait (data encoded once)
                nonlocal t0
                self._waiting_to_emit = True
                t0 = self._wait_begins(stats.EMIT_WAIT)

            try:
                await outs[0]._put_async(data, timeout, begin)
            finally:
                if t0:
                    self._waiting_to_emit = False
                    self._wait_ends(stats.EMIT_WAIT, t0)
        else:
            self._waiting_to_emit = True
            t0 = self._wait_begins(stats.EMIT_WAIT)
            try:
                await self._fan_out(data, outs, timeout)
            finally:
                self._waiting_to_emit = False
                self._wait_ends(stats.EMIT_WAIT, t0)
        st[stats.FRAMES_OUT] += 1
        st[stats.BYTES_OUT] += size

    @staticmethod
    async def _fan_out(data: Any, outs: Sequence[Queue], timeout: float | None) -> None:
        # The downstream inputs are rings of one segment (the pipe groups them): a large frame
        # is one chunk named by every ring, not a copy each.
        await fan_out_async(outs, data, timeout)

    def emit_blocking(self, data: Any = b"", timeout: float | None = None) -> None:
        """:meth:`emit_sync` for plain code."""
        outs = self._targets(data)
        size = _payload_size(data)
        st = self._st
        try:
            if len(outs) > 1:
                raise Full  # fan-out: the waiting path below
            outs[0].put(data, False)  # the common case: room, no wait
        except Full:
            self._waiting_to_emit = True
            t0 = self._wait_begins(stats.EMIT_WAIT)
            try:
                if len(outs) > 1:
                    fan_out(outs, data, timeout)
                else:
                    outs[0].put(data, True, timeout)
            finally:
                self._waiting_to_emit = False
                self._wait_ends(stats.EMIT_WAIT, t0)
        st[stats.FRAMES_OUT] += 1
        st[stats.BYTES_OUT] += size

    # -- zero-copy output buffers -------------------------------------------------------------

    def alloc(self, nbytes: int, timeout: float | None = None) -> memoryview:
        """A writable buffer in the shared memory of the downstream input queues; emitting it
        moves only a descriptor (to several downstreams: the same chunk for all of them, which
        each sees read-only). Waits for a free chunk (up to ``timeout``)."""
        self._check_joined()
        return self._outputs[0].alloc(nbytes, True, timeout)

    def alloc_array(self, shape: int | Sequence[int], dtype: Any = "float64",
                    timeout: float | None = None) -> np.ndarray:
        """A writable ndarray in shared memory (see :meth:`alloc`)."""
        self._check_joined()
        return self._outputs[0].alloc_array(shape, dtype, True, timeout)

    # -- leaving ------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the pipe (workers do this at exit by themselves)."""
        self._ack_held()
        self._stopping = self._leaving = True
        self._emit1 = None
        # The take buffer holds a reference to its segment's attachment: let go of it too, or
        # the process would stay in the segment's table after detach.
        self._tbuf = self._tview = self._take_next = None
        for q in ([self._input] if self._input else []) + self._outputs:
            q.detach()
        self._input, self._outputs = None, []
        if self._ctrl is not None:
            self._ctrl.close()
            self._ctrl = None
