"""``jaxtrain plan CONFIG [--devices N] [--hbm SIZE] [--json] [--params] [--remat]``.

Compiles the real train step for the config's mesh on N devices (simulated CPU devices
when N is given, by ``--devices`` or the config's ``target.devices``) and prints what it
needs per device and moves per step; nothing is trained and nothing is allocated. With
a memory size (``--hbm``, ``target.hbm_gib``, or for the devices present their own) it
says whether the step fits with 10% headroom and, when it does not, compiles a few
changes and names the cheapest that fits. ``--remat`` also compiles the step under every
``model.remat`` policy and compares their memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from rich.console import Console

from jaxtrain.config import Config
from jaxtrain.plan.devices import rerun_with_devices
from jaxtrain.plan.fit import find_fit
from jaxtrain.plan.render import print_memory, print_traffic, verdict
from jaxtrain.plan.report import Plan, make_plan
from jaxtrain.plan.sizes import parse_size


def _measure(cfg: Config) -> Plan:
    from jaxtrain.sharding import make_mesh
    from jaxtrain.train.program import build_program

    return make_plan(build_program(cfg, make_mesh(cfg)))


def _memory_limit(hbm: str | None, cfg: Config, simulated: bool) -> int | None:
    if hbm is not None:
        return parse_size(hbm, "--hbm")
    if cfg.target.hbm_gib:
        return int(cfg.target.hbm_gib * 2**30)
    if simulated:
        return None
    import jax

    from jaxtrain.train.loop import device_memory

    return device_memory(jax.devices())


def plan_command(
    cfg: Config,
    argv: Sequence[str],
    console: Console,
    *,
    devices: int | None = None,
    hbm: str | None = None,
    as_json: bool = False,
    show_params: bool = False,
    compare_remat: bool = False,
) -> int:
    """Run ``jaxtrain plan``; ``argv`` is the command line, for a re-run on N devices."""
    n = cfg.target.devices if devices is None else devices
    if n:
        status = rerun_with_devices(n, argv)
        if status is not None:
            return status
    limit = _memory_limit(hbm, cfg, simulated=bool(n))
    if show_params:
        from jaxtrain.plan.table import print_plan

        print_plan(cfg, console)
    plan = _measure(cfg)
    result = plan.to_json() | {"hbm_bytes": limit, "fits": None, "suggestion": None}
    if not as_json:
        print_memory(plan, console, limit)
        print_traffic(plan, console)
        console.print(f"compiled in {plan.compile_s:.0f}s", style="dim", highlight=False)
    if compare_remat:
        from jaxtrain.plan.remat import print_remat, remat_rows

        result["remat"] = remat_rows(cfg, _measure, limit)
        if not as_json:
            print_remat(result["remat"], console, cfg.model.remat, plan.platform)
    if limit:
        result["fits"] = plan.fits(limit)
        if not as_json:
            console.print(verdict(plan, limit), highlight=False)
        if not plan.fits(limit):
            say = (lambda _: None) if as_json else (lambda s: console.print(s, highlight=False))
            say("trying changes, cheapest first:")
            found = find_fit(cfg, plan.devices, limit, _measure, say)
            if found:
                change, fitted = found
                sets = " ".join(f"--set {o}" for o in change.overrides)
                result["suggestion"] = {"change": change.why, "overrides": list(change.overrides)}
                result["suggestion"]["plan"] = fitted.to_json()
                say(f"cheapest change that fits: {change.why}: {sets}")
            else:
                say("none of these fit: use more devices or a smaller model, batch or sequence")
    if as_json:
        print(json.dumps(result, indent=2))
    return 0
