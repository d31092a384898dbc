"""Optimizer state, and master parameters, in host memory (``train.offload: opt_state``
and ``opt_state+params``; ZeRO-Offload's idea, BMTrain's ``AdamOffloadOptimizer``,
Angel's ZeRO-Cache).

The AdamW moments are two float32 copies of the parameters: under ZeRO-3 they are two
thirds of the state a device holds. With offloading the state keeps them in host memory
(JAX's ``pinned_host`` memory kind, laid out by the same shardings), the step reads them
onto the device for the update and writes the new moments back, so between steps device
memory holds the parameters (and, in the step, the activations) only; checkpoints read
and write them where they live. XLA schedules the transfers; the numbers are the ones
computed without offloading.

With ``opt_state+params`` the float32 master parameters live in host memory as well.
The model reads them as :func:`streamed` lays them out: the stacked layers' parameters
stay in host memory and the layer scan copies one layer at a time to the device (again
for the backward pass, which sends that layer's gradients back to host memory); the rest
(embeddings, final norm, head) are copied whole. The update then reads the masters onto
the devices with the optimizer state, after the gradients exist.
"""

from __future__ import annotations

from typing import Any

import jax

HOST = "pinned_host"
DEVICE = "device"


def in_memory(shardings: Any, kind: str) -> Any:
    """``shardings`` (a tree of NamedShardings) placed in memory ``kind``."""
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def fetch(tree: Any, shardings: Any) -> Any:
    """Inside the step: ``tree`` (in host memory) copied to the device, as ``shardings``."""
    return jax.device_put(tree, in_memory(shardings, DEVICE))


def store(tree: Any, shardings: Any) -> Any:
    """Inside the step: ``tree`` written back to host memory, as ``shardings``."""
    return jax.device_put(tree, in_memory(shardings, HOST))


def streamed(params: Any, shardings: Any, logical: Any) -> Any:
    """Offloaded ``params`` as the model reads them: leaves stacked over ``layers`` (per
    their ``logical`` axes) left in host memory for the layer scan to copy a layer at a
    time, the others copied to the device whole (as ``shardings``)."""

    def one(param: Any, sharding: Any, axes: tuple[str | None, ...]) -> Any:
        return param if axes and axes[0] == "layers" else fetch(param, sharding)

    return jax.tree.map(one, params, shardings, logical)
