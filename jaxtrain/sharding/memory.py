"""Which memory an array lives in: device memory or pinned host memory.

JAX carries the memory space in an array's type, and refuses to compute on host-memory
arrays alongside device ones. Parameters offloaded to the host
(``train.offload=opt_state+params``) reach the layer scan in host memory; each layer's
slice is copied to the device where it is used (:func:`on_device`), so the device holds
one layer's parameters at a time, and the backward pass sends that layer's gradients
back the same way.
"""

from __future__ import annotations

from typing import Any

import jax


def in_host_memory(x: Any) -> bool:
    """Whether the array (or tracer) ``x`` lives in host memory."""
    return jax.typeof(x).memory_space == jax.memory.Space.Host


def on_device(tree: Any) -> Any:
    """``tree`` with its host-memory leaves copied to device memory, each keeping its
    sharding; device leaves are returned as they are (no copy)."""

    def one(x: Any) -> Any:
        return jax.device_put(x, jax.memory.Space.Device) if in_host_memory(x) else x

    return jax.tree.map(one, tree)
