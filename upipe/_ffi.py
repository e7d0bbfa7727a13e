"""The compiled core: import, version check, and errno -> exception mapping.

This module and :mod:`upipe.segment` are the only ones that touch ``ffi`` / ``lib``.
"""

from __future__ import annotations

import errno
import os
from typing import Any, NoReturn

from . import errors

#: The ABI this Python package was written against; the .so carries its own.
ABI_VERSION = 4

try:
    from ._upipe_ffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "upipe's compiled core (upipe._upipe_ffi) is missing or cannot load "
        f"({exc}); rebuild it with: pip install -e . (needs a C compiler and cffi)"
    ) from exc

if lib.upipe_abi_version() != ABI_VERSION:  # pragma: no cover - only on a stale build
    raise ImportError(
        f"upipe's compiled core has ABI {lib.upipe_abi_version()}, the package expects "
        f"{ABI_VERSION}: the extension is stale; rebuild it with: pip install -e ."
    )

__all__ = ["ffi", "lib", "raise_for", "ABI_VERSION"]


def raise_for(rc: int, what: str) -> NoReturn:
    """Raise the exception for a negative return code of a C call; ``what`` names the call."""
    code = -rc
    name = errno.errorcode.get(code, str(code))
    message = f"{what}: {os.strerror(code)} ({name})"
    exc: Exception
    if code == errno.EPIPE:
        exc = errors.Closed(f"{what}: the queue is closed")
    elif code == errno.EMSGSIZE:
        exc = errors.MessageTooLarge(message)
    elif code in (errno.ENOSPC, errno.ENOMEM):
        exc = errors.ShmExhausted(
            f"{what}: could not reserve the shared memory ({name}); lower max_bytes or raise the "
            "memory available to this process"
        )
    elif code == errno.EPROTO:
        exc = errors.SegmentError(f"{what}: not a upipe segment, or its header is damaged")
    elif code == errno.EPROTONOSUPPORT:
        exc = errors.VersionMismatch(
            f"{what}: the segment was created by an incompatible upipe version"
        )
    elif code == errno.ETIMEDOUT:
        exc = errors.HangsInCreation(f"{what}: the segment's creator never finished creating it")
    elif code == errno.EUSERS:
        exc = errors.TooManyProcesses(
            f"{what}: {int(lib.UPIPE_MAX_ACTORS)} processes are already attached to this queue"
        )
    elif code == errno.EPERM:
        exc = errors.NotOwner(f"{what}: this buffer is not held by this process")
    elif code == errno.EINVAL:
        exc = errors.UpipeError(f"{what}: invalid argument (EINVAL)")
    else:
        exc = OSError(code, message)
    raise exc


def describe(value: Any) -> str:
    """A short description of an object for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
