"""upipe: move data between Python processes through shared memory, safely and fast.

The core is :class:`Queue`, a bounded MPMC queue in a shared-memory segment with a sync face
(``put``/``get``, like :class:`queue.Queue`) and an async face (``put_async``/``get_async``, like
:class:`asyncio.Queue`). See docs/basics.md.
"""

from __future__ import annotations

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
from .pipe import Pipe, PipeStatistics
from .processor import Processor, ProcessorError
from .queue import Queue, QueueStatistics, Receipt

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
