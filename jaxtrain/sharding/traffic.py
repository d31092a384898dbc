"""The ideal collective traffic of a data-parallel step, to compare a compiled one with.

ZeRO-3 (Rajbhandari et al., 2020) moves, per device and step, each parameter sharded
over the axes that split the tokens (the batch axes, and ``sequence`` under context
parallelism) twice as an all-gather (forward, and again for the backward) and its
gradient once as a reduce-scatter; a parameter replicated over them has its gradient
all-reduced once. Sizes are per device after any tensor-parallel split, which these
collectives never undo.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxtrain.sharding.batch_shards import without_batch_axes
from jaxtrain.sharding.mesh import TOKEN_AXES


@dataclasses.dataclass(frozen=True)
class IdealTraffic:
    """Bytes per device per step: gathered parameters, reduce-scattered and all-reduced
    gradients."""

    gather: int
    reduce_scatter: int
    all_reduce: int

    @property
    def total(self) -> int:
        return self.gather + self.reduce_scatter + self.all_reduce


def zero_ideal(
    abstract_params: Any, shardings: Any, gather_itemsize: int, reduce_itemsize: int
) -> IdealTraffic:
    """ZeRO's traffic for parameters laid out by ``shardings``: gathers at
    ``gather_itemsize`` bytes per element (the compute dtype), reductions at
    ``reduce_itemsize`` (the gradient reduction dtype)."""
    gather = scatter = reduce = 0
    for leaf, sharding in zip(
        jax.tree.leaves(abstract_params), jax.tree.leaves(shardings), strict=True
    ):
        spec, sharded = without_batch_axes(sharding.spec, TOKEN_AXES)
        mesh = sharding.mesh
        token_ways = math.prod(mesh.shape[a] for a in TOKEN_AXES)
        elements = math.prod(NamedSharding(mesh, spec).shard_shape(leaf.shape))
        if sharded:
            gather += 2 * elements * gather_itemsize
            scatter += elements * reduce_itemsize
        elif token_ways > 1:
            reduce += elements * reduce_itemsize
    return IdealTraffic(gather, scatter, reduce)


def itemsize(dtype: Any) -> int:
    return np.dtype(dtype).itemsize
