"""The ``upipe`` command (also ``python -m upipe``): ``status`` and ``top`` for the running pipes
of this user on this machine. See docs/monitoring.md.

``upipe status [--json] [--pipe NAME]`` prints every pipe once: it takes two snapshots about
half a second apart, so it can show rates. ``upipe top`` is the live view (rich), refreshed
four times a second; ``q`` quits; ``--prometheus PORT`` also serves every pipe's metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from typing import Any

from . import view

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upipe", description="Watch the upipe pipes of this user on this machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser("status", help="every running pipe, once (rates over --interval)",
                        description="Print every running pipe of this user once. Rates come "
                        "from two snapshots taken --interval seconds apart.")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--pipe", metavar="NAME", help="only the pipes called NAME (exit status 1 "
                    "when none runs)")
    st.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                    help="time between the two snapshots (default 0.5)")
    top = sub.add_parser("top", help="live view of every running pipe (q quits)",
                         description="Live view of every running pipe of this user; q quits.")
    top.add_argument("--interval", type=float, default=0.25, metavar="SECONDS",
                     help="refresh period (default 0.25)")
    top.add_argument("--pipe", metavar="NAME", help="only the pipes called NAME")
    top.add_argument("--prometheus", type=int, metavar="PORT",
                     help="also serve every pipe's metrics at http://HOST:PORT/metrics")
    top.add_argument("--host", default="127.0.0.1",
                     help="the address --prometheus listens on (default 127.0.0.1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.interval <= 0:
        print("upipe: --interval must be positive", file=sys.stderr)
        return 2
    try:
        if args.command == "status":
            return status(args.pipe, args.json, args.interval)
        return top(args.pipe, args.interval, args.prometheus, args.host)
    except view.MonitorDependencyError as exc:
        print(f"upipe: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- status -------------------------------------------------------------------------------------


def status(name: str | None, as_json: bool, interval: float) -> int:
    first = view.poll(name)
    if first:
        time.sleep(interval)
    second = view.poll(name) if first else {}
    pipes = view.views(second, first)
    if as_json:
        print(json.dumps({"pipes": [v.to_json() for v in pipes]}, indent=2))
    elif not pipes and name is not None:
        print(f"no upipe pipes running (named {name!r})")
    else:
        sys.stdout.write(view.text_report(pipes))
    return 1 if name is not None and not pipes else 0


# -- top ----------------------------------------------------------------------------------------


def _render(pipes: list[view.PipeView], interval: float, name: str | None,
            metrics_url: str | None) -> Any:
    box = view.require("rich.box", "rich", "upipe top")
    console = view.require("rich.console", "rich", "upipe top")
    table = view.require("rich.table", "rich", "upipe top")
    text = view.require("rich.text", "rich", "upipe top")
    head = (f"upipe top  {time.strftime('%H:%M:%S')}  {len(pipes)} pipe(s)  every {interval:g} s"
            "  q quits" + (f"  metrics at {metrics_url}" if metrics_url else ""))
    parts: list[Any] = [text.Text(head, style="bold")]
    if not pipes:
        parts.append(text.Text("no upipe pipes running"
                               + (f" (named {name!r})" if name is not None else "")))
    for v in pipes:
        t = table.Table(title=view.pipe_title(v), title_justify="left", box=box.SIMPLE_HEAD,
                        title_style="bold cyan")
        for i, col in enumerate(view.COLUMNS):
            t.add_column(col, justify="left" if i < 3 or i == 7 else "right", no_wrap=True)
        for r in v.rows:
            cells: list[Any] = list(view.row_cells(r))
            style = {"BP": "bold red", "starved": "yellow", "done": "dim"}.get(r.flag, "")
            cells[7] = text.Text(cells[7], style=style)
            t.add_row(*cells)
        parts.append(t)
        for e in v.events[-3:]:
            parts.append(text.Text(f"  event: {e}", style="dim"))
    return console.Group(*parts)


class _Keys:
    """Keys from stdin without blocking (a terminal in cbreak mode; restored by close())."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._saved: Any = None
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            return
        self.fd = fd
        if os.isatty(fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)

    def close(self) -> None:
        if self._saved is not None and self.fd is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def wait_for_quit(self, deadline: float) -> bool:
        """Wait until ``deadline`` (time.monotonic): True when q was pressed meanwhile."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.fd is None:
                time.sleep(remaining)
                return False
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 64)
                except OSError:
                    data = b""
                if not data:  # end of input (not a terminal): only the timer is left
                    self.fd = None
                elif b"q" in data or b"Q" in data:
                    return True


def _exit_on_signal(sig: int, _frame: Any) -> None:
    raise SystemExit(128 + sig)  # unwinds: the terminal is restored on the way out


def top(name: str | None, interval: float, prometheus: int | None, host: str) -> int:
    console_mod = view.require("rich.console", "rich", "upipe top")
    live_mod = view.require("rich.live", "rich", "upipe top")
    server = None
    if prometheus is not None:
        from . import metrics

        server = metrics.serve_all(prometheus, host)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    keys = _Keys()
    try:
        console = console_mod.Console()
        prev: dict[str, dict[str, Any]] = {}
        with live_mod.Live(console=console, screen=True, auto_refresh=False,
                           redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                t0 = time.monotonic()
                cur = view.poll(name)
                live.update(_render(view.views(cur, prev), interval, name,
                                    server.url if server is not None else None), refresh=True)
                prev = cur
                if keys.wait_for_quit(t0 + interval):
                    return 0
    finally:
        keys.close()
        if server is not None:
            server.close()
