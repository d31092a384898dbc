"""When a config does not fit its devices: try a few changes by compiling them.

The changes are tried from the cheapest in step time to the dearest, and the first whose
compiled step fits is the answer: shard the state over the data-parallel ways too (more
gathers, no more compute), rematerialise every layer (about a third more compute), split
the batch into more microbatches (smaller matmuls), split the model over more tensor
ways (activation collectives in every layer); then all of them at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxtrain import config as config_lib
from jaxtrain.config import Config
from jaxtrain.errors import UserError
from jaxtrain.plan.report import Plan


@dataclasses.dataclass(frozen=True)
class Change:
    """A candidate: what it does, as words and as ``--set`` overrides."""

    why: str
    overrides: tuple[str, ...]


def candidates(cfg: Config, n_devices: int) -> list[Change]:
    """The changes worth compiling for ``cfg`` on ``n_devices``, cheapest first."""
    out = []
    mesh, train = cfg.mesh, cfg.train
    sizes = cfg.check_devices(n_devices)  # config keys -> resolved axis sizes
    if sizes["data"] > 1 and mesh.preset in ("fsdp", "fsdp_tp"):
        ways = sizes["data"] * sizes["fsdp"]
        out.append(
            Change(
                "shard the state over the data ways too",
                ("mesh.data=1", f"mesh.fsdp={ways}", f"mesh.tensor={sizes['tensor']}"),
            )
        )
    if train.grad_accumulation == "local" and train.microbatches > 1:
        why = "accumulate gradients sharded (a reduction per microbatch)"
        out.append(Change(why, ("train.grad_accumulation=sharded",)))
    if mesh.preset in ("dp", "zero1"):
        out.append(Change("shard parameters and gradients too (ZeRO-3)", ("mesh.preset=fsdp",)))
    if cfg.model.remat != "full":
        out.append(Change("rematerialise every layer", ("model.remat=full",)))
    for factor in (2, 4):
        micro = train.microbatches * factor
        if train.global_batch % micro == 0:
            out.append(Change(f"{micro} microbatches", (f"train.microbatches={micro}",)))
    ways = sizes["sequence"] * 2
    if (
        cfg.model.family in config_lib.CONTEXT_FAMILIES
        and sizes["fsdp"] % 2 == 0
        and cfg.data.seq_len % (2 * ways) == 0
    ):  # activations' length split further; the devices come from fsdp
        out.append(
            Change(
                f"context parallel over {ways} (the length split)",
                (f"mesh.fsdp={sizes['fsdp'] // 2}", f"mesh.sequence={ways}"),
            )
        )
    tensor = sizes["tensor"] * 2
    split = ("mesh.preset=fsdp_tp",) if mesh.preset != "fsdp_tp" else ()
    if mesh.fsdp != -1 and -1 not in mesh.axis_sizes().values():
        split += ("mesh.fsdp=-1",)  # the new tensor ways' devices come from fsdp
    out.append(Change(f"tensor parallel over {tensor}", (*split, f"mesh.tensor={tensor}")))
    if len(out) > 1:
        every = tuple(
            o
            for change in out
            if not change.why.startswith("context parallel")  # takes its devices from fsdp
            for o in change.overrides
            if "microbatches" not in o
        )
        micro = next((c for c in reversed(out) if "microbatches" in c.why), None)
        combined = every + (micro.overrides if micro else ())
        out.append(Change("all of the above", tuple(dict.fromkeys(combined))))
    return out


def apply(cfg: Config, change: Change) -> Config:
    """``cfg`` with ``change``'s overrides."""
    return config_lib.from_dict(config_lib.apply_overrides(cfg.to_dict(), change.overrides))


def find_fit(
    cfg: Config,
    n_devices: int,
    hbm: int,
    measure: Callable[[Config], Plan],
    report: Callable[[str], None],
) -> tuple[Change, Plan] | None:
    """The cheapest candidate whose compiled step fits ``hbm``, or None; ``report`` hears
    about each try."""
    for change in candidates(cfg, n_devices):
        try:
            plan = measure(apply(cfg, change))
        except UserError as err:  # this layout does not apply to this model or mesh
            report(f"  {change.why}: not possible ({err})")
            continue
        report(f"  {change.why}: peak {plan.memory.peak / 2**30:.1f} GiB per device")
        if plan.fits(hbm):
            return change, plan
    return None
