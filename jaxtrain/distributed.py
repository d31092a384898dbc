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

from jaxtrain.errors import UserError

ENV = {
    "coordinator": "JAXTRAIN_COORDINATOR",
    "num_processes": "JAXTRAIN_NUM_PROCESSES",
    "process_id": "JAXTRAIN_PROCESS_ID",
}


def _cluster_detected() -> bool:
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialise ``jax.distributed`` if this is a multi-process run.

    Must run before anything touches a JAX backend. Returns whether it initialised.

    Raises:
        UserError: for incomplete or inconsistent explicit settings.
    """
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    if num_processes is None and os.environ.get(ENV["num_processes"]):
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id is None and os.environ.get(ENV["process_id"]):
        process_id = int(os.environ[ENV["process_id"]])
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UserError(
                "--coordinator, --num-processes and --process-id (or JAXTRAIN_COORDINATOR, "
                "JAXTRAIN_NUM_PROCESSES, JAXTRAIN_PROCESS_ID) must be given together"
            )
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id: {process_id} is not in [0, {num_processes})")
    elif not _cluster_detected():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True
