"""The pipe's control plane: how a worker process finds its pipe and gets its queues.

The pipe listens on a Unix socket in the abstract namespace (no file to leak, no TCP port) and
passes its address to every worker in the environment (``UPIPE_PIPE``, with ``UPIPE_PROCESSOR``
and ``UPIPE_INSTANCE``). A worker connects, says who it is, and receives its processor's
config and the queues' file descriptors (``SCM_RIGHTS``). An abstract socket has no file
permissions, so the pipe checks the peer's uid (``SO_PEERCRED``) before handing anything over,
and the worker checks that the listener is its own parent's uid too.

The connection stays open for the worker's life: the worker reports an exception's traceback
through it, and the pipe sees the worker go (EOF) even before it reaps the process.

Messages are length-prefixed pickles: both ends are the same user's processes of the same
program, checked by uid, and the config is whatever Python object the pipe script gave.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import UpipeError

ENV_ADDRESS = "UPIPE_PIPE"
ENV_PROCESSOR = "UPIPE_PROCESSOR"
ENV_INSTANCE = "UPIPE_INSTANCE"

_HEADER = struct.Struct("<I")
MAX_FDS = 253  # the kernel's SCM_MAX_FD


class ControlError(UpipeError, ConnectionError):
    """The control connection to the pipe failed (the pipe is gone, or refused this process)."""


@dataclass
class JoinReply:
    """What a worker receives when it joins: everything but the fds is picklable."""

    pipe: str
    processor: str
    instance: int
    config: Any
    input_shape: Any | None  # upipe.queue.QueueShape of the input queue, or None
    output_shapes: list[Any] = field(default_factory=list)  # one per downstream (or the sink)
    error: str | None = None  # set when the pipe refuses the join
    stats_rows: int = 0  # the stats block's size (its fd comes after the queues' fds)
    stats_row: int = -1  # this worker's row in it
    terminating: bool = False  # the pipe is terminating and this is a root: stop at once
    is_root: bool = False  # a root processor (pipe.emit feeds it; terminate() stops it)
    # The queues' segments: how many fds each has (they come in this order, before the stats
    # block's), and which segment each queue (input first, then outputs) is a ring of.
    segment_fds: list[int] = field(default_factory=list)
    queue_segments: list[int] = field(default_factory=list)


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def send_msg(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(obj, protocol=5)
    payload = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [payload[:4096]], fds)
        if sent < len(payload):
            sock.sendall(payload[sent:])
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        part = sock.recv(n)
        if not part:
            raise ControlError("the pipe closed the control connection")
        chunks.append(part)
        n -= len(part)
    return b"".join(chunks)


def recv_msg(sock: socket.socket, max_fds: int = 0) -> tuple[Any, list[int]]:
    """One message and the fds that came with it (the caller owns and must close them)."""
    fds: list[int] = []
    if max_fds:
        head, fds, _flags, _addr = socket.recv_fds(sock, 4, max_fds)
        if not head:
            raise ControlError("the pipe closed the control connection")
        if len(head) < 4:
            head += _recv_exact(sock, 4 - len(head))
    else:
        head = _recv_exact(sock, 4)
    (n,) = _HEADER.unpack(head)
    try:
        return pickle.loads(_recv_exact(sock, n)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def new_address(pipe_name: str) -> str:
    """An abstract-namespace address unique to this pipe instance, written ``@name`` (as
    ``ss -x`` shows them) so it can travel in the environment; see :func:`sockaddr`."""
    return f"@upipe/{os.getuid()}/{os.getpid()}/{pipe_name}/{os.urandom(6).hex()}"


def sockaddr(address: str) -> str:
    """The address for bind/connect: ``@name`` is the abstract name (a leading NUL)."""
    return "\0" + address[1:] if address.startswith("@") else address


def connect(address: str, processor: str, instance: int) -> tuple[socket.socket, JoinReply,
                                                                   list[int]]:
    """The worker's half of the handshake: (connection, reply, fds)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(sockaddr(address))
        if peer_uid(sock) != os.getuid():
            raise ControlError("the pipe's control socket belongs to another user: refusing it")
        send_msg(sock, {"processor": processor, "instance": instance, "pid": os.getpid()})
        reply, fds = recv_msg(sock, MAX_FDS)
    except OSError as exc:
        sock.close()
        raise ControlError(
            f"cannot reach the pipe at {address!r} ({exc}): Processor({processor!r}).join() "
            "works in a process started by a running Pipe"
        ) from exc
    except BaseException:
        sock.close()
        raise
    if not isinstance(reply, JoinReply):
        sock.close()
        raise ControlError(f"unexpected reply from the pipe: {reply!r}")
    if reply.error:
        sock.close()
        for fd in fds:
            os.close(fd)
        raise ControlError(reply.error)
    return sock, reply, fds
