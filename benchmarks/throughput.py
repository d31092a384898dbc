"""Training throughput of jaxtrain against HF transformers on the same CPU, in one run.

The benchmark shape is ``configs/bench-cpu.yaml``: 8 layers, d_model 512, 8 heads, MLP
1408, vocab 32000, sequence 512, global batch 8, float32, AdamW, untied embeddings.
Each framework trains it for a few steps in its own subprocess, one after the other so
they never compete for cores; jaxtrain runs once per simulated device count. Reported
per run: median seconds per step after warm-up, tokens/s, MFU and the throughput ratio
jaxtrain / HF (> 1 means jaxtrain is faster). MFU uses jaxtrain's model-FLOPs formula
(Chowdhery et al., 2022, appendix B) for both and the host's float32 matmul peak,
measured once here before the subprocesses start.

    python benchmarks/throughput.py --steps 5 --warmup 2 --devices 1,8 --json out.json

On a GPU machine, ``--backend gpu`` runs both sides on the first GPU instead, on any
config (``--config``, ``--set KEY=VALUE``): HF with PyTorch's fused SDPA attention and,
when the config computes in bfloat16, ``torch.autocast`` over float32 weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_CONFIG = str(HERE.parent / "configs" / "bench-cpu.yaml")
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def child_env(devices: int | None, backend: str = "cpu") -> dict[str, str]:
    """The environment of a subprocess: jax on ``backend`` and, on CPU, ``devices``
    simulated devices."""
    platform = "cuda" if backend == "gpu" else os.environ.get("JAX_PLATFORMS", "cpu")
    env = dict(os.environ, JAX_PLATFORMS=platform)
    if devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={devices}"])
    return env


def run_child(name: str, argv: list[str], env: dict[str, str]) -> dict:
    """Run one side to completion; its last stdout line is its JSON result."""
    print(f"--- {name}", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [sys.executable, *argv], env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": f"{name} exited with code {proc.returncode} and no result"}
    if proc.returncode and "error" not in result:
        result["error"] = f"{name} exited with code {proc.returncode}"
    return {"name": name, **result}


def add_rates(result: dict, cfg, peak: float) -> None:
    """Fill in tokens/s, model FLOPs per step and MFU from the measured step time."""
    from jaxtrain.metrics import flops_per_token

    if "step_s" not in result:
        return
    step_flops = flops_per_token(cfg.model, result["n_params"], cfg.data.seq_len)
    step_flops *= result["tokens_per_step"]
    result["tokens_per_s"] = result["tokens_per_step"] / result["step_s"]
    result["model_flops_per_step"] = step_flops
    result["mfu"] = step_flops / result["step_s"] / peak


def summary(results: list[dict], peak: float, backend: str = "cpu") -> str:
    """A plain-text table of the runs, with throughput relative to HF."""
    hf = next((r for r in results if r.get("framework") == "hf" and "step_s" in r), None)
    if backend == "gpu":
        lines = [f"GPU datasheet peak (jaxtrain.metrics.PEAK_FLOPS): {peak / 1e12:.0f} TFLOP/s"]
    else:
        lines = [f"CPU float32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({os.cpu_count()} cores)"]
    n_params = sorted({r["n_params"] for r in results if "n_params" in r})
    if len(n_params) > 1:
        lines.append(f"WARNING: the models differ in size: {n_params} parameters")
    lines += [
        f"{'run':<24}{'compile s':>10}{'s/step':>10}{'tokens/s':>11}{'MFU':>8}{'vs HF':>8}",
    ]
    for r in results:
        if "step_s" not in r:
            lines.append(f"{r['name']:<24}{r.get('skipped') or r.get('error')}")
            continue
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}" if hf else "-"
        lines.append(
            f"{r['name']:<24}{compile_s:>10}{r['step_s']:>10.3f}{r['tokens_per_s']:>11,.0f}"
            f"{100 * r['mfu']:>7.1f}%{ratio:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=BENCH_CONFIG)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--only", choices=["jax", "hf"], help="run one side only")
    parser.add_argument("--devices", default="1,8", help="jaxtrain CPU device counts: 1,8")
    parser.add_argument("--preset", choices=["fsdp", "dp"], default="fsdp")
    parser.add_argument("--profile", metavar="DIR", help="jax.profiler trace of 2 steps")
    parser.add_argument("--json", metavar="OUT", help="write all results to OUT")
    parser.add_argument(
        "--backend",
        choices=["cpu", "gpu"],
        default="cpu",
        help="gpu: both sides on the first GPU (HF with SDPA attention and autocast when "
        "the config computes in bfloat16); MFU against the datasheet peak",
    )
    parser.add_argument(
        "--hf-tbb",
        action="store_true",
        help="also run HF with oneTBB's allocator preloaded, as JAXTRAIN_HOST_MALLOC=tbb "
        "gives jaxtrain (needs the tbb package); ratios stay against plain HF",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    devices = [int(d) for d in args.devices.split(",")] if args.backend == "cpu" else [None]

    # The peak probe runs in this process, before any subprocess starts, on CPU; on GPU
    # the jaxtrain side reports the device's datasheet peak.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxtrain.config import load
    from jaxtrain.errors import UserError
    from jaxtrain.hostmem import tbb_env
    from jaxtrain.metrics import measure_cpu_peak

    cfg = load(args.config, args.set)
    peak = measure_cpu_peak() if args.backend == "cpu" else None
    common = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += [f"--set={s}" for s in args.set]

    results = []
    if args.only != "jax":
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            hint = "pip install torch==2.13.0 transformers"
            skipped = f"skipped: {', '.join(missing)} not installed ({hint})"
            results.append({"name": "HF transformers", "framework": "hf", "skipped": skipped})
        else:
            argv_hf = [str(HERE / "hf_peer.py"), *common]
            if args.backend == "gpu":
                argv_hf.append("--device=cuda")
            results.append(run_child("HF transformers", argv_hf, child_env(None, args.backend)))
            if args.hf_tbb:
                env = child_env(None, args.backend)
                try:
                    env = tbb_env(env) or env
                except UserError as err:
                    raise SystemExit(f"throughput: --hf-tbb: {err}") from None
                results.append(run_child("HF + oneTBB malloc", argv_hf, env))
    if args.only != "hf":
        for n in devices:
            argv_jax = [str(HERE / "jax_run.py"), *common, "--preset", args.preset]
            if args.profile:
                argv_jax += ["--profile", str(Path(args.profile) / f"devices-{n}")]
            name = f"jaxtrain {args.preset} x{n}" if n else f"jaxtrain {args.backend}"
            results.append(run_child(name, argv_jax, child_env(n, args.backend)))
    if peak is None:
        peak = next((r["peak_flops"] for r in results if r.get("peak_flops")), None)
        if peak is None:
            print("no peak FLOP/s known for this GPU: MFU is left out", file=sys.stderr)
            peak = float("nan")
    for r in results:
        add_rates(r, cfg, peak)

    print(summary(results, peak, args.backend))
    if args.json:
        report = {
            "config": args.config,
            "steps": args.steps,
            "warmup": args.warmup,
            "backend": args.backend,
            "overrides": args.set,
            "peak_flops": peak,
            "cpu_count": os.cpu_count(),
            "machine": platform.platform(),
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
