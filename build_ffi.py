"""Build script for upipe's compiled core (cffi, out-of-line API mode).

Build switches are environment variables, parsed by the small pure functions below (tested in
tests/test_build.py):

* ``UPIPE_SANITIZE=address|undefined|thread`` (comma-separated) builds with those sanitizers.
* ``UPIPE_DEBUG=1`` builds with ``-O0 -g`` instead of ``-O2``.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE / "csrc"
SOURCES = ["upipe.c", "upipe_ring.c", "upipe_futex.c", "upipe_layout.c"]
SANITIZERS = ("address", "undefined", "thread")


def parse_sanitize(value: str | None) -> list[str]:
    """Return the sanitizers named by ``UPIPE_SANITIZE``; raise ValueError on an unknown one."""
    if not value:
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in SANITIZERS:
            raise ValueError(f"UPIPE_SANITIZE: unknown sanitizer {name!r}; use one of {SANITIZERS}")
    if "thread" in names and "address" in names:
        raise ValueError("UPIPE_SANITIZE: 'thread' and 'address' cannot be combined")
    return names


def parse_debug(value: str | None) -> bool:
    """``UPIPE_DEBUG``: '1', 'true', 'yes' or 'on' turn the debug build on."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def compile_args(sanitize: list[str], debug: bool) -> tuple[list[str], list[str]]:
    """Compiler and linker flags for the given switches."""
    cflags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
    cflags += ["-O0", "-g"] if debug else ["-O2"]
    ldflags: list[str] = []
    if sanitize:
        flag = "-fsanitize=" + ",".join(sanitize)
        cflags += [flag, "-fno-omit-frame-pointer", "-g"]
        ldflags.append(flag)
    return cflags, ldflags


_cflags, _ldflags = compile_args(
    parse_sanitize(os.environ.get("UPIPE_SANITIZE")), parse_debug(os.environ.get("UPIPE_DEBUG"))
)

ffibuilder = FFI()
ffibuilder.cdef((CSRC / "upipe.cdef.h").read_text())
ffibuilder.set_source(
    "upipe._upipe_ffi",
    '#include "upipe.h"\n#include "upipe_layout.h"\n',
    sources=[str((CSRC / s).relative_to(HERE)) for s in SOURCES],
    include_dirs=[str(CSRC.relative_to(HERE))],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
