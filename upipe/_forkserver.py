"""Imported by multiprocessing's fork server (``set_forkserver_preload``), never by user code.

The fork server reports each worker's exit status to the pipe; if it died first, every later
exit would read as status 255 and fail the pipe. A SIGTERM sent to every process of a service
(as systemd stops one) must stop the pipe gracefully, so the fork server ignores SIGTERM: it
still ends when the pipe script does (it watches a pipe from it), and SIGKILL still works.
Workers forked from it start with SIGTERM ignored too, until ``Processor.join`` installs the
pipe's handler.
"""

from __future__ import annotations

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
