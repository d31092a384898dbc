"""The host loop: mesh -> data -> program -> restore or init -> compile -> train (log,
eval, checkpoint) -> save.

Everything device-side happens in the compiled step; this file only feeds it batches
(built ahead in a background thread, :class:`jaxtrain.data.Prefetcher`),
reads metrics back at logging and checkpoint steps (never every step, so dispatch stays
asynchronous), writes files, and turns SIGTERM/SIGINT into "checkpoint at the next step
boundary, then exit" (in a multi-process run, at a step every process agrees on).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from rich.console import Console

from jaxtrain.checkpoint import Checkpointer
from jaxtrain.config import Config
from jaxtrain.data import Loader, Prefetcher, check_dataset, load_tokenizer, open_dataset
from jaxtrain.env import env_float
from jaxtrain.errors import UserError
from jaxtrain.metrics import (
    MetricsWriter,
    ProgressDisplay,
    count_params,
    flops_per_token,
    peak_flops,
)
from jaxtrain.models.pipeline import bubble_fraction
from jaxtrain.sharding import make_mesh
from jaxtrain.train import layer_order
from jaxtrain.train.profile import StepProfiler
from jaxtrain.train.program import Program, build_program
from jaxtrain.train.rundir import RunDirectory, read_metrics

# Seconds to pause after every step. Only for tests that must interrupt a run at a
# chosen point from outside (a real SIGKILL or SIGTERM); unset in normal use.
STEP_DELAY_ENV = "JAXTRAIN_DEBUG_STEP_DELAY"


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a finished (or signal-stopped) run leaves behind."""

    run_dir: Path
    metrics_path: Path
    tensorboard_dir: Path
    params_dir: Path
    checkpoint_dir: Path
    final_loss: float
    eval_losses: dict[int, float]
    start_step: int
    end_step: int
    stopped_by_signal: str | None = None
    program: Program | None = None  # what trained it, and the trained parameters as
    params: Any = None  # they lie on the devices (for a sample; None when stopped)


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


def device_memory(devices: list[jax.Device]) -> int | None:
    """Bytes one of ``devices`` can hold: the accelerator's limit, or for (simulated) CPU
    devices an equal share of the host's RAM; None when unknown."""
    stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return ram // len(devices) if devices[0].platform == "cpu" else None


def step_peak(stats: Any) -> int:
    """A compiled step's peak bytes per device from XLA's memory analysis: arguments,
    outputs and temporaries, less the outputs written over donated arguments."""
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def check_fits(compiled: Any, devices: list[jax.Device]) -> None:
    """Refuse a step whose per-device memory (XLA's analysis) exceeds the device.

    Raises:
        UserError: naming the sizes, before any parameter is allocated.
    """
    stats, limit = compiled.memory_analysis(), device_memory(devices)
    if stats is None or limit is None:
        return
    need = step_peak(stats)
    if need > limit:
        gib = 2**30
        raise UserError(
            f"model: the compiled step needs {need / gib:.1f} GiB per device but each of the "
            f"{len(devices)} {devices[0].platform} devices holds {limit / gib:.1f} GiB; lower "
            "the model sizes (model.*), train.global_batch or data.seq_len, raise "
            "train.microbatches, or use more devices (`jaxtrain plan` shows where it goes)"
        )


def _overflows(state: Any) -> int:
    """The overflows counted so far by dynamic loss scaling (0 when it is off)."""
    return 0 if state.loss_scale is None else int(jax.device_get(state.loss_scale.overflows))


