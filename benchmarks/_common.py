"""What every benchmark records about the machine and the code it measured."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import upipe


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(dists: Sequence[str] = ("upipe", "numpy", "cffi")) -> dict[str, Any]:
    """CPUs, Python, platform, date, the versions of ``dists``, and the upipe measured: its
    path, git revision and a digest of its sources (upipe changes under our feet during
    development, so a result names exactly what it measured)."""
    pkg = Path(upipe.__file__).resolve().parent
    git_rev = None
    try:  # the revision of the package measured (PYTHONPATH may point to another tree)
        git_rev = subprocess.run(
            ["git", "-C", str(pkg.parent), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in sorted(pkg.glob("*.py")) + sorted(pkg.glob("*.so")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in dists},
        "upipe_git": git_rev,
        "upipe_path": str(pkg),
        "upipe_source_sha256": digest.hexdigest()[:16],
    }
