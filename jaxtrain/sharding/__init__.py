"""Mesh, logical-axis rules and partitioning: the only package that names mesh axes."""

from jaxtrain.sharding.local import per_shard
from jaxtrain.sharding.mesh import BATCH_AXES, MESH_AXES, make_mesh
from jaxtrain.sharding.partition import (
    ActivationSharding,
    PlanRow,
    opt_axes,
    opt_state_shardings,
    param_logical_axes,
    partition_spec,
    path_str,
    plan_rows,
    tree_shardings,
)
from jaxtrain.sharding.rules import PRESETS, Rules, preset

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "PRESETS",
    "ActivationSharding",
    "PlanRow",
    "Rules",
    "make_mesh",
    "opt_axes",
    "opt_state_shardings",
    "param_logical_axes",
    "partition_spec",
    "path_str",
    "per_shard",
    "plan_rows",
    "preset",
    "tree_shardings",
]
