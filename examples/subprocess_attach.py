"""Attach a plain ``subprocess`` child (not multiprocessing) to a queue.

``Queue.export()`` gives a token and the fds the child needs; pass the fds with ``pass_fds`` and
the token by argument or environment variable. The child calls ``upipe.Queue.attach(token)``.

Run: python examples/subprocess_attach.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import upipe

CHILD = """
import os, upipe
q = upipe.Queue.attach(os.environ["UPIPE_QUEUE"])
for i in range(10):
    q.put(f"hello {i} from pid {os.getpid()}")
"""


def main() -> None:
    q = upipe.Queue(maxsize=16)
    token, fds = q.export()
    child = subprocess.Popen([sys.executable, "-c", CHILD], pass_fds=fds,
                             env={**os.environ, "UPIPE_QUEUE": token})
    try:
        messages = [q.get(timeout=30) for _ in range(10)]
    finally:
        child.wait(30)
    print("\n".join(messages))
    assert child.returncode == 0 and len(messages) == 10


if __name__ == "__main__":
    main()
