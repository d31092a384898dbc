"""Run a function on each device's local block of its arguments (``jax.shard_map``).

Compiler-opaque kernels (a Pallas or cuDNN attention call) cannot be partitioned by XLA's
SPMD pass: given global arrays it would gather them onto every device. Wrapping the call
in ``jax.shard_map`` over the mesh hands each device its own rows and heads instead. The
caller names the dimensions logically, as everywhere else in models; the rules table
turns them into mesh axes, so no model code spells a mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jaxtrain.sharding.partition import ActivationSharding, Logical, partition_spec


def per_shard(
    fn: Callable[..., jax.Array],
    shard: Any,
    in_axes: Sequence[Logical | None],
    out_axes: Logical,
    out_like: int | None = None,
) -> Callable[..., jax.Array]:
    """``fn`` run per shard over ``shard``'s mesh, or ``fn`` itself when there is no mesh.

    ``fn`` must compute each output block from the matching input blocks alone, or with
    collectives over the mesh's axes (then give ``out_like``): it is called once per
    device on local arrays. Dimensions named ``None`` are whole on every
    device (the caller gathers them first), so naming the attention length ``None``
    keeps attention correct whatever the rules do with ``length``.

    Args:
        fn: a function of positional arrays (or ``None``s) returning one array.
        shard: the model's activation constraint; only an :class:`ActivationSharding`
            with a mesh shards, anything else (``no_shard``) means one device.
        in_axes: logical axes of each positional argument; ``None`` for an argument that
            is ``None``.
        out_axes: logical axes of the output.
        out_like: the output has the shape of this positional argument (needed when
            ``fn`` uses collectives over the mesh's axes, which ``jax.eval_shape`` cannot
            trace outside the mapped region); default: traced with ``jax.eval_shape``.

    Returns:
        A function with ``fn``'s signature.

    Raises:
        UserError: (when called) if a logical name is unknown or a dimension does not
            divide by its mesh axes.
    """
    if not isinstance(shard, ActivationSharding) or shard.mesh is None or shard.rules is None:
        return fn
    mesh, rules = shard.mesh, shard.rules

    def spec(axes: Logical, shape: Sequence[int], where: str) -> PartitionSpec:
        return partition_spec(axes, shape, mesh, rules, where=where)

    def wrapped(*args: jax.Array | None) -> jax.Array:
        if len(args) != len(in_axes):
            raise TypeError(f"per_shard: {len(args)} arguments for {len(in_axes)} in_axes")
        in_specs = tuple(
            None if x is None else spec(axes, x.shape, f"per_shard argument {i}")
            for i, (x, axes) in enumerate(zip(args, in_axes, strict=True))
        )
        out_shape = (
            args[out_like].shape if out_like is not None else jax.eval_shape(fn, *args).shape
        )
        out_spec = spec(out_axes, out_shape, "per_shard output")
        mapped = jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False
        )
        return mapped(*args)

    return wrapped
