"""How much host time per step the batch prefetch hides: the loop with and without it.

Builds the program of the benchmark shape (``configs/bench-cpu.yaml``: 8 layers, width
512, vocab 32000, sequence 512, global batch 8) and its loader over the built-in corpus,
compiles the step once, then drives it as ``jaxtrain.train.loop`` does (asynchronous
dispatch, metrics read back every ``train.log_every`` steps) twice in this process: with
batches built between steps (``data.prefetch=0``, the peer) and built ahead in a
background thread (``--depth``, default 2). Reported per run: the host time per step
spent waiting for the batch (the time in ``Prefetcher.get``: mean and longest), the wall
time per step, and their ratios prefetch / peer; also one batch's build time on an idle
host, the most that prefetching can hide per step.

    python benchmarks/prefetch.py --steps 10 --warmup 2 --devices 1
    python benchmarks/prefetch.py --devices 8 --depth 4 --set data.packing=true
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_CONFIG = str(HERE.parent / "configs" / "bench-cpu.yaml")
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def drive(compiled, state, batches, steps: range, log_every: int) -> tuple[object, dict]:
    """Run ``steps`` like the host loop; return the state and per-step timings."""
    import jax

    waits, pending = [], []
    start = time.perf_counter()
    for step in steps:
        before = time.perf_counter()
        batch = batches.get(step)
        waits.append(time.perf_counter() - before)
        state, metrics = compiled(state, batch)
        pending.append(metrics)
        if (step + 1) % log_every == 0 or step + 1 == steps.stop:
            pending = jax.device_get(pending)  # the loop's only sync point
            pending = []
    wall = time.perf_counter() - start
    timing = {"wait_s": statistics.mean(waits), "max_wait_s": max(waits)}
    return state, timing | {"step_s": wall / len(steps)}


def measure(args: argparse.Namespace) -> dict:
    """Compile once, then time the peer (no prefetch) and the prefetched loop."""
    import jax

    from jaxtrain.config import load
    from jaxtrain.data import Prefetcher, load_tokenizer, open_dataset
    from jaxtrain.sharding import make_mesh
    from jaxtrain.train import build_program

    cfg = load(args.config, args.set)
    mesh = make_mesh(cfg)
    program = build_program(cfg, mesh)
    dataset = open_dataset(cfg.data.path, load_tokenizer(cfg.data.tokenizer))
    loader = program.loader(dataset)
    state = program.init_state()
    compiled, compile_s = program.compile()

    builds = []
    for step in range(5):  # one batch on an idle host: the most prefetch can hide
        before = time.perf_counter()
        jax.block_until_ready(loader.train_batch(step))
        builds.append(time.perf_counter() - before)

    runs: dict[int, list[dict]] = {0: [], args.depth: []}
    first = 0
    for _ in range(args.rounds):  # alternate, so neither side always runs first
        for depth in runs:
            steps = range(first, first + args.warmup + args.steps)
            with Prefetcher(loader.train_batch, steps.start, steps.stop, depth) as batches:
                warm = range(steps.start, steps.start + args.warmup)
                state, _ = drive(compiled, state, batches, warm, cfg.train.log_every)
                timed = range(warm.stop, steps.stop)
                state, timing = drive(compiled, state, batches, timed, cfg.train.log_every)
            runs[depth].append(timing)
            first = steps.stop
            print(f"depth {depth}: {timing}", file=sys.stderr, flush=True)

    def median(depth: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[depth])

    return {
        "config": args.config,
        "overrides": args.set,
        "devices": len(jax.devices()),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "global_batch": cfg.train.global_batch,
        "seq_len": cfg.data.seq_len,
        "log_every": cfg.train.log_every,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "depth": args.depth,
        "compile_s": compile_s,
        "build_s": statistics.median(builds),
        "sync": {key: median(0, key) for key in runs[0][0]},
        "prefetch": {key: median(args.depth, key) for key in runs[0][0]},
        "runs": {str(depth): timings for depth, timings in runs.items()},
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
    }


def summary(result: dict) -> str:
    """The table: wait and step time per run, and prefetch / peer ratios."""
    sync, ahead = result["sync"], result["prefetch"]
    ms = 1e3
    lines = [
        f"{result['config']} {' '.join(result['overrides'])}".rstrip()
        + f" | {result['devices']} cpu device(s), mesh {result['mesh']}, "
        f"{result['cpu_count']} cores | batch {result['global_batch']} x {result['seq_len']}",
        f"{result['steps']} timed steps after {result['warmup']} warm-up, x{result['rounds']} "
        f"round(s); metrics read back every {result['log_every']} steps; compile "
        f"{result['compile_s']:.1f}s",
        f"one batch built on an idle host: {result['build_s'] * ms:.3f} ms",
        f"{'run':<24}{'wait ms/step':>14}{'max wait ms':>13}{'s/step':>10}",
        *(
            f"{name:<24}{r['wait_s'] * ms:>14.3f}{r['max_wait_s'] * ms:>13.3f}{r['step_s']:>10.3f}"
            for name, r in (("no prefetch (peer)", sync), (f"prefetch {result['depth']}", ahead))
        ),
        f"prefetch / peer: wait {ahead['wait_s'] / sync['wait_s']:.3f}x "
        f"({(sync['wait_s'] - ahead['wait_s']) * ms:.3f} ms/step hidden), "
        f"s/step {ahead['step_s'] / sync['step_s']:.3f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=BENCH_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="peer + prefetch pairs")
    parser.add_argument("--depth", type=int, default=2, help="batches built ahead")
    parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices")
    parser.add_argument("--json", metavar="OUT", help="write the result to OUT")
    args = parser.parse_args(argv)
    if args.depth < 1:
        parser.error("--depth must be >= 1 (0 is the peer)")

    # The simulated device count must be in the environment before jax starts.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={args.devices}"])
    result = measure(args)
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
