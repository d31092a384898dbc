"""``jaxtrain plan --remat``: the step compiled under every ``model.remat`` policy, so a
user picks by looking at what each costs in memory.

Recomputation is not free: ``none`` saves everything and recomputes nothing, ``full``
recomputes every block in the backward pass (about a third more FLOPs); the policies
between save some matmul outputs (``models/remat.py``). XLA:CPU has one memory, so on
simulated devices ``offload_dots`` shows what ``dots_saveable`` keeps; on GPU/TPU those
saved activations live in host memory instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from jaxtrain.config import REMAT_POLICIES, Config
from jaxtrain.plan.fit import Change, apply
from jaxtrain.plan.report import Plan
from jaxtrain.plan.sizes import size_text


def remat_rows(
    cfg: Config, measure: Callable[[Config], Plan], hbm: int | None
) -> list[dict[str, Any]]:
    """One row per policy: its temporaries and peak per device, and whether it fits."""
    rows = []
    for name in REMAT_POLICIES:
        plan = measure(apply(cfg, Change(name, (f"model.remat={name}",))))
        rows.append(
            {
                "remat": name,
                "temporaries": plan.memory.temporaries,
                "peak": plan.memory.peak,
                "fits": plan.fits(hbm) if hbm else None,
            }
        )
    return rows


def print_remat(rows: list[dict[str, Any]], console: Console, current: str, platform: str) -> None:
    table = Table(title="memory per device under each model.remat", title_justify="left")
    for column in ("model.remat", "temporaries", "peak", "fits"):
        table.add_column(column, justify="left" if column == "model.remat" else "right")
    for row in rows:
        fits = "-" if row["fits"] is None else ("yes" if row["fits"] else "no")
        table.add_row(
            row["remat"] + (" (this config)" if row["remat"] == current else ""),
            size_text(row["temporaries"]),
            size_text(row["peak"]),
            fits,
        )
    console.print(table)
    if platform == "cpu":
        console.print(
            "offload_dots keeps its saved activations in host memory on GPU/TPU; XLA:CPU has "
            "one memory, so on CPU devices it shows what dots_saveable keeps",
            style="dim",
            highlight=False,
        )
