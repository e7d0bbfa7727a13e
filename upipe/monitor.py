"""Finding this user's running pipes and asking them for a snapshot (for ``upipe status/top``).

Every running pipe listens on an abstract Unix socket named ``@upipe/<uid>/<pid>/<pipe>/<id>``
(see :mod:`upipe.control`); the kernel lists them in ``/proc/net/unix``, so finding them needs
no registry file that a crashed pipe could leave behind. A monitor connects, asks for a
snapshot (:meth:`upipe.Pipe.snapshot`, plain data) and disconnects: the pipe does no work for
monitors between requests.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from . import control


@dataclass(frozen=True)
class PipeAddress:
    address: str  # "@upipe/..." (control.sockaddr turns it into the abstract name)
    uid: int
    pid: int
    name: str


def list_pipes(uid: int | None = None) -> list[PipeAddress]:
    """The control sockets of running pipes of ``uid`` (default: this user), oldest pid first."""
    uid = os.getuid() if uid is None else uid
    found: dict[str, PipeAddress] = {}
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or not parts[-1].startswith("@upipe/"):
            continue
        path = parts[-1]
        fields = path[len("@upipe/"):].split("/")
        if len(fields) < 4 or not fields[0].isdigit() or not fields[1].isdigit():
            continue
        if int(fields[0]) != uid or parts[3] != "00010000":  # flags: __SO_ACCEPTCON (listening)
            continue
        found[path] = PipeAddress(path, int(fields[0]), int(fields[1]), "/".join(fields[2:-1]))
    return sorted(found.values(), key=lambda p: (p.pid, p.name))


def request_snapshot(address: str, timeout: float = 2.0) -> dict[str, Any]:
    """One snapshot from the pipe listening at ``address``.

    :raises control.ControlError: the pipe is gone or did not answer in time.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(control.sockaddr(address))
        if control.peer_uid(sock) != os.getuid():
            raise control.ControlError(f"{address} belongs to another user")
        control.send_msg(sock, {"request": "snapshot"})
        reply, _ = control.recv_msg(sock)
    except (OSError, EOFError) as exc:
        raise control.ControlError(f"no snapshot from {address}: {exc}") from exc
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise control.ControlError(f"unexpected reply from {address}: {reply!r}")
    return reply


def snapshots(uid: int | None = None) -> list[dict[str, Any]]:
    """A snapshot of every running pipe of this user (pipes that vanish meanwhile are skipped)."""
    out = []
    for p in list_pipes(uid):
        try:
            out.append(request_snapshot(p.address))
        except control.ControlError:
            continue
    return out
