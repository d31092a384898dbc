"""Running ``jaxtrain`` as a user does, in a subprocess, with the test suite's XLA
flags: the simulated devices, and compiling with LLVM's optimisations off (see
``tests/conftest.py``)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

FAST_COMPILE = "--xla_backend_optimization_level=0"
EXE = shutil.which("jaxtrain", path=str(Path(sys.executable).parent)) or "jaxtrain"

# A small model for the CLI's end-to-end runs, as --set flags.
SMALL = [
    "--set",
    "model.n_layers=2",
    "--set",
    "model.d_model=64",
    "--set",
    "model.mlp_dim=128",
    "--set",
    "data.seq_len=32",
    "--set",
    "train.global_batch=8",
    "--set",
    "sample.max_new_tokens=0",  # no sample after training (tested in test_generate_cli)
]


def xla_flags(devices: int = 8) -> str:
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def xla_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """This process's environment with the suite's XLA flags for ``devices`` devices."""
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), **extra)


def jaxtrain(*args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``jaxtrain ARGS`` on 8 simulated devices, output captured; ``env`` adds variables."""
    return subprocess.run(
        [EXE, *args],
        capture_output=True,
        text=True,
        env=xla_env(**(env or {})),
        cwd=cwd,
        timeout=timeout,
    )
