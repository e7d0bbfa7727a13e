"""upipe's exceptions.

Each one also subclasses the standard exception it stands in for (PyNaCl's two-parent pattern),
so code written against :mod:`queue` or :mod:`asyncio` keeps working: ``except queue.Full`` catches
:class:`Full`, ``except asyncio.QueueEmpty`` catches :class:`Empty`.
"""

from __future__ import annotations

import asyncio
import queue


class UpipeError(Exception):
    """Base class of every upipe error."""


class Full(UpipeError, queue.Full, asyncio.QueueFull):
    """The queue is at its ``maxsize`` (or its chunk pool is exhausted) and the call did not wait.

    ``count`` says how many items of a ``put_many`` went in before it gave up.
    """

    def __init__(self, message: str = "queue is full", count: int = 0) -> None:
        super().__init__(message)
        self.count = count


class Empty(UpipeError, queue.Empty, asyncio.QueueEmpty):
    """The queue has no item and the call did not wait (or its timeout ran out)."""


class Closed(UpipeError):
    """The queue was closed: ``put`` always raises it, ``get`` once the queue is drained."""


class MessageTooLarge(UpipeError, ValueError):
    """An item is larger than the queue's largest chunk (``max_message_size``)."""


class ShmExhausted(UpipeError, MemoryError):
    """The shared memory for a segment could not be reserved: more than the memory available,
    or the address-space limit (upipe segments are memfds: /dev/shm's size does not apply)."""


class SegmentError(UpipeError):
    """The file descriptor is not a upipe segment, or its header is damaged."""


class VersionMismatch(SegmentError):
    """The segment was made by an incompatible version of upipe (layout or ABI)."""


class HangsInCreation(SegmentError, TimeoutError):
    """The segment's creator never finished initializing it (it died while creating it)."""


class TooManyProcesses(UpipeError):
    """Every entry of the segment's process table is taken (64 processes per queue)."""


class NotOwner(UpipeError, ValueError):
    """The buffer is not held by this process: it was already put, released, or never leased.

    Also raised by ``Queue.ack`` for a receipt that is not an unacked take of this queue in this
    process (acked already, from another queue or process, or not a receipt at all).
    """


class TooManyTakes(UpipeError):
    """This process already holds 32 unacknowledged takes of the queue: ``ack`` some first."""
