"""Pipeline parallelism on 8 simulated CPU devices: step time against the same model
without pipelining, and the bubble the schedule predicts against the one measured.

Every variant trains a few steps of the benchmark model (``configs/bench-cpu.yaml``, at
the batch and length below) in its own subprocess (``jax_run.py``), one after another,
on 8 simulated devices: the reference is ZeRO-3 over all 8 (``fsdp=8``, the whole batch
at once), each pipelined variant ``stage=S`` x ``fsdp=8/S`` with ``M`` microbatches, GPipe
(``R = 1``) or circular with ``R`` repeats (``mesh.pipeline_repeats``).

On simulated devices the 8 "devices" share this machine's cores, so a step's time is
the work of all of them together: a stage with no microbatch (the bubble) does not sit
idle, as it would on real accelerators, but computes on stand-ins, and that work is
what the measurement sees. The schedule predicts that ``(S-1)/(M R+S-1)`` of the
stage-ticks are bubble; the measured share is ``1 - reference / pipelined``, the part of
the pipelined step's time the unpipelined step does without. The two differ by what the
schedule leaves out: the embedding and LM head run on every stage (S copies), and the
activations' shifts between stages.

    XLA_FLAGS= python benchmarks/pipeline.py --steps 3 --warmup 1 --repeats 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from throughput import BENCH_CONFIG, child_env, run_child

from jaxtrain.models.pipeline import bubble_fraction

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=BENCH_CONFIG)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=64, help="train.global_batch")
    parser.add_argument("--seq", type=int, default=128, help="data.seq_len")
    parser.add_argument("--stages", default="2,4,8", help="comma-separated mesh.stage values")
    parser.add_argument("--microbatches", default="8,16", help="comma-separated counts")
    parser.add_argument(
        "--repeats", default="1", help="comma-separated mesh.pipeline_repeats values"
    )
    parser.add_argument("--json", metavar="OUT", help="write all results to OUT")
    args = parser.parse_args(argv)
    shape = [f"train.global_batch={args.batch}", f"data.seq_len={args.seq}"]
    common = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]

    def run(name: str, overrides: list[str]) -> dict:
        sets = [a for o in [*shape, *overrides] for a in ("--set", o)]
        return run_child(name, [str(HERE / "jax_run.py"), *common, *sets], child_env(8))

    reference = run("fsdp=8, no pipeline", ["mesh.fsdp=8"])
    rows = []
    grid = [
        (int(s), int(m), int(r))
        for s in args.stages.split(",")
        for r in args.repeats.split(",")
        for m in args.microbatches.split(",")
    ]
    for stages, micro, repeats in grid:
        overrides = [f"mesh.stage={stages}", f"mesh.fsdp={8 // stages}",
                     f"train.microbatches={micro}", f"mesh.pipeline_repeats={repeats}"]  # fmt: skip
        name = f"stage={stages} x fsdp={8 // stages}, {micro} microbatches"
        name += f", {repeats} repeats" if repeats > 1 else ""
        result = run(name, overrides)
        rows.append({**result, "stages": stages, "microbatches": micro, "repeats": repeats})
    base = reference.get("step_s")
    print(f"{'variant':<48}{'compile s':>10}{'s/step':>9}{'vs ref':>8}"
          f"{'bubble predicted':>18}{'measured':>10}")  # fmt: skip
    print(f"{reference['name']:<48}{reference.get('compile_s', 0):>10.1f}{base or 0:>9.2f}")
    for r in rows:
        if "step_s" not in r or not base:
            print(f"{r['name']:<48}{r.get('error', 'no reference')}")
            continue
        predicted = bubble_fraction(r["stages"], r["microbatches"], r["repeats"])
        measured = 1 - base / r["step_s"]
        print(
            f"{r['name']:<48}{r['compile_s']:>10.1f}{r['step_s']:>9.2f}"
            f"{r['step_s'] / base:>7.2f}x{predicted:>18.1%}{measured:>10.1%}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": reference, "pipelined": rows}))
    return 0 if base and all("step_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
