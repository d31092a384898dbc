"""The plan as a person reads it: a memory table, a traffic table and a verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from jaxtrain.plan.report import HEADROOM, Plan
from jaxtrain.plan.sizes import size_text


def _ratio(actual: int, ideal: int) -> str:
    return f"{actual / ideal:.2f}x" if ideal else "-"


def print_memory(plan: Plan, console: Console, hbm: int | None) -> None:
    mem = plan.memory
    title = (
        f"memory per device: preset {plan.preset}, mesh {plan.mesh}, {plan.devices} "
        f"{plan.platform} devices, {plan.microbatches} microbatch(es)"
        + (", gradients accumulated locally" if plan.accumulation == "local" else "")
        + (f", gradients sent in {plan.grad_comm}" if plan.grad_comm != "float32" else "")
        + (
            f", {plan.stages} pipeline stages"
            + (f" x {plan.repeats} repeats" if plan.repeats > 1 else "")
            + f" (bubble {plan.pipeline()['bubble']:.0%}; the "
            "temporaries hold each stage's inputs of every microbatch in flight)"
            if plan.stages > 1
            else ""
        )
    )
    table = Table(title=title, title_justify="left")
    table.add_column("category")
    table.add_column("per device", justify="right")
    table.add_column("what", style="dim")
    rows = [
        ("parameters", mem.parameters, "the state's parameters, as sharded"),
        ("optimizer state", mem.optimizer, "AdamW moments and count, as sharded"),
        ("gradients (f32)", mem.gradients, "accumulator/gradients; inside temporaries"),
        ("arguments", mem.arguments, "state + batch passed in"),
        ("outputs", mem.outputs, "new state + metrics"),
        ("donated", -mem.aliased, "outputs written over the donated state"),
        ("temporaries", mem.temporaries, "activations, logits, gradients (XLA analysis)"),
    ]
    if mem.host:
        rows[1] = ("optimizer state", mem.optimizer, "AdamW moments and count, in host memory")
        if mem.params_on_host:
            rows[0] = ("parameters", mem.parameters, "float32 masters, in host memory")
        rows.append(("in host memory", -mem.host, "the offloaded state: not in the peak"))
    for name, size, what in rows:
        table.add_row(name, size_text(size), what)
    share = f"{mem.peak / hbm:.0%} of {size_text(hbm)}" if hbm else "no --hbm given"
    table.add_row("peak", size_text(mem.peak), share, style="bold")
    console.print(table)


def print_traffic(plan: Plan, console: Console) -> None:
    table = Table(
        title="collectives per device per step (loops counted trip-count times)",
        title_justify="left",
    )
    for column in ("kind", "ops", "bytes (as compiled)", "bytes (program dtypes)"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, traffic in plan.traffic.items():
        if traffic.ops:
            table.add_row(
                kind, str(traffic.ops), size_text(traffic.bytes), size_text(traffic.program_bytes)
            )
    ideal = plan.ideal
    table.add_row(
        "total",
        "",
        size_text(sum(t.bytes for t in plan.traffic.values())),
        size_text(plan.moved),
        style="bold",
    )
    console.print(table)
    console.print(
        f"ZeRO ideal for this layout: {size_text(ideal.gather)} gathered (2 passes) + "
        f"{size_text(ideal.reduce_scatter)} reduce-scattered + {size_text(ideal.all_reduce)} "
        f"all-reduced (f32) = {size_text(ideal.total)}; this step moves "
        f"{_ratio(plan.moved, ideal.total)} that",
        highlight=False,
    )
    if plan.platform == "cpu":
        console.print(
            "(compiled by XLA:CPU: it widens bf16 collectives to f32 and writes a "
            "reduce-scatter as an all-reduce plus a slice)",
            style="dim",
            highlight=False,
        )
    if plan.platform == "cpu" and plan.memory.params_on_host:
        console.print(
            "(XLA:CPU has one memory: the device copies of offloaded parameters, one layer "
            "at a time in the layer scan, the rest of the model whole, and all of it for "
            "the update, need not be in these temporaries; on GPU or TPU they are)",
            style="dim",
            highlight=False,
        )
    if plan.platform == "cpu" and plan.experts:
        console.print(
            "(XLA:CPU has no grouped matmul: JAX computes each ragged_dot as a masked dense "
            "one over every local expert, so the experts' temporaries here are larger than "
            "on GPU or TPU, where ragged_dot is a grouped kernel)",
            style="dim",
            highlight=False,
        )


def verdict(plan: Plan, hbm: int) -> str:
    budget = HEADROOM * hbm
    if plan.fits(hbm):
        return (
            f"fits: peak {size_text(plan.memory.peak)} per device is within "
            f"{size_text(budget)} ({HEADROOM:.0%} of {size_text(hbm)})"
        )
    return (
        f"does not fit: peak {size_text(plan.memory.peak)} per device exceeds "
        f"{size_text(budget)} ({HEADROOM:.0%} of {size_text(hbm)})"
    )
