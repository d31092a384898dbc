"""Orbax checkpoints of the train state: asynchronous saves, auto-resume, resharding
restore and fallback past unreadable checkpoints.

A checkpoint is one Orbax step directory under ``<run.dir>/checkpoints`` holding the
whole :class:`~jaxtrain.train.state.TrainState` (params, optimizer state, step, RNG) and
a JSON record (step, seed, data position, resolved config). Orbax writes each step into
a temporary directory and renames it when complete, so a process killed mid-save leaves
the last committed checkpoint intact and the partial one is never listed. Restores read
straight into the target shardings of the current mesh, whatever mesh wrote them. Data
order is a function of (seed, step), so the step is the loader's position.
Nothing here unpickles: arrays are tensorstore/OCDBT, metadata is JSON.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from rich.console import Console

from jaxtrain.config import CheckpointConfig, Config
from jaxtrain.errors import UserError


class Checkpointer:
    """Saves and restores a run's train state under ``directory``."""

    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, config: Config) -> None:
        """Start saving ``state`` at ``step``; returns while the write goes on."""
        meta = {"step": step, "data_position": step, "seed": config.train.seed}
        meta["config"] = config.to_dict()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Read checkpoint ``step`` straight into ``abstract_state``'s shardings."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def restore_latest(self, abstract_state: Any, console: Console) -> tuple[Any, dict] | None:
        """The newest readable checkpoint, falling back past unreadable ones.

        Returns None when there is no checkpoint at all.

        Raises:
            UserError: when checkpoints exist but none can be read.
        """
        steps, unreadable = self.steps(), []
        for step in reversed(steps):
            try:
                restored = self.restore(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - any failure means "unreadable"
                unreadable.append(step)
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                console.print(
                    f"warning: checkpoint {self.directory / str(step)} is unreadable "
                    f"({type(err).__name__}: {reason}); trying an older one",
                    highlight=False,
                    markup=False,
                )
                continue
            self._set_aside(unreadable, console)
            return restored
        if steps:
            raise UserError(
                f"checkpoint: none of the checkpoints in {self.directory} (steps "
                f"{', '.join(map(str, steps))}) can be read; not starting over a run - "
                "fix or remove them, or choose another run.dir"
            )
        return None

    def _set_aside(self, steps: list[int], console: Console) -> None:
        """Move unreadable checkpoints out of the way (kept, for inspection) so the
        resumed run can write those steps again."""
        if not steps:
            return
        aside = self.directory.parent / "unreadable_checkpoints"
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{int(time.time())}"
            (self.directory / str(step)).rename(target)
            console.print(f"moved unreadable checkpoint to {target}", highlight=False, markup=False)
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_fresh_run_dir(run_dir: Path) -> None:
    """With ``checkpoint.resume=false`` a run may only start in an empty directory.

    Raises:
        UserError: if ``run_dir`` already holds another run's files.
    """
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"run.dir: {run_dir} already holds a run; checkpoint.resume=false never "
            "overwrites one - choose an empty run.dir or set checkpoint.resume=true"
        )
