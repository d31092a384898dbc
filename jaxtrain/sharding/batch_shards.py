"""The layout of gradients kept per batch shard (local gradient accumulation).

With ZeRO-3 and several microbatches, an accumulator laid out like the parameters makes
every microbatch reduce-scatter its gradients. Local accumulation instead computes each
batch shard's gradients on that shard's devices (``jax.vmap`` over a leading shard axis
laid over the batch mesh axes) and keeps their running sum there, unreduced: one array
``[S, *shape]`` per parameter, split over the batch axes on ``S`` and as the parameter is
on the rest. The sum over ``S`` at the end of the step is the step's one reduction.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain.sharding.mesh import BATCH_AXES


def batch_axes(sharding: NamedSharding) -> tuple[str, ...]:
    """The mesh axes that ``sharding`` splits its leading (batch) dimension over."""
    entry = sharding.spec[0] if len(sharding.spec) else None
    axes = entry if isinstance(entry, tuple) else (entry,)
    return tuple(a for a in axes if a is not None)


def shard_count(sharding: NamedSharding) -> int:
    """How many batch shards ``sharding`` splits its leading dimension into."""
    return math.prod(sharding.mesh.shape[a] for a in batch_axes(sharding))


def without_batch_axes(
    spec: PartitionSpec, removed: tuple[str, ...] = BATCH_AXES
) -> tuple[PartitionSpec, bool]:
    """``spec`` with the batch axes (or the mesh axes ``removed``) taken out, and
    whether it had any."""
    kept, had = [], False
    for entry in spec:
        axes = entry if isinstance(entry, tuple) else (entry,)
        rest = tuple(a for a in axes if a is not None and a not in removed)
        had |= len(rest) < len([a for a in axes if a is not None])
        kept.append(rest if len(rest) > 1 else (rest[0] if rest else None))
    return PartitionSpec(*kept), had


def per_shard_shardings(shardings: Any, batch: NamedSharding) -> Any:
    """For each parameter sharding, the sharding of its ``[S, *shape]`` per-shard
    gradients: ``S`` over ``batch``'s axes, the rest as the parameter without them."""
    axes = batch_axes(batch)
    lead = axes[0] if len(axes) == 1 else axes

    def one(sharding: NamedSharding) -> NamedSharding:
        rest, _ = without_batch_axes(sharding.spec)
        return NamedSharding(sharding.mesh, PartitionSpec(lead, *rest))

    return jax.tree.map(one, shardings)
