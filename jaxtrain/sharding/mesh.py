"""Build the named device mesh (``data``, ``stage``, ``fsdp``, ``expert``, ``sequence``,
``tensor``) from config.

``stage`` splits the stacked layers into pipeline stages (:mod:`jaxtrain.models.pipeline`);
at size 1 it changes nothing. It sits outside fsdp, so across hosts (``dcn_stage``) only
the activations that flow between neighbouring stages cross the slow links.

``expert`` splits the experts of mixture-of-experts layers (:mod:`jaxtrain.models.moe`)
and, everywhere else, the batch, like ``data``; at size 1 it changes nothing.

``sequence`` splits every activation's length (context parallelism,
:mod:`jaxtrain.sharding.context`); at size 1 it changes nothing. Axis order puts
``tensor`` innermost, so tensor-parallel groups sit on neighbouring devices (the fastest
links on GPU nodes and TPU slices), with ``sequence`` next to it: a ring's neighbours are
close too.

In a multi-host run, ``mesh.dcn_data`` / ``dcn_stage`` / ``dcn_fsdp`` / ``dcn_sequence`` > 1
build a hybrid mesh: those
ways of the axis span host groups (TPU slices, or runs of consecutive process ranks) and
everything else, ``tensor`` included, stays on one host's fast interconnect. With
``dcn_fsdp`` > 1 and ``data`` > 1 a process holds several separate runs of batch rows (the
batch is split over data, then fsdp); the loader builds exactly those
(:func:`jaxtrain.data.loader.process_rows`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxtrain.config import Config
from jaxtrain.errors import UserError

MESH_AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
# Every axis that splits a step's tokens (rows, or positions under context parallelism):
# a parameter's gradient is a sum over all of them.
TOKEN_AXES = (*BATCH_AXES, "sequence")


def make_mesh(config: Config, devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices) shaped by ``config.mesh``.

    Raises:
        UserError: if the axis sizes do not fit the device count (explained as processes x
            local devices in a multi-process run), or the model cannot be split over the
            tensor axis, or the batch over the data axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n_processes = len({d.process_index for d in devices})
    sizes = config.check_devices(len(devices), n_processes)
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    m = config.mesh
    dcn = (m.dcn_data, m.dcn_stage, m.dcn_fsdp, 1, m.dcn_sequence, 1)
    if math.prod(dcn) > 1:
        grid = _hybrid_grid(shape, dcn, devices)
    elif len(devices) == len(jax.devices()):
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _hybrid_grid(shape: tuple[int, ...], dcn: tuple[int, ...], devices: list) -> np.ndarray:
    """Devices laid out with ``dcn`` ways across host groups and the rest within each.

    The host groups are the TPU slices or the processes when there are that many (JAX's
    ``create_hybrid_device_mesh``); with several processes per host (one per GPU, as JAX
    runs under SLURM) they are runs of consecutive process ranks, as SLURM and
    ``jaxtrain launch`` number a host's processes.
    """
    groups = math.prod(dcn)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    processes = sorted({d.process_index for d in devices})
    within = tuple(size // ways for size, ways in zip(shape, dcn, strict=True))
    if groups in (len(slices), len(processes)):
        return mesh_utils.create_hybrid_device_mesh(
            within, dcn, devices, process_is_granule=len(slices) != groups
        )
    if len(processes) % groups:
        raise UserError(
            f"mesh.dcn_data: dcn_data*dcn_fsdp = {groups} host groups, but the devices form "
            f"{len(processes)} processes and {len(slices)} slices"
        )
    rank = {p: i for i, p in enumerate(processes)}
    per_group = len(processes) // groups
    members: list[list] = [[] for _ in range(groups)]
    for device in devices:
        members[rank[device.process_index] // per_group].append(device)
    blocks = np.stack([mesh_utils.create_device_mesh(within, devices=m) for m in members])
    blocks = blocks.reshape(*dcn, *within)
    n = len(shape)
    # Axis i becomes (group part, within part), the group index outermost.
    return blocks.transpose([axis for i in range(n) for axis in (i, n + i)]).reshape(shape)
