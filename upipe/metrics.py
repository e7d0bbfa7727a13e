"""Prometheus metrics of pipes: a custom collector fed by pipe snapshots, served over HTTP.

Two ways in:

- ``Pipe(..., metrics_port=N)`` serves ``/metrics`` of that pipe from the pipe process
  (:func:`serve_pipe`); the collector asks the pipe's event loop for a snapshot
  (``loop.call_soon_threadsafe`` and a future with a timeout), since the event loop's thread
  owns the pipe's state.
- ``upipe top --prometheus PORT`` serves every pipe of this user on this machine
  (:func:`serve_all`): each scrape fetches their snapshots over their control sockets, as
  ``upipe status`` does.

Nothing listens unless asked, and by default only on the loopback interface (127.0.0.1).
Every metric is named ``upipe_*``; counters end in ``_total``. Labels: ``pipe``,
``processor`` and, for per-worker series, ``worker`` (the instance number; ``exited`` holds
what workers that have exited had counted, so summing over ``worker`` gives the processor's
total). ``prometheus-client`` comes with the ``monitor`` extra: ``pip install
"upipe[monitor]"``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import view

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .pipe import Pipe

__all__ = ["UpipeCollector", "MetricsServer", "serve_pipe", "serve_all", "DEFAULT_HOST"]

log = logging.getLogger("upipe.metrics")

DEFAULT_HOST = "127.0.0.1"
SNAPSHOT_TIMEOUT = 2.0  # seconds a scrape waits for a pipe's snapshot

# (name, help, snapshot key, scale): per-worker counters
_WORKER_COUNTERS = (
    ("upipe_frames_in", "Frames the workers got from their input.", "frames_in", 1.0),
    ("upipe_frames_out", "Frames the workers emitted (once per emit, not per downstream).",
     "frames_out", 1.0),
    ("upipe_bytes_out", "Payload bytes the workers emitted.", "bytes_out", 1.0),
    ("upipe_get_wait_seconds", "Time the workers spent waiting for input (starved).",
     "get_wait_ns", 1e-9),
    ("upipe_emit_wait_seconds", "Time the workers spent waiting for room downstream "
     "(back-pressure).", "emit_wait_ns", 1e-9),
)


def _prometheus() -> Any:
    return view.require("prometheus_client", "prometheus-client", "upipe metrics")


class UpipeCollector:
    """A prometheus-client collector: at each scrape, ``source()`` gives the snapshots
    (:meth:`upipe.Pipe.snapshot`) to turn into metrics."""

    def __init__(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        self._core = _prometheus().metrics_core
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # no snapshot at registration time (it may be in the pipe's own thread)

    def collect(self) -> Iterator[Metric]:
        core = self._core
        try:
            snaps = self.source()
        except Exception:  # noqa: BLE001 - a scrape must answer, if with nothing
            log.exception("upipe metrics: no snapshot")
            snaps = []
        pl = ["pipe", "processor"]
        wl = ["pipe", "processor", "worker"]
        counters = {key: (core.CounterMetricFamily(name, doc, labels=wl), scale)
                    for name, doc, key, scale in _WORKER_COUNTERS}
        cpu = core.CounterMetricFamily("upipe_worker_cpu_seconds",
                                       "CPU time (user + system) of each running worker.",
                                       labels=wl)
        rss = core.GaugeMetricFamily("upipe_worker_rss_bytes",
                                     "Resident memory of each running worker.", labels=wl)
        restarts = core.CounterMetricFamily("upipe_restarts",
                                            "Workers restarted after dying.", labels=pl)
        lost = core.CounterMetricFamily(
            "upipe_lost_frames", "Frames a worker had taken and not finished when it died.",
            labels=pl)
        instances = core.GaugeMetricFamily("upipe_instances", "Running workers.", labels=pl)
        target = core.GaugeMetricFamily("upipe_target_instances",
                                        "Workers the processor should run.", labels=pl)
        depth = core.GaugeMetricFamily("upipe_queue_depth", "Frames waiting in the input queue.",
                                       labels=pl)
        capacity = core.GaugeMetricFamily("upipe_queue_capacity",
                                          "Capacity of the input queue, in frames.", labels=pl)
        discarded = core.CounterMetricFamily(
            "upipe_discarded_outputs", "Frames the sinks emitted that no emit_sync awaited.",
            labels=["pipe"])
        uptime = core.GaugeMetricFamily("upipe_uptime_seconds", "Seconds since the pipe started.",
                                        labels=["pipe"])
        seen: set[str] = set()
        for snap in snaps:
            pipe = str(snap.get("pipe", "?"))
            if pipe in seen:  # two running pipes of the same name: tell them apart by pid
                pipe = f"{pipe}:{snap.get('pid')}"
            seen.add(pipe)
            discarded.add_metric([pipe], float(snap.get("discarded_outputs", 0)))
            uptime.add_metric([pipe], float(snap.get("uptime_s", 0.0)))
            for proc, e in snap.get("processors", {}).items():
                labels = [pipe, proc]
                instances.add_metric(labels, float(e.get("instances", 0)))
                if isinstance(e.get("target_instances"), int):
                    target.add_metric(labels, float(e["target_instances"]))
                restarts.add_metric(labels, float(e.get("restarts", 0)))
                lost.add_metric(labels, float(e.get("lost_frames", 0)))
                if e.get("capacity") is not None:
                    depth.add_metric(labels, float(e.get("queued", 0)))
                    capacity.add_metric(labels, float(e["capacity"]))
                workers = e.get("workers", [])
                for key, (family, scale) in counters.items():
                    live = 0
                    for w in workers:
                        live += int(w.get(key, 0))
                        family.add_metric([pipe, proc, str(w.get("instance"))],
                                          w.get(key, 0) * scale)
                    exited = int(e.get(key, 0)) - live
                    if exited > 0:
                        family.add_metric([pipe, proc, "exited"], exited * scale)
                for w in workers:
                    wlabels = [pipe, proc, str(w.get("instance"))]
                    if "cpu_s" in w:
                        cpu.add_metric(wlabels, float(w["cpu_s"]))
                    if "rss" in w:
                        rss.add_metric(wlabels, float(w["rss"]))
        yield from (family for family, _ in counters.values())
        yield from (cpu, rss, restarts, lost, instances, target, depth, capacity, discarded,
                    uptime)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """``/metrics`` (any path, in fact) of a collector, served by a daemon thread.

    :param port: 0 picks a free port; :attr:`port` is the one in use.
    """

    def __init__(self, collector: UpipeCollector, port: int, host: str = DEFAULT_HOST) -> None:
        prom = _prometheus()
        self.registry = prom.CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        app = prom.make_wsgi_app(self.registry)
        server_class: type[_Server] = _Server
        if ":" in host:  # an IPv6 address

            class _Server6(_Server):
                address_family = socket.AF_INET6

            server_class = _Server6
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"upipe-metrics:{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._thread.is_alive():
            # shutdown() waits for a scrape in progress; a scrape waits at most a few seconds
            # for each pipe's snapshot. The thread is a daemon: never hold an exit up for it.
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            stopper.join(5)
            self._thread.join(5)
        self._server.server_close()


def _pipe_snapshot(pipe: Pipe, loop: asyncio.AbstractEventLoop,
                   timeout: float = SNAPSHOT_TIMEOUT) -> list[dict[str, Any]]:
    """The pipe's snapshot, taken in its event loop's thread (which owns the pipe's state)."""
    if loop.is_closed():
        return []
    with contextlib.suppress(RuntimeError):
        if asyncio.get_running_loop() is loop:  # a scrape from the loop's own thread
            return [pipe.snapshot()]
    fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

    def take() -> None:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(pipe.snapshot())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(exc)

    try:
        loop.call_soon_threadsafe(take)
        return [fut.result(timeout)]
    except RuntimeError:  # the loop closed meanwhile
        return []
    except concurrent.futures.TimeoutError:
        fut.cancel()
        log.warning("upipe metrics: pipe %s did not answer within %s s", pipe.name, timeout)
        return []


def serve_pipe(pipe: Pipe, port: int, host: str = DEFAULT_HOST) -> MetricsServer:
    """Serve one pipe's metrics (from the thread running its event loop: ``Pipe.start``)."""
    loop = asyncio.get_running_loop()
    return MetricsServer(UpipeCollector(lambda: _pipe_snapshot(pipe, loop)), port, host)


def serve_all(port: int, host: str = DEFAULT_HOST) -> MetricsServer:
    """Serve the metrics of every running pipe of this user (for ``upipe top --prometheus``)."""
    return MetricsServer(UpipeCollector(lambda: list(view.poll().values())), port, host)
