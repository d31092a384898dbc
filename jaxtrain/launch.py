"""``jaxtrain launch``: run one jaxtrain command as N processes on this machine.

The processes join one ``jax.distributed`` run through a free port on 127.0.0.1 (passed
as ``JAXTRAIN_COORDINATOR`` / ``JAXTRAIN_NUM_PROCESSES`` / ``JAXTRAIN_PROCESS_ID``). This
is for development and tests: on a cluster, SLURM, Open MPI or the TPU VM start the
processes and :mod:`jaxtrain.distributed` reads their environment instead.

The launcher prefixes every output line with its rank, forwards SIGTERM/SIGINT to all
processes (they checkpoint at an agreed step and exit 0), and when one process fails it
kills the others at once (they cannot progress without it) and exits non-zero, with the
failed rank's error line (its last ``jaxtrain: error:`` line, else its last line) on
stderr, so the cause is the one line a user sees there, as with a single process.
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

from jaxtrain.errors import UserError, one_line

DEVICE_FLAG = "--xla_force_host_platform_device_count"
POLL_S = 0.1
ERROR_PREFIX = "jaxtrain: error: "
# Every process is a whole JAX runtime on this one machine; past a few dozen it only
# thrashes the machine (real clusters start their processes with SLURM, MPI or the TPU VM).
MAX_NPROC = 64
MAX_DEVICES_PER_PROC = 1024  # simulated CPU devices: XLA builds each one up front


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
    """Copies each process's output line by line to ``stream``, prefixed with its rank,
    and remembers each rank's last error line (or last line) for :meth:`cause`."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.lock = threading.Lock()
        self.threads: dict[int, threading.Thread] = {}
        self.last_line: dict[int, str] = {}
        self.last_error: dict[int, str] = {}

    def say(self, prefix: str, line: str) -> None:
        with self.lock:
            self.stream.write(f"[{prefix}] {line.rstrip()}\n")
            self.stream.flush()

    def follow(self, rank: int, pipe: IO[str]) -> None:
        def pump() -> None:
            for line in pipe:
                self.say(f"rank {rank}", line)
                text = line.strip()
                if text:
                    self.last_line[rank] = text
                if text.startswith(ERROR_PREFIX):
                    self.last_error[rank] = text.removeprefix(ERROR_PREFIX)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        self.threads[rank] = thread

    def cause(self, rank: int, status: int, timeout: float = 5.0) -> str:
        """Why ``rank`` failed, in one line, once its output has been read to the end."""
        self.threads[rank].join(timeout)
        if rank in self.last_error:
            return one_line(self.last_error[rank])
        why = f"failed with exit status {status}"
        if status > 128 and status - 128 in signal.valid_signals():
            why += f" ({signal.Signals(status - 128).name})"
        if rank in self.last_line:
            why += f"; its last line: {self.last_line[rank]}"
        return one_line(why)

    def drain(self, timeout: float) -> None:
        for thread in self.threads.values():
            thread.join(timeout)


def launch(
    command: Sequence[str],
    nproc: int,
    *,
    devices_per_proc: int | None = None,
    stream: IO[str] | None = None,
    err_stream: IO[str] | None = None,
) -> int:
    """Run ``jaxtrain <command>`` as ``nproc`` processes; return the launcher's exit code.

    0 when every process exits 0; otherwise the first failure's code (128 + N for a
    process killed by signal N), after the other processes have been killed, and its
    cause as one ``jaxtrain: error: [rank R] ...`` line on ``err_stream`` (stderr).

    Raises:
        UserError: for a bad process or device count or an empty command.
    """
    if not 1 <= nproc <= MAX_NPROC:
        raise UserError(f"--nproc: {nproc} must be in [1, {MAX_NPROC}] (processes on this machine)")
    if devices_per_proc is not None and not 1 <= devices_per_proc <= MAX_DEVICES_PER_PROC:
        raise UserError(
            f"--devices-per-proc: {devices_per_proc} must be in [1, {MAX_DEVICES_PER_PROC}]"
        )
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
        status, rank = _supervise(procs, output)
        if status:
            cause = output.cause(rank, status)
            print(f"{ERROR_PREFIX}[rank {rank}] {cause}", file=err_stream or sys.stderr, flush=True)
        return status
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output.drain(timeout=5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(procs: list[subprocess.Popen], output: _Output) -> tuple[int, int]:
    """Wait for every process to exit 0, or for the first failure (then kill the rest).

    Returns the launcher's exit status and the rank that failed first (0: none did)."""
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
                return status, rank
        if all(code == 0 for code in codes):
            return 0, 0
        time.sleep(POLL_S)