def _check_finite(first_step: int, pending: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    for offset, metrics in enumerate(pending):
        for key in keys:
            if not math.isfinite(float(metrics[key])):
                raise TrainingDiverged(
                    f"training diverged: {key} is {float(metrics[key])} at step "
                    f"{first_step + offset + 1}; no checkpoint was written of it"
                )


class StopSignals:
    """Turns SIGTERM/SIGINT into a stop at a step boundary, the same step on every process.

    One process: a Python handler records the signal and the loop stops after the step it
    is in. Several processes: JAX's preemption service owns SIGTERM; its notice reaches
    every process, which agree on the step to stop at through
    ``multihost_utils.reached_preemption_sync_point`` (the newest step any process has
    reached, plus one). SIGINT is turned into the same notice.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._multi = jax.process_count() > 1
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            sigs = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
            for sig in sigs:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self._multi:
            signal.raise_signal(signal.SIGTERM)  # becomes the preemption service's notice
        else:
            self.received = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop after ``step``; every process calls it each step."""
        if self._multi and multihost_utils.reached_preemption_sync_point(step):
            self.received = "a preemption notice (SIGTERM or SIGINT to a process)"
        return self.received is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, console: Console | None = None) -> RunResult:
    """Run ``cfg`` to completion (resuming its run directory) and return its outputs.

    Raises:
        UserError: for bad data paths, impossible layouts, unreadable checkpoints, or a
            diverged run.
    """
    console = console or Console(stderr=True)
    if jax.process_index() != 0:
        console = Console(quiet=True)  # one process speaks for the run
    run = RunDirectory(cfg.run.dir, console)
    run.check(cfg.checkpoint.resume)  # nothing is written before the run can start
    delay = env_float(STEP_DELAY_ENV, 0.0, minimum=0.0)
    is_main = jax.process_index() == 0

    mesh = make_mesh(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer, eos_id=cfg.data.eos_id)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer})"
        )
    dataset = open_dataset(cfg.data.path, tokenizer)
    check_dataset(dataset, cfg.model.vocab_size)
    program = build_program(cfg, mesh)
    loader = program.loader(dataset)
    n_params = count_params(program.spec.abstract_params)
    console.print(
        f"model: {n_params / 1e6:.2f}M parameters | mesh {dict(mesh.shape)} "
        f"({mesh.devices.size} {jax.devices()[0].platform} devices) | preset {cfg.mesh.preset} | "
        f"data: {dataset.source}",
        highlight=False,
    )
    if program.spec.stages > 1:
        stages, micro = program.pipeline_schedule()
        repeats = program.spec.repeats
        kind = f"circular, {repeats} repeats" if repeats > 1 else "GPipe"
        console.print(
            f"pipeline: {stages} stages x {micro} microbatches ({kind}): bubble "
            f"(S-1)/(M*R+S-1) = {bubble_fraction(stages, micro, repeats):.1%} of stage time",
            highlight=False,
        )

    # Compiled before any state exists, so a step that cannot fit is refused unallocated.
    compiled, compile_s = program.compile()
    console.print(f"compiled train step in {compile_s:.1f}s; {_memory_report(compiled)}")
    check_fits(compiled, jax.local_devices())

    with Checkpointer(run.checkpoints, cfg.checkpoint) as checkpointer:
        restored = None
        if cfg.checkpoint.resume:
            restored = checkpointer.restore_latest(program.abstract_state, console, config=cfg)
        start = 0 if restored is None else int(restored[1]["step"])
        run.check_start(start, cfg.train.steps)
        if restored is None:
            state = program.init_state()
        else:
            state = program.adopt(*restored)
            console.print(f"resumed from {checkpointer.directory / str(start)} (step {start})")
        if is_main:
            run.claim(cfg, start)

        order = layer_order.record(program.spec.layout())  # of the saved stacked layers
        tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        step_flops = flops_per_token(cfg.model, n_params, cfg.data.seq_len) * tokens_per_step
        peak = peak_flops(list(mesh.devices.flat))
        # Events of the steps after ``start`` that an earlier process logged are redone.
        writer = MetricsWriter(run.path, enabled=is_main, purge_step=start + 1 if start else None)
        progress = ProgressDisplay(console, cfg.train.steps)
        eval_losses: dict[int, float] = {}
        pending: list[dict[str, Any]] = []
        last_loss, done = math.nan, start
        window_start, window_step = time.perf_counter(), start
        every, eval_every = cfg.checkpoint.every, cfg.train.eval_every
        skipping = cfg.train.on_nonfinite == "skip"
        # Skipped updates leave the parameters finite; a non-finite norm then is a real fault.
        # Under loss scaling non-finite gradients are an overflow the step already dropped.
        finite_keys = ("param_norm",) if skipping else ("loss", "grad_norm", "param_norm")
        if cfg.loss_scaling():
            finite_keys = tuple(k for k in finite_keys if k != "grad_norm")
        skipped_logged = int(jax.device_get(state.skipped))
        overflows_logged = _overflows(state)
        profiler = StepProfiler(cfg.train.profile_steps(), run.path, console)
        try:
            # Batches are built ahead while earlier steps run, from `start` when resuming.
            batches = Prefetcher(loader.train_batch, start, cfg.train.steps, cfg.data.prefetch)
            with batches, StopSignals() as signals:
                for step in range(start, cfg.train.steps):
                    profiler.before(step + 1)
                    state, metrics = compiled(state, batches.get(step))
                    pending.append(metrics)
                    done = step + 1
                    profiler.after(done, (state, metrics))
                    if delay:
                        jax.block_until_ready(metrics)
                        time.sleep(delay)
                    last = done == cfg.train.steps
                    stop = signals.should_stop(done)
                    save = (every and done % every == 0) or last or stop
                    # Evaluation keeps its own schedule; an eval step is also logged.
                    evaluate_now = bool(eval_every) and (done % eval_every == 0 or last)
                    log = done % cfg.train.log_every == 0 or last or stop or evaluate_now
                    if save or log:
                        # Never checkpoint or log past a non-finite step.
                        pending = jax.device_get(pending)
                        _check_finite(done - len(pending), pending, finite_keys)
                    if save:
                        checkpointer.save(done, state, cfg, order)
                    if log:
                        elapsed = time.perf_counter() - window_start
                        step_time = elapsed / (done - window_step)
                        record = {k: float(v) for k, v in pending[-1].items()}
                        record |= {
                            "step_time_s": step_time,
                            "tokens_per_sec": tokens_per_step / step_time,
                            "mfu": step_flops / step_time / peak if peak else None,
                        }
                        if evaluate_now:
                            eval_losses[done] = record["eval_loss"] = evaluate(
                                program, state.params, loader, cfg.train.eval_batches
                            )
                            progress.note(f"step {done}: validation loss {record['eval_loss']:.4f}")
                        if record["skipped_steps"] > skipped_logged:
                            progress.note(
                                f"step {done}: skipped "
                                f"{record['skipped_steps'] - skipped_logged:.0f} non-finite "
                                f"update(s); {record['skipped_steps']:.0f} in this run"
                            )
                            skipped_logged = int(record["skipped_steps"])
                        if record.get("overflow_steps", 0) > overflows_logged:
                            progress.note(
                                f"step {done}: skipped "
                                f"{record['overflow_steps'] - overflows_logged:.0f} update(s) "
                                f"whose gradients overflowed; loss scale now "
                                f"{record['loss_scale']:g}"
                            )
                            overflows_logged = int(record["overflow_steps"])
                        writer.write(done, record)
                        progress.update(done, record)
                        last_loss = record["loss"]
                        pending = []
                        window_start, window_step = time.perf_counter(), done
                    if stop:
                        break
                checkpointer.wait()
        finally:
            profiler.stop()
            progress.close()
            writer.close()

    params = None
    if signals.received is None:
        params = program.model_params(state.params)  # in the model's layer order
        saver = ocp.StandardCheckpointer()
        try:
            saver.save(run.params, params, force=True)
            saver.wait_until_finished()
        finally:
            saver.close()
    return RunResult(
        run.path,
        writer.jsonl_path,
        writer.tb_dir,
        run.params,
        checkpointer.directory,
        last_loss,
        eval_losses,
        start,
        done,
        signals.received,
        program,
        params,
    )


def loss_curve(metrics_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) read back from a run's ``metrics.jsonl``."""
    rows = read_metrics(metrics_path)
    return np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
