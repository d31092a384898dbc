"""The run directory: checked before anything runs, written only once the run can start.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` and (when finished) ``params/``. Its order of business protects what is
already there:

1. :meth:`RunDirectory.check` - before anything else, and writing nothing: the path
   can be a directory, and ``checkpoint.resume=false`` only starts in an empty one;
2. :meth:`RunDirectory.check_start` - once the newest checkpoint is known, still writing
   nothing: a directory with another run's outputs but no checkpoint to resume is
   refused, and so is a ``train.steps`` below the step the checkpoint reached;
3. :meth:`RunDirectory.claim` - once the step has compiled: ``config.yaml`` is written
   and ``metrics.jsonl`` trimmed to the resumed step, each by an atomic replace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from jaxtrain.config import Config
from jaxtrain.errors import UserError


def check_dir_path(path: Path, key: str) -> None:
    """Refuse a path that cannot be (or become) a directory.

    Raises:
        UserError: if ``path`` or one of its parents exists and is not a directory.
    """
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == path else f"is under {parent}, which is"
            raise UserError(f"{key}: {path} {where} a file, not a directory")


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(path: Path, console: Console | None = None) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn last line (a process killed mid-write) is
    dropped with a warning.

    Raises:
        UserError: if a line other than the last is not a JSON object with a step.
    """
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if number == len(lines):
                if console is not None:
                    console.print(
                        f"warning: dropped the torn last line of {path} (line {number})",
                        highlight=False,
                        markup=False,
                    )
                break
            raise UserError(
                f"run.dir: {path} line {number} is not a metrics row; fix or remove the file"
            ) from None
        rows.append(row)
    return rows


class RunDirectory:
    """The files of one run under ``run.dir``."""

    def __init__(self, path: str, console: Console):
        self.path = Path(path).absolute()
        self.console = console
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.params = self.path / "params"

    def check(self, resume: bool) -> None:
        """Whether the run can use this directory at all; writes nothing.

        Raises:
            UserError: for a path that is (or is under) a file, a ``checkpoints`` that is
                not a directory, or a non-empty directory with ``checkpoint.resume=false``.
        """
        check_dir_path(self.path, "run.dir")
        check_dir_path(self.checkpoints, "run.dir")
        if not resume and self.path.exists() and any(self.path.iterdir()):
            raise UserError(
                f"run.dir: {self.path} already holds a run; checkpoint.resume=false never "
                "overwrites one - choose an empty run.dir or set checkpoint.resume=true"
            )

    def _earlier_outputs(self) -> list[str]:
        found = []
        if read_metrics(self.metrics):
            found.append(self.metrics.name)
        if self.params.exists():
            found.append(f"{self.params.name}/")
        tensorboard = self.path / "tensorboard"
        if tensorboard.is_dir() and any(tensorboard.glob("events.out.tfevents.*")):
            found.append(f"{tensorboard.name}/")
        return found

    def check_start(self, start: int, steps: int) -> None:
        """Whether a run resuming at ``start`` (0: no checkpoint) may go on; writes nothing.

        Raises:
            UserError: if ``steps`` is below ``start``, or the directory holds another
                run's outputs but no checkpoint to resume from.
        """
        if start > steps:
            raise UserError(
                f"train.steps: {steps} is below step {start} of the newest checkpoint in "
                f"{self.checkpoints}; nothing to train - raise train.steps or choose "
                "another run.dir"
            )
        earlier = self._earlier_outputs() if start == 0 else []
        if earlier:
            raise UserError(
                f"run.dir: {self.path} holds a run's {', '.join(earlier)} but no checkpoint "
                "to resume from; not overwriting it - choose another run.dir, or delete it "
                "to start over"
            )

    def claim(self, cfg: Config, start: int) -> None:
        """Write the resolved config and drop the metrics rows after ``start`` (they are
        redone); call on one process, once the run is sure to start.

        Raises:
            UserError: if the directory cannot be created or written.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _replace_text(self.path / "config.yaml", cfg.to_yaml())
            if self.metrics.exists():
                kept = [r for r in read_metrics(self.metrics, self.console) if r["step"] <= start]
                _replace_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        except OSError as err:
            raise UserError(f"run.dir: cannot write {self.path} ({err.strerror})") from None
