"""Throughput, MFU and where metrics go: JSON lines, TensorBoard and the console.

Model FLOPs utilisation (MFU, Chowdhery et al., 2022, appendix B) = model FLOPs per step
/ step time / peak FLOP/s. Model FLOPs per token are 6 x (non-embedding parameters) for
the dense matmuls forward and backward, plus 12 x layers x attention width x length for
the attention scores. Peaks come from a table per accelerator; on CPU the peak is
measured once with a large float32 matmul.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxtrain.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, matched against ``device.device_kind`` (longest first).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6 lite": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
}


@functools.lru_cache(maxsize=1)
def measure_cpu_peak(size: int = 2048, repeats: int = 5) -> float:
    """The host's float32 matmul FLOP/s: the best of ``repeats`` ``size``-cubed matmuls."""
    device = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(devices: list[jax.Device]) -> float | None:
    """Peak FLOP/s of ``devices`` together; None for an accelerator not in the table.

    Simulated CPU devices share one host, so a CPU mesh gets the host's measured peak.
    """
    if all(d.platform == "cpu" for d in devices):
        return measure_cpu_peak()
    total = 0.0
    for device in devices:
        kind = device.device_kind
        match = next((k for k in PEAK_FLOPS if k in kind), None)
        if match is None:
            return None
        total += PEAK_FLOPS[match]
    return total


def count_params(abstract_params: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))


def active_params(cfg: ModelConfig, n_params: int) -> int:
    """The parameters one token passes through: all ``n_params`` of a dense model; with
    experts, k of each layer's E experts (Mixtral's "active parameters")."""
    moe = cfg.moe
    idle = moe.num_experts - moe.experts_per_token if moe.num_experts else 0
    return n_params - idle * 3 * cfg.d_model * moe.expert_mlp_dim * cfg.n_layers


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding active params + attention (PaLM's
    formula).

    The input embedding is a lookup, not a matmul, so it is excluded; a tied embedding
    is also the output projection, so then it is counted. Of a mixture of experts only
    the k experts a token is routed to count (:func:`active_params`).
    """
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * (active_params(cfg, n_params) - embedding) + attention


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the
    scalars to TensorBoard event files (tensorboardX; no TensorFlow needed).

    A resumed run passes ``purge_step`` (the step it restarts from): its event file
    starts with TensorBoard's purge marker, which hides the events an earlier process
    wrote for the steps that are redone, so no step appears twice.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        if not enabled:
            return
        self._jsonl = self.jsonl_path.open("a")
        self._tb = _summary_writer()(logdir=str(self.tb_dir), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _summary_writer() -> type:
    """tensorboardX's ``SummaryWriter``, imported without PyTorch. tensorboardX imports
    torch whenever it is installed (the ``hf`` extra), only to accept torch tensors; the
    scalars written here are floats, and importing torch would add about a second to
    every run's start."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).item()
    return value


class ProgressDisplay:
    """A live progress bar (loss, tokens/s, MFU) on a terminal; plain lines otherwise."""

    def __init__(self, console: Console, total: int, *, start: int = 0):
        self.console = console
        self.live = console.is_terminal
        self._bar = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, stats="")
            self._bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        mfu = metrics.get("mfu")
        stats = f"loss {metrics['loss']:.4f}  {metrics['tokens_per_sec']:,.0f} tok/s" + (
            f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""
        )
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        else:
            self.console.print(f"step {step}  {stats}  lr {metrics['lr']:.2e}", highlight=False)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
