"""Join a multi-process run through JAX's own multi-controller runtime (jax.distributed).

Every process runs the same program over its local devices; the global mesh spans them
all. Where the processes learn about each other, in order:

1. explicit settings: ``--coordinator HOST:PORT --num-processes N --process-id I`` or
   the ``JAXTRAIN_COORDINATOR`` / ``JAXTRAIN_NUM_PROCESSES`` / ``JAXTRAIN_PROCESS_ID``
   environment variables;
2. a cluster JAX detects itself: SLURM (``SLURM_NTASKS`` > 1), Open MPI
   (``OMPI_COMM_WORLD_SIZE`` > 1) or a multi-host Cloud TPU slice;
3. otherwise a single process, and nothing is initialised.

On CPU the cross-process collectives go through gloo.
"""

from __future__ import annotations

import os

import jax

from jaxtrain.env import env_int
from jaxtrain.errors import UserError, quote

ENV = {
    "coordinator": "JAXTRAIN_COORDINATOR",
    "num_processes": "JAXTRAIN_NUM_PROCESSES",
    "process_id": "JAXTRAIN_PROCESS_ID",
}
FLAGS = {
    "coordinator": "--coordinator",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
}
CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _cluster_detected() -> str | None:
    """What says this is a multi-process cluster job (e.g. ``SLURM_NTASKS=4``), if any."""
    for var in CLUSTER_SIZE_ENV:
        size = env_int(var, 1, minimum=1)
        if size > 1:
            return f"{var}={size}"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "TPU_WORKER_HOSTNAMES" if "," in hosts else None


def _check_coordinator(address: str, source: str) -> None:
    """``HOST:PORT`` with a port JAX can listen on or reach (the host is not resolved
    here: process 0 may name itself by an address only the others can look up)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"{source}: expected HOST:PORT (port 1-65535), got {quote(address)}")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialise ``jax.distributed`` if this is a multi-process run.

    Must run before anything touches a JAX backend. Returns whether it initialised.

    Raises:
        UserError: for incomplete, malformed or inconsistent settings (flags or
            environment variables, named as given), or when joining the run fails.
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    source = {k: FLAGS[k] for k, v in given.items() if v is not None}
    for name, var in ENV.items():
        if given[name] is None:
            if name == "coordinator":
                given[name] = os.environ.get(var, "").strip() or None
            else:
                given[name] = env_int(var)
            if given[name] is not None:
                source[name] = var
    coordinator, num_processes, process_id = given.values()
    if any(v is not None for v in given.values()):
        if any(v is None for v in given.values()):
            raise UserError(
                "--coordinator, --num-processes and --process-id (or JAXTRAIN_COORDINATOR, "
                "JAXTRAIN_NUM_PROCESSES, JAXTRAIN_PROCESS_ID) must be given together"
            )
        _check_coordinator(coordinator, source["coordinator"])
        if num_processes < 1:
            raise UserError(f"{source['num_processes']}: {num_processes} must be >= 1")
        if not 0 <= process_id < num_processes:
            raise UserError(
                f"{source['process_id']}: {process_id} is not in [0, {num_processes}) "
                f"({source['num_processes']}={num_processes})"
            )
        where = f"at {coordinator} as process {process_id} of {num_processes}"
    else:
        detected = _cluster_detected()
        if detected is None:
            return False
        where = f"found through {detected}"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    except (ValueError, RuntimeError) as err:  # no coordinator found, none reachable
        reason = quote(str(err).strip().split("\n")[0] or type(err).__name__, 160)
        raise UserError(f"jax.distributed: cannot join the run {where}: {reason}") from None
    return True
