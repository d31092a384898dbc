"""Attention kernel throughput on one GPU: jaxtrain's Pallas flash attention against cuDNN's
fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``) and the plain
XLA reference, forward + backward, causal, bfloat16.

For each sequence length every implementation runs the same jitted function, the output
and its vjp against a fixed cotangent, and is timed as the median of ``--iters`` calls
after ``--warmup`` untimed ones. TFLOP/s counts the matmul FLOPs of causal attention
(Dao, 2023): forward 4 * B * N * L^2 * H / 2, backward 2.5x the forward. Ratios are
pallas / cudnn and pallas / xla (> 1: Pallas is faster). Each implementation's output and
gradients are also compared with the reference's (max |a - b| / max |b|).

    python benchmarks/attention_kernel.py                       # seq 2048, 4096, 8192; H 128
    python benchmarks/attention_kernel.py --seqs 4096 --kv-heads 4 --json out.json
    python benchmarks/attention_kernel.py --smoke               # tiny shapes, any backend

It refuses to run off GPU unless ``--smoke`` is given (Pallas then runs interpreted and
cuDNN reports an error, so only the plumbing is checked).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.kernels import BlockSizes, attention


def attention_flops(batch: int, length: int, heads: int, head_dim: int) -> float:
    """Forward + backward matmul FLOPs of causal self-attention."""
    forward = 4.0 * batch * heads * length * length * head_dim / 2
    return forward * 3.5


def make_step(impl: str, blocks: BlockSizes | None):
    """jit(q, k, v, cotangent -> (out, dq, dk, dv)) for one implementation."""
    if impl == "pallas" and blocks is not None:
        from jaxtrain.kernels import flash_attention

        fn = functools.partial(flash_attention, causal=True, block_sizes=blocks)
    else:
        fn = functools.partial(attention, causal=True, impl=impl)

    @jax.jit
    def step(q, k, v, cotangent):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, *pullback(cotangent)

    return step


def time_calls(step, args, warmup: int, iters: int) -> tuple[float, tuple]:
    """(median seconds per call, the last outputs)."""
    for _ in range(warmup):
        outs = jax.block_until_ready(step(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        outs = jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), outs


def relative_error(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run_length(args, length: int, blocks: BlockSizes | None) -> list[dict]:
    batch = max(1, args.tokens // length)
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    q = jax.random.normal(keys[0], (batch, length, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, args.kv_heads, args.head_dim), dtype)
    cotangent = jax.random.normal(keys[3], q.shape, dtype)
    flops = attention_flops(batch, length, args.heads, args.head_dim)
    rows = []
    for impl in args.impls:
        row = {"seq": length, "batch": batch, "impl": impl}
        try:
            seconds, outs = time_calls(
                make_step(impl, blocks), (q, k, v, cotangent), args.warmup, args.iters
            )
        except Exception as err:  # an impl that cannot run here is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            continue
        row |= {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "outs": outs}
        rows.append(row)
    ref_row = next((r for r in rows if r["impl"] == "xla" and "outs" in r), None)
    for row in rows:
        outs = row.pop("outs", None)
        if outs is not None and ref_row is not None and row is not ref_row:
            row["max_rel_err"] = max(
                relative_error(a, b) for a, b in zip(outs, ref_row["outs"], strict=True)
            )
    if ref_row is not None:
        ref_row.pop("outs", None)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="2048,4096,8192")
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", default="pallas,cudnn,xla")
    parser.add_argument("--blocks", default="", help="q,k,q_bwd,k_bwd (default per backend)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    args = parser.parse_args()
    args.impls = args.impls.split(",")
    # The xla reference is timed last and checked against; keep it in the list.
    args.impls = [i for i in args.impls if i != "xla"] + ["xla"]
    seqs = [int(s) for s in args.seqs.split(",")]
    if args.smoke:
        seqs, args.tokens, args.heads, args.kv_heads, args.head_dim = [64, 128], 256, 2, 1, 32
        args.warmup, args.iters = 1, 2
    backend = jax.default_backend()
    if backend != "gpu" and not args.smoke:
        print(f"attention_kernel.py needs a GPU (JAX runs on {backend}); --smoke to test")
        return 1
    blocks = BlockSizes(*map(int, args.blocks.split(","))) if args.blocks else None

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}")
    print(
        f"causal, {args.dtype}, heads {args.heads}, kv heads {args.kv_heads}, head dim "
        f"{args.head_dim}, {args.tokens} tokens per call; fwd+bwd, median of {args.iters}"
    )
    results = []
    header = f"{'seq':>6} {'batch':>5} {'impl':>7} {'ms':>9} {'TFLOP/s':>8} {'max rel err':>11}"
    print(header)
    for length in seqs:
        rows = run_length(args, length, blocks)
        results += rows
        for r in rows:
            if "error" in r:
                print(f"{r['seq']:>6} {r['batch']:>5} {r['impl']:>7}   error: {r['error']}")
                continue
            err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "ref"
            print(
                f"{r['seq']:>6} {r['batch']:>5} {r['impl']:>7} {r['ms']:>9.2f} "
                f"{r['tflops']:>8.1f} {err:>11}"
            )
        rate = {r["impl"]: r.get("tflops") for r in rows}
        for other in ("cudnn", "xla"):
            if rate.get("pallas") and rate.get(other):
                print(f"{'':>6} pallas / {other}: {rate['pallas'] / rate[other]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "args": vars(args), "rows": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
