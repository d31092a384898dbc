"""``jaxtrain launch``: run one jaxtrain command as N processes on this machine.

The processes join one ``jax.distributed`` run through a free port on 127.0.0.1 (passed
as ``JAXTRAIN_COORDINATOR`` / ``JAXTRAIN_NUM_PROCESSES`` / ``JAXTRAIN_PROCESS_ID``). This
is for development and tests: on a cluster, SLURM, Open MPI or the TPU VM start the
processes and :mod:`jaxtrain.distributed` reads their environment instead.

The launcher prefixes every output line with its rank, forwards SIGTERM/SIGINT to all
processes (they checkpoint at an agreed step and exit 0), and when one process fails it
kills the others at once (they cannot progress without it) and exits non-zero.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from jaxtrain.errors import UserError

DEVICE_FLAG = "--xla_force_host_platform_device_count"
POLL_S = 0.1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(
    rank: int, nproc: int, port: int, devices_per_proc: int | None, base: dict[str, str]
) -> dict[str, str]:
    """The environment of process ``rank``: the coordinator settings, and the simulated
    CPU device count when ``devices_per_proc`` is given."""
    env = dict(base)
    env["JAXTRAIN_COORDINATOR"] = f"127.0.0.1:{port}"
    env["JAXTRAIN_NUM_PROCESSES"] = str(nproc)
    env["JAXTRAIN_PROCESS_ID"] = str(rank)
    if devices_per_proc is not None:
        flags = re.sub(rf"{DEVICE_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={devices_per_proc}"])
    return env


def _exit_code(returncode: int) -> int:
    """A process's status as a shell reports it (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


class _Output:
    """Copies each process's output line by line to ``stream``, prefixed with its rank."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def say(self, prefix: str, line: str) -> None:
        with self.lock:
            self.stream.write(f"[{prefix}] {line.rstrip()}\n")
            self.stream.flush()

    def follow(self, rank: int, pipe: IO[str]) -> None:
        def pump() -> None:
            for line in pipe:
                self.say(f"rank {rank}", line)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        self.threads.append(thread)

    def drain(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)


def launch(
    command: Sequence[str],
    nproc: int,
    *,
    devices_per_proc: int | None = None,
    stream: IO[str] | None = None,
) -> int:
    """Run ``jaxtrain <command>`` as ``nproc`` processes; return the launcher's exit code.

    0 when every process exits 0; otherwise the first failure's code (128 + N for a
    process killed by signal N), after the other processes have been killed.

    Raises:
        UserError: for a bad process or device count or an empty command.
    """
    if nproc < 1:
        raise UserError(f"--nproc: {nproc} must be >= 1")
    if devices_per_proc is not None and devices_per_proc < 1:
        raise UserError(f"--devices-per-proc: {devices_per_proc} must be >= 1")
    if not command or command[0] != "train":
        raise UserError("launch: give the command to run after '--', e.g. -- train config.yaml")
    output = _Output(stream or sys.stdout)
    port = free_port()
    procs = []
    for rank in range(nproc):
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxtrain.cli", *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=rank_env(rank, nproc, port, devices_per_proc, dict(os.environ)),
            start_new_session=True,  # signals reach them through the launcher only
        )
        procs.append(proc)
        output.say("launch", f"rank {rank}: pid {proc.pid}")
        output.follow(rank, proc.stdout)

    def forward(signum: int, frame: Any) -> None:
        del frame
        output.say("launch", f"forwarding {signal.Signals(signum).name} to every process")
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(procs, output)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output.drain(timeout=5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(procs: list[subprocess.Popen], output: _Output) -> int:
    """Wait for every process to exit 0, or for the first failure (then kill the rest)."""
    while True:
        codes = [proc.poll() for proc in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                status = _exit_code(code)
                output.say("launch", f"rank {rank} failed with exit status {status}")
                for other, proc in enumerate(procs):
                    if proc.poll() is None:
                        output.say("launch", f"stopping rank {other}")
                        proc.kill()
                        proc.wait()
                return status
        if all(code == 0 for code in codes):
            return 0
        time.sleep(POLL_S)
