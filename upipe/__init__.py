"""upipe: move data between Python processes through shared memory, safely and fast.

The core is :class:`Queue`, a bounded MPMC queue in a shared-memory segment with a sync face
(``put``/``get``, like :class:`queue.Queue`) and an async face (``put_async``/``get_async``, like
:class:`asyncio.Queue`). See docs/basics.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    Closed,
    Empty,
    Full,
    HangsInCreation,
    MessageTooLarge,
    NotOwner,
    SegmentError,
    ShmExhausted,
    TooManyProcesses,
    TooManyTakes,
    UpipeError,
    VersionMismatch,
)
from .processor import Processor, ProcessorError
from .queue import Queue, QueueStatistics, Receipt

if TYPE_CHECKING:
    from .pipe import Pipe, PipeStatistics

__version__ = "0.1.0"

__all__ = [
    "Closed",
    "Empty",
    "Full",
    "HangsInCreation",
    "MessageTooLarge",
    "NotOwner",
    "Pipe",
    "PipeStatistics",
    "Processor",
    "ProcessorError",
    "Queue",
    "QueueStatistics",
    "Receipt",
    "SegmentError",
    "ShmExhausted",
    "TooManyProcesses",
    "TooManyTakes",
    "UpipeError",
    "VersionMismatch",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Pipe on first use: a worker process (which imports upipe to join its pipe) never needs
    # upipe.pipe, the autoscaler or psutil, and importing them slows every worker's start.
    if name in ("Pipe", "PipeStatistics"):
        from . import pipe

        value = globals()[name] = getattr(pipe, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
