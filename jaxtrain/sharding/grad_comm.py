"""Gradients reduced across the batch shards in a narrow dtype (``train.grad_comm_dtype``).

Local gradient accumulation (:mod:`jaxtrain.sharding.batch_shards`) ends each step with
one float32 ``[S, *shape]`` sum per parameter, one row per batch shard, to be added over
``S`` and laid out like the parameter. Left to XLA that is a float32 reduce-scatter (or
all-reduce). Here each device sends its share in bfloat16, or in float8 (e5m2, the
gradient format of FP8 training) scaled per tensor, and adds what it receives in float32:

1. over the batch axes that split the parameter (``fsdp`` under ZeRO-3), an all-to-all of
   each destination's block, then a float32 sum: the reduce-scatter's bytes, narrowed;
2. over the batch axes that replicate it (``data``), an all-to-all of a slice each, a
   float32 sum, and an all-gather of the summed slices in the narrow dtype again: the
   all-reduce's bytes, narrowed, at the cost of rounding the finished sum once more.

The fp8 scale is ``max / amax``, the largest float8 over the largest magnitude that the
devices exchanging a tensor hold (a scalar ``pmax``), so no value overflows and the
smallest keep as many bits as the format's range allows; a non-finite gradient makes the
result NaN, as a float32 reduction would, and the step's non-finite handling sees it.
The collectives are explicit (``jax.shard_map``) and carry the narrow values' bits as
unsigned integers (``uint16``, ``uint8``), so every backend sends exactly those bytes: XLA
may move or drop a convert around a collective it inserts itself, and XLA:CPU widens
bfloat16 and float8 collectives to a wider float.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain.sharding.batch_shards import batch_axes

WIRE_DTYPES = {"bfloat16": jnp.bfloat16, "fp8": jnp.float8_e5m2}
_BITS = {1: jnp.uint8, 2: jnp.uint16}


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, _BITS[x.dtype.itemsize])


def _values(bits: jax.Array, wire: Any) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, wire).astype(jnp.float32)


def _entry_axes(entry: Any) -> tuple[str, ...]:
    return tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a is not None)


def _quantize(x: jax.Array, wire: Any, axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
    """``x`` in ``wire``, and the scale it was multiplied by (shared over ``axes``)."""
    if jnp.dtype(wire).itemsize > 1:
        return x.astype(wire), jnp.ones((), jnp.float32)
    amax = jax.lax.pmax(jnp.max(jnp.abs(x)), axes)
    scale = jnp.where(amax > 0, float(jnp.finfo(wire).max) / amax, 1.0)
    return (x * scale).astype(wire), scale


def _exchange_sum(x: jax.Array, wire: Any, axes: tuple[str, ...]) -> jax.Array:
    """``x`` [n, ...] on each of the n devices of ``axes``: the float32 sum of the n
    blocks ``[i]`` that device i holds for this one, sent in ``wire``."""
    q, scale = _quantize(x, wire, axes)
    received = jax.lax.all_to_all(_bits(q), axes, 0, 0, tiled=True)
    return jnp.sum(_values(received, wire), axis=0) / scale


def _reduce_block(
    x: jax.Array,
    wire: Any,
    scatter: list[tuple[int, tuple[str, ...], int]],
    replicate: tuple[str, ...],
    replicas: int,
) -> jax.Array:
    """One device's float32 block ``x`` of a batch shard's gradient -> its block of the
    sum over every batch shard, laid out as the parameter."""
    for dim, axes, n in scatter:
        x = jnp.moveaxis(x, dim, 0)
        x = _exchange_sum(x.reshape(n, x.shape[0] // n, *x.shape[1:]), wire, axes)
        x = jnp.moveaxis(x, 0, dim)
    if not replicate:
        return x
    flat = x.reshape(-1)
    flat = jnp.pad(flat, (0, -flat.size % replicas)).reshape(replicas, -1)
    part = _exchange_sum(flat, wire, replicate)
    q, scale = _quantize(part, wire, replicate)
    whole = _values(jax.lax.all_gather(_bits(q), replicate, axis=0, tiled=True), wire) / scale
    return whole[: x.size].reshape(x.shape)


def _reduce_one(g: jax.Array, shards: NamedSharding, param: NamedSharding, wire: Any):
    mesh = param.mesh
    lead = batch_axes(shards)
    scatter, used = [], set()
    for dim, entry in enumerate(param.spec):
        axes = tuple(a for a in _entry_axes(entry) if a in lead)
        if not axes:
            continue
        if len(axes) != len(_entry_axes(entry)):
            raise ValueError(f"a dimension split over batch and other axes: {param.spec}")
        scatter.append((dim, axes, math.prod(mesh.shape[a] for a in axes)))
        used.update(axes)
    replicate = tuple(a for a in lead if a not in used and mesh.shape[a] > 1)
    replicas = math.prod(mesh.shape[a] for a in replicate)

    def local(block: jax.Array) -> jax.Array:
        return _reduce_block(jnp.sum(block, axis=0), wire, scatter, replicate, replicas)

    out_spec = PartitionSpec(*param.spec)
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=shards.spec, out_specs=out_spec, check_vma=False
    )
    return mapped(g)


def reduce_shards(grads: Any, shard_shardings: Any, param_shardings: Any, dtype: str) -> Any:
    """The sum over ``S`` of each ``[S, *shape]`` gradient in ``grads`` (laid out by
    ``shard_shardings``, ``S`` over the batch axes), exchanged in ``dtype`` (``bfloat16``
    or ``fp8``) and added in float32, laid out by ``param_shardings``."""
    wire = WIRE_DTYPES[dtype]
    return jax.tree.map(
        lambda g, s, p: _reduce_one(g, s, p, wire), grads, shard_shardings, param_shardings
    )
