"""Run a function on each device's local block of its arguments (``jax.shard_map``).

Compiler-opaque kernels (a Pallas or cuDNN attention call) cannot be partitioned by XLA's
SPMD pass: given global arrays it would gather them onto every device. Wrapping the call
in ``jax.shard_map`` over the mesh hands each device its own rows and heads instead. The
caller names the dimensions logically, as everywhere else in models; the rules table
turns them into mesh axes, so no model code spells a mesh axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jaxtrain.sharding.partition import ActivationSharding, Logical, partition_spec


def _is_logical(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, str | None) for n in x)


def per_shard(
    fn: Callable[..., Any],
    shard: Any,
    in_axes: Sequence[Logical | None],
    out_axes: Any,
    out_like: int | None = None,
    out_shapes: Any = None,
) -> Callable[..., Any]:
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
        out_axes: logical axes of the output; for a ``fn`` that returns a tree of
            arrays, a tree of the same structure with one logical tuple per array
            (``()`` for a scalar), and ``out_shapes`` must be given.
        out_like: the output has the shape of this positional argument (needed when
            ``fn`` uses collectives over the mesh's axes, which ``jax.eval_shape`` cannot
            trace outside the mapped region); default: traced with ``jax.eval_shape``.
        out_shapes: the output's (global) shapes, a tree like ``out_axes`` of anything
            with a ``shape``; instead of ``out_like``.

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
        if out_shapes is not None:
            out_spec = jax.tree.map(
                lambda axes, x: spec(axes, x.shape, "per_shard output"),
                out_axes,
                out_shapes,
                is_leaf=_is_logical,
            )
        else:
            out_shape = (
                args[out_like].shape if out_like is not None else jax.eval_shape(fn, *args).shape
            )
            out_spec = spec(out_axes, out_shape, "per_shard output")
        mapped = jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False
        )
        return mapped(*args)

    return wrapped


def _mesh_axes(shard: Any, *names: str) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the logical dimensions ``names`` are split over."""
    if not isinstance(shard, ActivationSharding) or shard.mesh is None or shard.rules is None:
        return ()
    axes: list[str] = []
    for name in names:
        mapped = shard.rules.lookup(name)
        for axis in (mapped,) if isinstance(mapped, str) else tuple(mapped or ()):
            if shard.mesh.shape[axis] > 1 and axis not in axes:
                axes.append(axis)
    return tuple(axes)


def ways(shard: Any, name: str) -> int:
    """How many devices split the logical dimension ``name`` (1 without a mesh)."""
    axes = _mesh_axes(shard, name)
    return math.prod(shard.mesh.shape[a] for a in axes) if axes else 1


def exchange(shard: Any, name: str) -> Callable[[jax.Array], jax.Array]:
    """Inside a :func:`per_shard` function: the all-to-all among the devices that split
    the logical dimension ``name``. ``x`` [N, ...] on each of those N devices sends its
    ``x[j]`` to the j-th of them and receives, at ``[i]``, what the i-th sent it. The
    identity when ``name`` is not split."""
    axes = _mesh_axes(shard, name)
    if not axes:
        return lambda x: x
    return lambda x: jax.lax.all_to_all(x, axes, 0, 0, tiled=True)


def gather(shard: Any, name: str, axis: int) -> Callable[[jax.Array], jax.Array]:
    """Inside a :func:`per_shard` function: the all-gather that makes dimension ``axis``,
    passed in split as the logical dimension ``name``, whole on every device. Its
    transpose, in the backward pass, is the reduce-scatter that leaves each device its
    own block of the gradient, so a weight gathered per layer inside a scan has its
    gradient reduced per layer too. The identity when ``name`` is not split."""
    axes = _mesh_axes(shard, name)
    if not axes:
        return lambda x: x
    return lambda x: jax.lax.all_gather(x, axes, axis=axis, tiled=True)


def mesh_sum(shard: Any, *names: str) -> Callable[[Any], Any]:
    """Inside a :func:`per_shard` function: sums a tree of arrays over the devices that
    split the logical dimensions ``names`` (``psum`` over their mesh axes), so a total
    over tokens split by ``batch`` and ``length`` is the whole batch's on every device.
    The identity without a mesh.
    """
    axes = _mesh_axes(shard, *names)
    if not axes:
        return lambda tree: tree
    return lambda tree: jax.tree.map(lambda x: jax.lax.psum(x, axes), tree)
