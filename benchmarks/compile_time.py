"""Where the train step's compile time goes: tracing, lowering and XLA compilation apart.

For each device count and depth of the benchmark shape (``configs/bench-cpu.yaml``), a
fresh subprocess (the simulated device count must be set before jax starts, and no
compile may be served from an earlier one's caches) builds the program (config, mesh,
abstract state and shardings), then times ``train_step.trace`` (Python and JAX tracing
to a jaxpr), ``.lower()`` (jaxpr to StableHLO, sharding annotations included) and
``.compile()`` (XLA: SPMD partitioning, optimisation, code generation) separately. It
also reports the size of what each phase hands on: jaxpr equations and StableHLO text.
Compile time is what a user waits for on every start and every restart of a run; with
scanned layers it should not grow with depth.

    python benchmarks/compile_time.py                          # 1 and 8 devices x 4 and 32 layers
    python benchmarks/compile_time.py --devices 8 --layers 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from throughput import child_env, run_child

SCRIPT = Path(__file__).resolve()


def child(layers: int, overrides: list[str]) -> dict:
    """Build the program and time its three phases (runs in the measured process)."""
    import jax

    from jaxtrain.config import load
    from jaxtrain.sharding.mesh import make_mesh
    from jaxtrain.train.program import build_program

    start = time.perf_counter()
    cfg = load("bench-cpu", [f"model.n_layers={layers}", *overrides])
    program = build_program(cfg, make_mesh(cfg))
    state, batch = program.abstract_state, program.abstract_batch()
    built = time.perf_counter()
    traced = program.train_step.trace(state, batch)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
    return {
        "devices": jax.device_count(),
        "layers": layers,
        "build_s": built - start,
        "trace_s": traced_at - built,
        "lower_s": lowered_at - traced_at,
        "compile_s": compiled_at - lowered_at,
        "total_s": compiled_at - start,
        "jaxpr_eqns": len(traced.jaxpr.eqns),
        "stablehlo_chars": len(lowered.as_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,8", help="simulated CPU device counts")
    parser.add_argument("--layers", default="4,32", help="model depths")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # layers, in a subprocess
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.overrides)))
        return 0

    sets = [a for item in args.overrides for a in ("--set", item)]
    results = []
    for devices in (int(d) for d in args.devices.split(",")):
        for layers in (int(n) for n in args.layers.split(",")):
            argv = [str(SCRIPT), "--child", str(layers), *sets]
            name = f"{devices} devices, {layers} layers"
            results.append(run_child(name, argv, child_env(devices)))
    print(
        f"{'devices':>7} {'layers':>6} {'build s':>8} {'trace s':>8} {'lower s':>8} "
        f"{'compile s':>9} {'total s':>8} {'jaxpr eqns':>10} {'StableHLO MB':>12}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['name']}: {r['error']}")
            continue
        print(
            f"{r['devices']:>7} {r['layers']:>6} {r['build_s']:>8.2f} {r['trace_s']:>8.2f} "
            f"{r['lower_s']:>8.2f} {r['compile_s']:>9.2f} {r['total_s']:>8.2f} "
            f"{r['jaxpr_eqns']:>10} {r['stablehlo_chars'] / 1e6:>12.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": args.overrides, "results": results}))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
