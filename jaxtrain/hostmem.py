"""How the host allocates XLA:CPU's per-step buffers: on huge pages (the default), kept
for reuse by oneTBB's allocator (``JAXTRAIN_HOST_MALLOC=tbb``), or as glibc does
(``JAXTRAIN_HOST_MALLOC=system``).

XLA's CPU runtime allocates each execution's temporaries as one block (about 4 GB for a
train step of the benchmark shape) and frees it when the execution ends. glibc serves
blocks that large with fresh ``mmap`` pages and unmaps them on ``free``, so every step
faults its whole temporary buffer in again, 4 KiB at a time: on the benchmark shape
970 000 page faults and about 4.4 s of kernel time per 11 s step on 2 cores
(``benchmarks/RESULTS.md``).

- ``hugepages``: glibc's ``glibc.malloc.hugetlb=1`` tunable (glibc 2.35+) makes it
  advise transparent huge pages for such blocks; the faults drop to about 2 500 per
  step, but the kernel still zeroes the fresh block every step (1.1-2.4 s of system
  time). Keeping the freed pages in glibc instead (one arena, no ``mmap``, no trim)
  removed the faults but let fragmentation grow the process to 3x its memory.
- ``tbb``: oneTBB's scalable allocator (the ``tbb`` package: ``pip install
  'jaxtrain[tbb]'``) replaces ``malloc`` for the process (``LD_PRELOAD``) and keeps freed
  blocks of :data:`TBB_KEEP_BYTES` and more for the next request
  (``TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD``), on huge pages: the block is reused from step
  to step and the kernel's zeroing is gone: 0.02-0.24 s of system time a step instead
  of 1.1-2.4 s. The price is host memory: the allocator holds the freed blocks, and the
  process's peak grew by one temporary block on the benchmark shape (5.2 to 9.3 GB).

Both are read when a process starts, so :func:`reexec` re-runs the current command line
(same PID, same arguments) with them in effect; the CLI calls it before anything else
happens.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from jaxtrain.errors import UserError

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MODES = ("hugepages", "tbb", "system")
# The allocator, then its malloc replacement (which needs the allocator loaded first).
TBB_LIBRARIES = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")
TBB_KEEP_BYTES = 64 << 20


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
    if mode(environ) == "system":
        return None
    if not sys.platform.startswith("linux") or (_glibc_version() or (0, 0)) < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    try:
        thp = thp_mode.read_text()
    except OSError:
        return None
    if "[never]" in thp:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, TUNABLE]))}


def mode(environ: Mapping[str, str]) -> str:
    """``JAXTRAIN_HOST_MALLOC``: one of :data:`MODES`, ``hugepages`` when unset."""
    value = environ.get("JAXTRAIN_HOST_MALLOC", "").strip().lower() or "hugepages"
    if value not in MODES:
        raise UserError(f"JAXTRAIN_HOST_MALLOC={value!r}: must be one of {', '.join(MODES)}")
    return value


def tbb_libraries(folders: list[Path] | None = None) -> list[Path] | None:
    """The oneTBB allocator's libraries (:data:`TBB_LIBRARIES`) in the first of
    ``folders`` that holds both (default: this environment's ``lib``, where the ``tbb``
    wheel puts them), or None."""
    if folders is None:
        folders = [Path(sysconfig.get_paths()["data"]) / "lib", Path(sys.prefix) / "lib"]
    for folder in folders:
        paths = [folder / name for name in TBB_LIBRARIES]
        if all(p.is_file() for p in paths):
            return paths
    return None


def tbb_env(environ: Mapping[str, str], folders: list[Path] | None = None) -> dict | None:
    """``environ`` with oneTBB's allocator preloaded and keeping large freed blocks, or None
    where it is already preloaded; a :class:`UserError` where it is not installed."""
    preload = environ.get("LD_PRELOAD", "")
    if TBB_LIBRARIES[1] in preload:
        return None
    libraries = tbb_libraries(folders)
    if libraries is None:
        raise UserError(
            "JAXTRAIN_HOST_MALLOC=tbb needs the tbb package (pip install 'jaxtrain[tbb]'): "
            f"{' and '.join(TBB_LIBRARIES)} are not in this environment's lib folder"
        )
    return {
        **environ,
        "LD_PRELOAD": " ".join([*map(str, libraries), *preload.split()]),
        "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD": str(TBB_KEEP_BYTES),
        "TBB_MALLOC_USE_HUGE_PAGES": "1",
    }


def host_env(environ: Mapping[str, str], thp_mode: Path = THP_MODE) -> dict | None:
    """The environment a process should run with for ``JAXTRAIN_HOST_MALLOC``
    (:func:`tbb_env` or :func:`hugepage_env`), or None where it already does."""
    if mode(environ) == "tbb":
        return tbb_env(environ)
    return hugepage_env(environ, thp_mode)


def reexec() -> None:
    """Replace this process by the same command line in the environment :func:`host_env`
    gives; return without doing anything where it gives None."""
    env = host_env(os.environ)
    if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
