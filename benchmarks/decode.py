"""Greedy decode throughput of jaxtrain against HF transformers on the same CPU, in one run.

The benchmark shape is ``configs/bench-cpu.yaml`` (LLaMA, 8 layers, d_model 512, vocab
32000, float32). One random-init jaxtrain model is written as an HF directory with
jaxtrain's own exporter (``save_pretrained``, as ``jaxtrain export --format hf``) and read
back by transformers' ``LlamaForCausalLM`` (config from ``hf_peer.llama_config``), so both
sides hold the same weights and are fed the same random prompts (no padding, no EOS).

jaxtrain runs ``generate_tokens`` (prefill + a ``lax.while_loop`` of decode steps, one
XLA program per shape); transformers runs ``generate(do_sample=False,
cache_implementation="static")`` in eager float32 attention, with torch using the same
cores. Both run in this process; the repetitions alternate (jax, hf, jax, hf, ...) so
background load falls on both alike, and medians are reported. Per batch size:

- end to end: new tokens x batch / seconds of one whole call (prefill included);
- decode only: the same call with one new token is timed too (prefill + first token),
  and the difference, (new tokens - 1) x batch / (t_full - t_one), is the rate of the
  decode steps alone, measured the same way on both sides;
- vs HF: jaxtrain tokens/s / transformers tokens/s (> 1: jaxtrain is faster);
- agreement: the share of generated tokens both sides agree on, and the first step
  where a row differs (float32 rounding can flip a near-tie argmax; after that the
  continuations differ legitimately).

    python benchmarks/decode.py --batches 1,8 --prompt-len 128 --new-tokens 128 --reps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BENCH_CONFIG = str(HERE.parent / "configs" / "bench-cpu.yaml")
if str(HERE) not in sys.path:  # hf_peer is a sibling script, not a package module
    sys.path.append(str(HERE))

Runner = Callable[[], np.ndarray]  # one generate call -> [B, new] int tokens on the host


def build_models(config: str, overrides: list[str], threads: int) -> tuple:
    """(config, jaxtrain (graphdef, state), HF model, parameter count) with equal weights."""
    import torch
    from flax import nnx
    from hf_peer import llama_config
    from transformers import LlamaForCausalLM

    from jaxtrain import models
    from jaxtrain.config import load
    from jaxtrain.metrics import count_params

    cfg = load(config, overrides)
    torch.set_num_threads(threads)
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    hf_config = llama_config(cfg)
    hf_config.use_cache = True  # the training peer turns the cache off
    with tempfile.TemporaryDirectory() as tmp:
        models.save_pretrained(cfg.model, model, tmp)
        hf, info = LlamaForCausalLM.from_pretrained(
            tmp, config=hf_config, dtype=torch.float32, output_loading_info=True
        )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"the HF model did not take every exported weight: {bad}")
    hf.eval()
    # No EOS: every row makes exactly --new-tokens tokens on both sides.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = cfg.model.pad_id
    n_params = count_params(nnx.state(model, nnx.Param))
    graphdef, state = nnx.split(model)
    return cfg, (graphdef, state), hf, n_params


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[B, T] int32 random token ids in [1, vocab) (0 is the pad id)."""
    return np.random.default_rng(seed).integers(1, vocab, size=(batch, length), dtype=np.int32)


def jax_runner(model, prompts: np.ndarray, new: int, pad_id: int) -> tuple[Runner, float]:
    """One greedy ``generate_tokens`` call of ``new`` tokens, waited for, as host tokens;
    and the seconds it took to trace and compile it (the call then reuses the program)."""
    import jax

    from jaxtrain.generate.decode import generate_tokens
    from jaxtrain.generate.sampling import SamplingConfig

    graphdef, state = model
    rows = jax.device_put(prompts)
    pad = jax.device_put(np.zeros(len(prompts), np.int32))
    key = jax.random.PRNGKey(0)
    static = {"max_new": new, "sampling": SamplingConfig(greedy=True), "eos_id": None}
    static["pad_id"] = pad_id
    start = time.perf_counter()
    generate_tokens.lower(graphdef, state, rows, pad, key, **static).compile()
    compile_s = time.perf_counter() - start

    def run() -> np.ndarray:
        tokens, _ = generate_tokens(graphdef, state, rows, pad, key, **static)
        return np.asarray(jax.block_until_ready(tokens))

    return run, compile_s


def hf_runner(hf, prompts: np.ndarray, new: int) -> Runner:
    """One greedy ``generate`` call of ``new`` tokens with transformers' static cache."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new,
                cache_implementation="static",
            )
        return out[:, ids.shape[1] :].numpy()

    return run


def timed(run: Runner) -> tuple[float, np.ndarray]:
    """(seconds, tokens) of one call."""
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, tokens


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """How far the two sides' greedy tokens agree: [B, new] each."""
    same = ours == theirs
    first = [int(np.argmin(row)) if not row.all() else None for row in same]
    return {
        "equal_fraction": float(same.mean()),
        "rows_identical": int(same.all(axis=1).sum()),
        "rows": len(same),
        "first_difference": first,  # per row: step of the first differing token, or None
    }


