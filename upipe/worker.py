"""The body of a ``func=`` worker process: join the pipe, run the function, report failures.

The pipe starts one of these per instance with multiprocessing's spawn (or forkserver) context;
``entry=`` workers are plain scripts that join by themselves.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

from .processor import Processor

__all__ = ["run_worker"]


def run_worker(func: Callable[..., Any], name: str, env: dict[str, str]) -> None:
    """The body of a ``func=`` worker process (spawn/forkserver): join, then run func."""
    # Ctrl-C is the pipe's: ignore it, then take it out of the mask the pipe started us with.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os.environ.update(env)
    try:
        os.setpgid(0, 0)  # Ctrl-C in the terminal reaches the pipe, which stops us in order
    except OSError:
        pass
    proc = Processor(name)
    try:
        if inspect.iscoroutinefunction(func):
            asyncio.run(_run_async(proc, func))
        else:
            proc.join_blocking()
            result = func(proc)
            proc._ack_held()  # it returned: the frame in hand was done
            if isinstance(result, types.CoroutineType):
                result.close()
                raise TypeError(f"{func.__qualname__} returned a coroutine: declare it async def")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    except BaseException:
        proc.report_error(traceback.format_exc())
        sys.exit(1)


async def _run_async(proc: Processor, func: Callable[..., Any]) -> None:
    await proc.join()
    await func(proc)
    proc._ack_held()  # it returned: the frame in hand was done
