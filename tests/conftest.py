"""Test setup: every test sees 8 simulated CPU devices, and compiled programs are shared.

XLA reads XLA_FLAGS once, when the backend starts, so the flag is set here before
anything imports jax.

Many tests start ``jaxtrain`` in a subprocess (killed and resumed runs, the CLI, several
processes) and each of those compiles the same small programs again. JAX's persistent
compilation cache, pointed at one directory for the whole suite (the variables are
inherited by pytest-xdist's workers and by every subprocess), compiles each program
once; the executables it loads are the ones XLA wrote, so no result changes.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))
