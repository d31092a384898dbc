"""The jaxtrain side of the throughput benchmark: time compiled train steps on CPU.

Run by ``benchmarks/throughput.py`` in its own process, because the simulated device
count (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) must be in the
environment before jax is imported. It uses the program API, not the CLI, so only the
steps are timed: mesh -> program -> init state -> compile -> warm-up -> timed steps.
Prints one JSON object on the last line of stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import numpy as np

from jaxtrain.config import load
from jaxtrain.errors import UserError
from jaxtrain.hostmem import reexec
from jaxtrain.metrics import count_params, peak_flops
from jaxtrain.sharding.mesh import make_mesh
from jaxtrain.train.program import build_program

PRESET_OVERRIDES = {
    "fsdp": ["mesh.preset=fsdp", "mesh.data=1", "mesh.fsdp=-1"],
    "dp": ["mesh.preset=dp", "mesh.data=-1", "mesh.fsdp=1"],
}


def random_batches(n: int, rows: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """``n`` host batches of uniform random token ids: {"inputs", "targets"}: [B, L] int32."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        tokens = rng.integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int32)
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    return batches


def run(
    config: str,
    preset: str,
    steps: int,
    warmup: int,
    profile: str | None,
    overrides: tuple[str, ...] = (),
) -> dict:
    """Compile and time the train step; return the raw measurements."""
    cfg = load(config, [*PRESET_OVERRIDES[preset], *overrides])
    mesh = make_mesh(cfg)
    program = build_program(cfg, mesh)
    n_params = count_params(program.spec.abstract_params)
    state = program.init_state()
    compiled, compile_s = program.compile()

    rows, seq_len = cfg.train.global_batch, cfg.data.seq_len
    extra = 2 if profile else 0
    host = random_batches(warmup + steps + extra, rows, seq_len, cfg.model.vocab_size, seed=0)
    # Placed before timing: the peer also builds its batches outside the timed region.
    batches = [jax.device_put(b, program.batch_sharding) for b in host]
    jax.block_until_ready(batches)

    times, losses, usage = [], [], []
    for i in range(warmup + steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        losses.append(float(metrics["loss"]))
        # The process's CPU time (all threads) and minor page faults during the step.
        usage.append(
            {
                "user_s": after.ru_utime - before.ru_utime,
                "sys_s": after.ru_stime - before.ru_stime,
                "minor_faults": after.ru_minflt - before.ru_minflt,
            }
        )
        print(
            f"jaxtrain step {i + 1}: {times[-1]:.3f}s loss {losses[-1]:.4f} "
            f"(cpu user {usage[-1]['user_s']:.2f}s sys {usage[-1]['sys_s']:.2f}s, "
            f"{usage[-1]['minor_faults']} minor faults)",
            file=sys.stderr,
        )

    if profile:
        jax.profiler.start_trace(profile)
        for batch in batches[-extra:]:
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        jax.profiler.stop_trace()
        print(f"jaxtrain: profile of {extra} steps written to {profile}", file=sys.stderr)

    timed = times[warmup:]
    return {
        "framework": "jaxtrain",
        "devices": len(jax.devices()),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "preset": cfg.mesh.preset,
        "n_params": n_params,
        "tokens_per_step": rows * seq_len,
        "compile_s": compile_s,
        "step_s": statistics.median(timed),
        "step_times_s": times,
        "step_usage": usage,
        "warmup": warmup,
        "losses": losses,
        # The process's peak resident memory (Linux reports KiB).
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "peak_flops": None if jax.default_backend() == "cpu" else peak_flops(jax.devices()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--preset", choices=sorted(PRESET_OVERRIDES), default="fsdp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", metavar="DIR", help="trace 2 extra steps into DIR")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if argv is None:  # a command line, as the jaxtrain CLI: before jax starts a backend
        try:
            reexec()
        except UserError as err:
            raise SystemExit(f"jax_run: {err}") from None
    result = run(args.config, args.preset, args.steps, args.warmup, args.profile, tuple(args.set))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
