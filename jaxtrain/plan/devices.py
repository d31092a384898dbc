"""Run ``jaxtrain plan`` on a simulated mesh of the target's size.

XLA reads its device-count flag when the CPU backend starts, so a process that does not
have the requested number of CPU devices runs the same command again in a child that
does (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, ``JAX_PLATFORMS=cpu``).
Compiling allocates nothing, so N may be any size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence

from jaxtrain.errors import UserError

_FLAG = "--xla_force_host_platform_device_count"
_GUARD = "JAXTRAIN_PLAN_DEVICES"


def has_simulated_devices(n: int, env: dict[str, str] | None = None) -> bool:
    """Whether a process with ``env`` gets exactly ``n`` CPU devices."""
    env = os.environ if env is None else env
    counts = re.findall(rf"{_FLAG}=(\d+)", env.get("XLA_FLAGS", ""))
    return env.get("JAX_PLATFORMS") == "cpu" and counts[-1:] == [str(n)]


def rerun_with_devices(n: int, argv: Sequence[str]) -> int | None:
    """Exit status of ``jaxtrain argv`` re-run on ``n`` simulated CPU devices, or None
    when this process already has them.

    Raises:
        UserError: if a re-run still lacks them (the environment overrides the flag).
    """
    if has_simulated_devices(n):
        return None
    if os.environ.get(_GUARD):
        raise UserError(f"--devices: could not start {n} simulated CPU devices")
    flags = re.sub(rf"{_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} {_FLAG}={n}".strip(),
        "JAX_PLATFORMS": "cpu",
        _GUARD: str(n),
    }
    return subprocess.call([sys.executable, "-m", "jaxtrain.cli", *argv], env=env)
