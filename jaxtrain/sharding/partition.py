"""Turn logical axis names into shardings: for a state, for activations, for a plan.

Everything here is driven by :mod:`jaxtrain.sharding.rules`; a logical name missing from
the table, or a dimension that its mesh axes do not divide, raises with the path of the
offending array so a bad layout fails before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.errors import UserError
from jaxtrain.sharding.rules import Rules

Logical = tuple[str | None, ...]


def path_str(path: Sequence[Any]) -> str:
    """``('blocks', 'attn', 'wq')`` or a jax key path -> ``blocks/attn/wq``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        parts.append(str(key))
    return "/".join(parts)


def param_logical_axes(state: nnx.State) -> dict:
    """The logical axes of every parameter, as a pure dict shaped like the parameters.

    Raises:
        ValueError: if a parameter carries no logical axes or the wrong number of them.
    """
    flat = {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding")
        if axes is None or len(axes) != np.ndim(var.get_value()):
            raise ValueError(f"{path_str(path)}: logical axes {axes} do not match its shape")
        flat[path] = tuple(axes)
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def partition_spec(
    axes: Logical, shape: Sequence[int], mesh: Mesh, rules: Rules, *, where: str, opt: bool = False
) -> PartitionSpec:
    """The PartitionSpec for an array with logical ``axes`` and ``shape``.

    Raises:
        UserError: for an unknown logical name, a mesh axis used twice, or a dimension
            not divisible by the product of its mesh axes.
    """
    spec, used = [], set()
    for dim, name in zip(shape, axes, strict=True):
        try:
            mesh_axes = rules.lookup(name, for_opt_state=opt)
        except KeyError:
            raise UserError(f"{where}: logical axis {name!r} is not in the rules table") from None
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        names = tuple(n for n in names if mesh.shape[n] > 1)
        if used & set(names):
            raise UserError(f"{where}: mesh axes {names} used twice in {axes}")
        used |= set(names)
        size = math.prod(mesh.shape[n] for n in names)
        if dim % size:
            raise UserError(
                f"{where}: dimension {name}={dim} is not divisible by mesh axes {names} "
                f"(size {size})"
            )
        spec.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*spec)


def tree_shardings(abstract: Any, logical: Any, mesh: Mesh, rules: Rules, *, opt=False) -> Any:
    """NamedShardings for a tree of arrays given a same-shaped tree of logical axes."""

    def one(path, leaf, axes):
        where = path_str(path)
        return NamedSharding(
            mesh, partition_spec(axes, leaf.shape, mesh, rules, where=where, opt=opt)
        )

    return jax.tree_util.tree_map_with_path(
        one, abstract, logical, is_leaf=lambda x: isinstance(x, tuple)
    )


def opt_axes(param_logical: dict) -> Callable[[Any, Any], Logical | None]:
    """``(path, leaf) -> axes``: the logical axes of an optax state's leaf. A leaf whose
    path ends with a parameter's path (``mu``, ``nu``, ...) and has its rank takes that
    parameter's axes; others (step counts) None."""
    flat_logical = {
        tuple(path_str([k]) for k in path): axes
        for path, axes in jax.tree_util.tree_flatten_with_path(
            param_logical, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    }
    depth = {len(p) for p in flat_logical}

    def axes(path: Any, leaf: Any) -> Logical | None:
        keys = tuple(path_str([k]) for k in path)
        for n in depth:
            found = flat_logical.get(keys[-n:])
            if found is not None and len(found) == leaf.ndim:
                return found
        return None

    return axes


def opt_state_shardings(abstract_opt: Any, param_logical: dict, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for an optax state: leaves with a parameter's axes (:func:`opt_axes`)
    are laid out by the optimizer-state rules; others (step counts) are replicated."""
    axes_of = opt_axes(param_logical)

    def one(path, leaf):
        axes = axes_of(path, leaf)
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        spec = partition_spec(axes, leaf.shape, mesh, rules, where=path_str(path), opt=True)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Constrains activations by logical names; the identity when there is no mesh.

    Models hold one of these and call it on hot activations, e.g.
    ``x = shard(x, ("batch", "length", "act_embed"))``, without knowing the mesh.
    ``pipeline_microbatches`` is how many microbatches a batch is split into to flow
    through the stacked layers when the rules split them over pipeline stages, and
    ``pipeline_repeats`` how many times each passes through the stages (circular).
    """

    mesh: Mesh | None = None
    rules: Rules | None = None
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1

    def pipeline_stages(self) -> int:
        """How many pipeline stages the rules split the stacked ``layers`` into (1: none)."""
        if self.mesh is None or self.rules is None:
            return 1
        axes = self.rules.lookup("layers")
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return math.prod(self.mesh.shape.get(a, 1) for a in names)

    def __call__(self, x: jax.Array, axes: Logical) -> jax.Array:
        if self.mesh is None or self.rules is None:
            return x
        spec = partition_spec(axes, x.shape, self.mesh, self.rules, where="activation")
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


@dataclasses.dataclass(frozen=True)
class PlanRow:
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec
    bytes_total: int
    bytes_per_device: int


def plan_rows(abstract: Any, shardings: Any) -> list[PlanRow]:
    """One row per array: path, shape, dtype, PartitionSpec and bytes (total, per device)."""
    rows = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
        total = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        shard = sharding.shard_shape(leaf.shape)
        per_device = math.prod(shard) * np.dtype(leaf.dtype).itemsize
        rows.append(
            PlanRow(path_str(path), leaf.shape, str(leaf.dtype), sharding.spec, total, per_device)
        )
    return rows
