"""Build the named device mesh (``data``, ``fsdp``, ``sequence``, ``tensor``) from config.

``sequence`` is always present so rules can name it; it has size 1 until sequence
parallelism lands. Axis order puts ``tensor`` innermost, so tensor-parallel groups sit on
neighbouring devices (the fastest links on GPU nodes and TPU slices).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxtrain.config import Config

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(config: Config, devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices) shaped by ``config.mesh``.

    Raises:
        UserError: if the axis sizes do not fit the device count, or the model cannot be
            split over the tensor axis, or the batch over the data axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.check_devices(len(devices))
    shape = (sizes["data"], sizes["fsdp"], 1, sizes["tensor"])
    if len(devices) == len(jax.devices()):
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