def measure_batch(cfg, jax_model, hf, batch: int, args) -> dict:
    """Warm up, then time both sides alternately at one batch size; the raw result."""
    prompts = make_prompts(batch, args.prompt_len, cfg.model.vocab_size)
    pad_id = cfg.model.pad_id
    lengths = [args.new_tokens] + ([1] if args.decode_only else [])
    runners, compile_s = {}, {}
    for n in lengths:
        runners["jaxtrain", n], compile_s[n] = jax_runner(jax_model, prompts, n, pad_id)
        runners["hf", n] = hf_runner(hf, prompts, n)

    first_call, tokens = {}, {}
    for key, run in runners.items():  # warm-up: the first call of each shape, untimed
        first_call[key], tokens[key] = timed(run)
        print(f"batch {batch} warm-up {key}: {first_call[key]:.2f}s", file=sys.stderr)

    times: dict = {key: [] for key in runners}
    for rep in range(args.reps):
        for n in lengths:
            for side in ("jaxtrain", "hf"):
                seconds, _ = timed(runners[side, n])
                times[side, n].append(seconds)
                note = f"batch {batch} rep {rep + 1} {side} new={n}: {seconds:.3f}s"
                print(note, file=sys.stderr)

    new = args.new_tokens
    result = {"batch": batch, "agreement": agreement(tokens["jaxtrain", new], tokens["hf", new])}
    for side in ("jaxtrain", "hf"):
        full = statistics.median(times[side, new])
        row = {"times_s": times[side, new], "median_s": full, "tokens_per_s": batch * new / full}
        row["first_call_s"] = first_call[side, new]
        if side == "jaxtrain":
            row["compile_s"] = compile_s[new]
        if args.decode_only:
            one = statistics.median(times[side, 1])
            row |= {"one_token_times_s": times[side, 1], "one_token_median_s": one}
            if full > one:
                row["decode_tokens_per_s"] = batch * (new - 1) / (full - one)
        result[side] = row
    return result


def ratio(result: dict, field: str) -> float | None:
    ours, theirs = result["jaxtrain"].get(field), result["hf"].get(field)
    return ours / theirs if ours and theirs else None


def summary(results: list[dict], args) -> str:
    """A plain-text table: one row per (batch, side), ratios on the jaxtrain rows."""

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy, median of "
        f"{args.reps}; torch threads {args.threads}, {os.cpu_count()} cores",
        f"{'batch':>5}  {'run':<10}{'compile s':>10}{'s/call':>9}{'tokens/s':>10}{'vs HF':>7}"
        f"{'decode tokens/s':>17}{'vs HF':>7}",
    ]
    for r in results:
        for side in ("jaxtrain", "hf"):
            row, ours = r[side], side == "jaxtrain"
            lines.append(
                f"{r['batch']:>5}  {side:<10}{fmt(row['compile_s'] if ours else None, '.1f'):>10}"
                f"{row['median_s']:>9.3f}{row['tokens_per_s']:>10.1f}"
                f"{fmt(ratio(r, 'tokens_per_s') if ours else 1, '.2f'):>7}"
                f"{fmt(row.get('decode_tokens_per_s'), '.1f'):>17}"
                f"{fmt(ratio(r, 'decode_tokens_per_s') if ours else 1, '.2f'):>7}"
            )
        agree = r["agreement"]
        lines.append(
            f"{'':>7}greedy tokens equal: {100 * agree['equal_fraction']:.1f}%, "
            f"{agree['rows_identical']}/{agree['rows']} rows identical; first difference "
            f"per row: {agree['first_difference']}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=BENCH_CONFIG)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    parser.add_argument("--batches", default="1,8", help="batch sizes: 1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="timed calls per side and shape")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument(
        "--no-decode-only",
        dest="decode_only",
        action="store_false",
        help="skip the one-token calls (end-to-end rates only)",
    )
    parser.add_argument("--json", metavar="OUT", help="write all results to OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        from hf_peer import INSTALL_HINT

        raise SystemExit(f"decode.py needs {', '.join(missing)}: {INSTALL_HINT}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    import transformers

    cfg, jax_model, hf, n_params = build_models(args.config, args.set, args.threads)
    slots = args.prompt_len + args.new_tokens
    if slots > cfg.model.max_seq_len:
        raise SystemExit(f"prompt + new tokens = {slots} > model.max_seq_len")
    results = [measure_batch(cfg, jax_model, hf, int(b), args) for b in args.batches.split(",")]
    print(summary(results, args))
    if args.json:
        report = {
            "config": args.config,
            "overrides": args.set,
            "n_params": n_params,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.platform(),
            "jax_version": jax.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
