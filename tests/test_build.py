"""build_ffi.py's switches (pure functions) and a smoke test of the compiled module."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build_ffi():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("build_ffi_under_test", ROOT / "build_ffi.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_parse_sanitize() -> None:
    b = _build_ffi()
    assert b.parse_sanitize(None) == [] and b.parse_sanitize("") == []
    assert b.parse_sanitize("address,undefined") == ["address", "undefined"]
    assert b.parse_sanitize(" thread ") == ["thread"]
    with pytest.raises(ValueError, match="unknown sanitizer"):
        b.parse_sanitize("memory")
    with pytest.raises(ValueError, match="cannot be combined"):
        b.parse_sanitize("thread,address")


def test_parse_debug_and_flags() -> None:
    b = _build_ffi()
    assert b.parse_debug("1") and b.parse_debug("yes") and not b.parse_debug(None)
    assert not b.parse_debug("0")
    cflags, ldflags = b.compile_args(["address"], debug=True)
    assert "-O0" in cflags and "-fsanitize=address" in cflags and ldflags == ["-fsanitize=address"]
    cflags, ldflags = b.compile_args([], debug=False)
    assert "-O2" in cflags and "-Werror" in cflags and "-std=c11" in cflags and ldflags == []


def test_compiled_module_loads_and_its_abi_matches() -> None:
    from upipe import _ffi

    assert _ffi.lib.upipe_abi_version() == _ffi.ABI_VERSION
    assert int(_ffi.lib.UPIPE_SLOT_HEADER) == 32
    assert int(_ffi.lib.UPIPE_KIND_TOMBSTONE) == 0xFFFF


def test_cdef_declares_only_what_the_header_does() -> None:
    header = (ROOT / "csrc" / "upipe.h").read_text()
    cdef = (ROOT / "csrc" / "upipe.cdef.h").read_text()
    import re

    names = set(re.findall(r"\b(upipe_[a-z_]+)\(", cdef))
    for name in names:
        assert name + "(" in header, f"{name} is in the cdef but not in upipe.h"


def test_a_stale_extension_is_refused_with_a_hint_to_rebuild() -> None:
    # Load _ffi.py as if the package expected another ABI than the compiled module carries.
    import types

    source = (ROOT / "upipe" / "_ffi.py").read_text()
    source = re.sub(r"^ABI_VERSION = \d+$", "ABI_VERSION = 99", source, count=1, flags=re.M)
    assert "ABI_VERSION = 99" in source
    module = types.ModuleType("upipe._ffi_stale")
    module.__package__ = "upipe"
    with pytest.raises(ImportError, match="rebuild"):
        exec(compile(source, "upipe/_ffi.py", "exec"), module.__dict__)
