"""Step time of precision, offload and remat choices against float32 on the same CPU.

Each variant of the benchmark shape (``configs/bench-cpu.yaml``) trains a few steps in
its own subprocess (``jax_run.py``), one after another so they never compete for cores,
on one CPU device. Reported: median seconds per step after warm-up and the ratio to the
float32 run of the same invocation (> 1 means slower). This CPU has no native bfloat16
or float16 matmuls: XLA:CPU emulates them, so these rows show the cost of emulation
here, not what the formats gain on GPU/TPU (where `jaxtrain plan` shows their memory).

    python benchmarks/precision.py --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from throughput import BENCH_CONFIG, child_env, run_child

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "float32": [],
    "bfloat16 compute": ["model.compute_dtype=bfloat16"],
    "float16 + loss scaling": ["model.compute_dtype=float16"],
    "bfloat16 + fp8 matmuls": ["model.compute_dtype=bfloat16", "model.fp8=true"],
    "float32, opt state on host": ["train.offload=opt_state"],
    "float32, opt state + params on host": ["train.offload=opt_state+params"],
    "float32, remat full": ["model.remat=full"],
    "float32, remat save_qkvo_proj": ["model.remat=save_qkvo_proj"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=BENCH_CONFIG)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--only", action="append", choices=sorted(VARIANTS), help="variants")
    parser.add_argument("--json", metavar="OUT", help="write all results to OUT")
    args = parser.parse_args(argv)
    common = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    results = []
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only and name != "float32":
            continue
        sets = [a for o in overrides for a in ("--set", o)]
        results.append(run_child(name, [str(HERE / "jax_run.py"), *common, *sets], child_env(1)))
    base = results[0].get("step_s")
    print(f"{'variant':<38}{'compile s':>10}{'s/step':>10}{'vs float32':>12}{'final loss':>12}")
    for r in results:
        if "step_s" not in r:
            print(f"{r['name']:<38}{r.get('error')}")
            continue
        ratio = f"{r['step_s'] / base:.2f}x" if base else "-"
        print(
            f"{r['name']:<38}{r['compile_s']:>10.1f}{r['step_s']:>10.2f}{ratio:>12}"
            f"{r['losses'][-1]:>12.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all("step_s" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
