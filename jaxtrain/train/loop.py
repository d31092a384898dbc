"""The host loop: mesh -> data -> program -> state -> compile -> train (log, eval) -> save.

Everything device-side happens in the compiled step; this file only feeds it batches,
reads metrics back at logging steps (never every step, so dispatch stays asynchronous),
and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from rich.console import Console

from jaxtrain.config import Config
from jaxtrain.data import Loader, load_tokenizer, open_dataset
from jaxtrain.errors import UserError
from jaxtrain.metrics import (
    MetricsWriter,
    ProgressDisplay,
    count_params,
    flops_per_token,
    peak_flops,
)
from jaxtrain.sharding import make_mesh
from jaxtrain.train.program import Program, build_program


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a finished run leaves behind."""

    run_dir: Path
    metrics_path: Path
    tensorboard_dir: Path
    params_dir: Path
    final_loss: float
    eval_losses: dict[int, float]


def evaluate(program: Program, params: Any, loader: Loader, batches: int) -> float:
    """Mean validation loss per token over ``batches`` fixed validation batches."""
    total, count = 0.0, 0.0
    for index in range(batches):
        out = jax.device_get(program.eval_step(params, loader.eval_batch(index)))
        total += float(out["loss_sum"])
        count += float(out["count"])
    return total / count


def _memory_report(compiled: Any) -> str:
    stats = compiled.memory_analysis()
    if stats is None:
        return "memory analysis unavailable"
    mib = 1 / 2**20
    return (
        f"per device: arguments {stats.argument_size_in_bytes * mib:.1f} MiB, "
        f"outputs {stats.output_size_in_bytes * mib:.1f} MiB, "
        f"temporaries {stats.temp_size_in_bytes * mib:.1f} MiB, "
        f"aliased {stats.alias_size_in_bytes * mib:.1f} MiB"
    )


def _check_finite(first_step: int, pending: list[dict[str, Any]]) -> None:
    for offset, metrics in enumerate(pending):
        for key in ("loss", "grad_norm"):
            if not math.isfinite(float(metrics[key])):
                raise TrainingDiverged(
                    f"training diverged: {key} is {float(metrics[key])} at step "
                    f"{first_step + offset + 1}"
                )


def train(cfg: Config, console: Console | None = None) -> RunResult:
    """Run ``cfg`` to completion and return where its outputs are.

    Raises:
        UserError: for bad data paths, impossible layouts, or a diverged run.
    """
    console = console or Console(stderr=True)
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    mesh = make_mesh(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer})"
        )
    dataset = open_dataset(cfg.data.path, tokenizer)
    program = build_program(cfg, mesh)
    if is_main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    loader = Loader(
        dataset,
        seed=cfg.train.seed,
        global_batch=cfg.train.global_batch,
        seq_len=cfg.data.seq_len,
        sharding=program.batch_sharding,
    )

    n_params = count_params(program.spec.abstract_params)
    console.print(
        f"model: {n_params / 1e6:.2f}M parameters | mesh {dict(mesh.shape)} "
        f"({mesh.devices.size} {jax.devices()[0].platform} devices) | preset {cfg.mesh.preset} | "
        f"data: {dataset.source}",
        highlight=False,
    )
    state = program.init_state()
    compiled, compile_s = program.compile()
    console.print(f"compiled train step in {compile_s:.1f}s; {_memory_report(compiled)}")

    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    step_flops = flops_per_token(cfg.model, n_params, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(list(mesh.devices.flat))
    writer = MetricsWriter(run_dir, enabled=is_main)
    progress = ProgressDisplay(console, cfg.train.steps)
    eval_losses: dict[int, float] = {}
    pending: list[dict[str, Any]] = []
    last_loss = math.nan
    window_start, window_step = time.perf_counter(), 0
    try:
        for step in range(cfg.train.steps):
            state, metrics = compiled(state, loader.train_batch(step))
            pending.append(metrics)
            done = step + 1
            if done % cfg.train.log_every and done != cfg.train.steps:
                continue
            pending = jax.device_get(pending)
            _check_finite(done - len(pending), pending)
            elapsed = time.perf_counter() - window_start
            step_time = elapsed / (done - window_step)
            record = {k: float(v) for k, v in pending[-1].items()}
            record |= {
                "step_time_s": step_time,
                "tokens_per_sec": tokens_per_step / step_time,
                "mfu": step_flops / step_time / peak if peak else None,
            }
            every = cfg.train.eval_every
            if every and (done % every == 0 or done == cfg.train.steps):
                eval_losses[done] = record["eval_loss"] = evaluate(
                    program, state.params, loader, cfg.train.eval_batches
                )
                progress.note(f"step {done}: validation loss {record['eval_loss']:.4f}")
            writer.write(done, record)
            progress.update(done, record)
            last_loss = record["loss"]
            pending = []
            window_start, window_step = time.perf_counter(), done
    finally:
        progress.close()
        writer.close()

    params_dir = run_dir / "params"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, state.params, force=True)
    checkpointer.wait_until_finished()
    return RunResult(run_dir, writer.jsonl_path, writer.tb_dir, params_dir, last_loss, eval_losses)


def loss_curve(metrics_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) read back from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    return np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
