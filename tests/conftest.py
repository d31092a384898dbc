"""Test setup: every test sees 8 simulated CPU devices, and compiled programs are shared.

XLA reads XLA_FLAGS once, when the backend starts, so the flags are set here before
anything imports jax. The tests' programs are tiny and most of their time is compiling,
so XLA's CPU backend compiles them with LLVM's optimisations off
(``--xla_backend_optimization_level=0``): the HLO passes (SPMD partitioning, the
collectives, fusion, buffer assignment, and so memory analyses) are the same, the
matmuls still call the same library kernels, and the suite takes a third less time.
Elementwise code then rounds as unvectorised code does, which the bounds in
``helpers.bounds`` already allow for (they are not one machine's results). A test that
needs the code a user runs drops XLA_FLAGS for its subprocess (the default run).

Many tests start ``jaxtrain`` in a subprocess (killed and resumed runs, the CLI, several
processes) and each of those compiles the same small programs again. JAX's persistent
compilation cache, pointed at one directory for the whole suite (the variables are
inherited by pytest-xdist's workers and by every subprocess), compiles each program
once; the executables it loads are the ones XLA wrote, so no result changes.
"""

import os
from pathlib import Path

from helpers.cli import xla_flags  # noqa: E402  (imports no jax)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))
