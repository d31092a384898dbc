"""The sharding table: where every parameter and optimizer-state array lives.

One row per array (path, shape, dtype, PartitionSpec, bytes per device) and the totals,
computed from abstract shapes only, so it works for models far larger than the machine.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from jaxtrain.config import Config
from jaxtrain.plan.sizes import size_text
from jaxtrain.sharding import PlanRow, make_mesh, plan_rows
from jaxtrain.train.program import Program, build_program


def state_plan(program: Program) -> tuple[list[PlanRow], list[PlanRow]]:
    """Rows for the parameters and for the optimizer state."""
    state, shardings = program.abstract_state, program.state_shardings
    return (
        plan_rows(state.params, shardings.params),
        plan_rows(state.opt_state, shardings.opt_state),
    )


def print_plan(cfg: Config, console: Console) -> Program:
    """Resolve ``cfg`` on the current devices and print its sharding plan."""
    program = build_program(cfg, make_mesh(cfg))
    params, opt = state_plan(program)
    table = Table(title=f"sharding plan: preset {cfg.mesh.preset}, mesh {dict(program.mesh.shape)}")
    for column in ("parameter", "shape", "dtype", "PartitionSpec", "per device"):
        table.add_column(column, justify="right" if column == "per device" else "left")
    for row in params:
        table.add_row(
            row.path,
            str(row.shape),
            row.dtype,
            str(tuple(row.spec)),
            size_text(row.bytes_per_device),
        )
    console.print(table)
    for name, rows in (("parameters", params), ("optimizer state", opt)):
        total = sum(r.bytes_total for r in rows)
        per_device = sum(r.bytes_per_device for r in rows)
        console.print(
            f"{name}: {size_text(total)} in total, {size_text(per_device)} per device",
            highlight=False,
        )
    return program
