"""``train.profile``: a ``jax.profiler`` trace of a range of training steps.

The trace starts just before the first step of the range is dispatched and stops once
the last one has finished on the devices (the loop dispatches ahead, so it waits for
that step's outputs first). It lands in ``<run.dir>/profile`` (one subdirectory per
process in a multi-process run) in the layout TensorBoard's profile tab and Perfetto read:
``plugins/profile/<time>/<host>.xplane.pb``. Steps the run has already done when it
resumes are not traced again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from rich.console import Console


class StepProfiler:
    """Starts and stops the trace around steps ``first..last`` (None: never)."""

    def __init__(self, steps: tuple[int, int] | None, run_path: Path, console: Console):
        self.steps, self.console, self.active = steps, console, False
        self.directory = run_path / "profile"
        if jax.process_count() > 1:
            self.directory = self.directory / f"process_{jax.process_index()}"

    def before(self, step: int) -> None:
        """Call before dispatching ``step`` (counted from 1)."""
        if self.steps is not None and step == self.steps[0]:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        """Call after dispatching ``step``; ``outputs`` are what it returned."""
        if self.active and step == self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()
            first, last = self.steps
            self.console.print(f"profiled steps {first}-{last}: {self.directory}")

    def stop(self) -> None:
        """End the trace if it is running (a run stopped inside the range)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
