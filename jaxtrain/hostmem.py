"""Large host allocations on transparent huge pages: XLA:CPU's per-step buffers fault in
512 times fewer pages.

XLA's CPU runtime allocates each execution's temporaries with ``malloc`` (about 4 GB for
a train step of the benchmark shape) and frees them when the execution ends. glibc
serves blocks that large with fresh ``mmap`` pages and unmaps them on ``free``, so every
step faults its whole temporary buffer in again, 4 KiB at a time: on the benchmark shape
970 000 page faults and about 4.4 s of kernel time per 11 s step on 2 cores
(``benchmarks/RESULTS.md``). glibc's ``glibc.malloc.hugetlb=1`` tunable (glibc 2.35+)
makes it advise transparent huge pages for such blocks, and the faults drop to about
2 500 per step. Keeping the freed pages instead (one arena, no ``mmap``, no trim) removed
the faults entirely but let fragmentation grow the process to 3x its memory, so it is
not done.

Tunables are read when a process starts, so :func:`reexec_with_hugepages` re-runs the
current command line (same PID, same arguments) with the tunable added; the CLI calls
it before anything else happens. ``JAXTRAIN_HOST_MALLOC=system`` leaves glibc alone.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, int] | None:
    name, version = platform.libc_ver()
    parts = version.split(".")[:2]
    if name != "glibc" or len(parts) < 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def hugepage_env(environ: Mapping[str, str], thp_mode: Path = THP_MODE) -> dict | None:
    """``environ`` with the huge-page tunable added to ``GLIBC_TUNABLES``, or None where it
    does not apply: not Linux with glibc 2.35+, transparent huge pages off (``thp_mode``
    reads ``[never]`` or is missing), the tunable already given, or
    ``JAXTRAIN_HOST_MALLOC=system``."""
    if environ.get("JAXTRAIN_HOST_MALLOC", "").strip().lower() == "system":
        return None
    if not sys.platform.startswith("linux") or (_glibc_version() or (0, 0)) < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    try:
        mode = thp_mode.read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, TUNABLE]))}


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with :data:`TUNABLE` in effect;
    return without doing anything where :func:`hugepage_env` says it does not apply."""
    env = hugepage_env(os.environ)
    if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
