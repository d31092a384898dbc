"""Loss curves of FP8 training against bfloat16 on the default model (150 steps).

Trains the README's default model (``jaxtrain train``: the tiny LLaMA on the built-in
corpus) for 150 steps, evaluated every 50 (the default run before it was shortened to
100, so the figures in RESULTS.md reproduce), twice, one after the other: bfloat16
compute, then bfloat16 compute with the attention and MLP projections in float8
(``model.fp8``, delayed scaling; XLA emulates float8 on a CPU, so only the numbers are
meaningful here, not the time). Prints the training loss at every logged step, the
validation losses, and the largest relative gap between the curves.

    python benchmarks/fp8_curve.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from throughput import child_env

# The default run as these curves were first measured: 150 steps, evaluated every 50.
LENGTH = ["train.steps=150", "train.eval_every=50"]

RUNS = {
    "bfloat16": ["model.compute_dtype=bfloat16"],
    "bfloat16 + fp8": ["model.compute_dtype=bfloat16", "model.fp8=true"],
}


def train(name: str, overrides: list[str], run_dir: Path, extra: list[str]) -> list[dict]:
    """Run ``jaxtrain train`` with ``overrides`` into ``run_dir``; its metrics rows."""
    print(f"--- {name}", file=sys.stderr, flush=True)
    sets = [a for o in [*LENGTH, *overrides, *extra, f"run.dir={run_dir}"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "jaxtrain.cli", "train", "--no-sample", *sets]
    subprocess.run(cmd, env=child_env(1), check=True, stdout=subprocess.DEVNULL)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--json", metavar="OUT", help="write both curves to OUT")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            name: train(name, overrides, Path(tmp) / str(i), args.set)
            for i, (name, overrides) in enumerate(RUNS.items())
        }
    (base, base_rows), (fp8, fp8_rows) = rows.items()
    losses = [{r["step"]: r["loss"] for r in runs if "loss" in r} for runs in (base_rows, fp8_rows)]
    evals = [
        {r["step"]: r["eval_loss"] for r in runs if "eval_loss" in r} for runs in rows.values()
    ]
    steps = sorted(set(losses[0]) & set(losses[1]))
    print(f"{'step':>6}{base:>12}{fp8:>16}{'gap':>10}")
    gaps = []
    for step in steps:
        a, b = losses[0][step], losses[1][step]
        gaps.append(abs(b - a) / a)
        print(f"{step:>6}{a:>12.4f}{b:>16.4f}{gaps[-1]:>10.2%}")
    for step in sorted(set(evals[0]) & set(evals[1])):
        a, b = evals[0][step], evals[1][step]
        print(f"validation at step {step}: {base} {a:.4f}, {fp8} {b:.4f} ({(b - a) / a:+.2%})")
    print(f"largest gap between the training curves: {max(gaps):.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
