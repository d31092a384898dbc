"""Orbax checkpoints of the train state: asynchronous saves, auto-resume, resharding
restore and fallback past corrupt checkpoints.

A checkpoint is one Orbax step directory under ``<run.dir>/checkpoints`` holding the
whole :class:`~jaxtrain.train.state.TrainState` (params, optimizer state, step, RNG) and
a JSON record (step, seed, data position, resolved config). Orbax writes each step into
a temporary directory and renames it when complete, so a process killed mid-save leaves
the last committed checkpoint intact and the partial one is never listed. Restores read
straight into the target shardings of the current mesh, whatever mesh wrote them. Data
order is a function of (seed, step), so the step is the loader's position.

A restore that fails is one of three things, and each is handled differently:

- the checkpoint holds a different state tree (another model shape, optimizer or
  family): a config mistake, refused with the differing arrays and the ``--set`` values
  that would match the checkpoint; nothing is moved;
- an I/O error that may pass (unavailable storage, a timeout, permissions): retried,
  then refused; nothing is moved;
- anything else (truncated, missing or garbled files) is corruption: the run falls back
  to the next older checkpoint, and a training run sets the corrupt one aside.

In a multi-process run every process takes part in each attempt and they agree on its
outcome (the worst of them), so all restore the same step; only process 0 moves files.
Nothing here unpickles: arrays are tensorstore/OCDBT, metadata is JSON.
"""

from __future__ import annotations

import enum
import errno
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from rich.console import Console

from jaxtrain.config import CheckpointConfig, Config
from jaxtrain.errors import UserError, quote

# Status codes of tensorstore errors that say the storage, not the data, failed.
TRANSIENT_CODES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "PERMISSION_DENIED"}
)
NOT_TRANSIENT_ERRNOS = frozenset({errno.ENOENT, errno.EISDIR, errno.ENOTDIR})
READ_ATTEMPTS = 3
RETRY_DELAY_S = 1.0


class Outcome(enum.IntEnum):
    """What one restore attempt found, in rising severity (processes keep the worst)."""

    OK = 0
    CORRUPT = 1
    IO_ERROR = 2
    MISMATCH = 3


def is_transient(err: BaseException) -> bool:
    """Whether a read failure may pass on its own (storage, not data, at fault)."""
    if isinstance(err, OSError):
        return err.errno not in NOT_TRANSIENT_ERRNOS and not isinstance(
            err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)
        )
    code = str(err).split(":", 1)[0].strip()
    return code in TRANSIENT_CODES


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {quote(text.splitlines()[0], 100) if text else ''}"


def _agree(outcome: Outcome) -> Outcome:
    """The worst outcome over all processes (every process calls this)."""
    if jax.process_count() == 1:
        return outcome
    gathered = multihost_utils.process_allgather(np.asarray(int(outcome), np.int32))
    return Outcome(int(np.max(gathered)))


def _quiet_cancelled_reads() -> None:
    """Silence the callbacks a failed tensorstore read leaves behind.

    When a restore fails part-way, reads still in flight complete later on tensorstore's
    threads and try to wake an asyncio loop Orbax has already closed; Python reports
    each as an unraisable "Event loop is closed" traceback. They are harmless, and they
    would bury the one line the user needs, so only those are dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "jaxtrain_filter", False):
        return

    def hook(unraisable: Any) -> None:
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook.jaxtrain_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
    """Array name (as Orbax names them) -> shape, skipping empty optimizer states."""
    flat = ocp.tree.to_flat_dict(tree, sep=".")
    return {name: tuple(leaf.shape) for name, leaf in flat.items() if leaf is not None}


def _flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= _flat_config(value, f"{prefix}{key}.")
    return out


def _config_hint(saved: dict | None, current: Config | None) -> str:
    """``--set`` overrides that bring ``current`` back to the checkpoint's config."""
    if not saved or current is None:
        return ""
    old, new = _flat_config(saved), _flat_config(current.to_dict())
    changed = [k for k in old if k in new and old[k] != new[k]]
    shaping = [k for k in changed if k.startswith(("model.", "optim."))] or changed
    if not shaping:
        return ""
    sets = " ".join(f"--set {k}={quote(old[k], 40)}" for k in shaping[:6])
    more = f" (+{len(shaping) - 6} more)" if len(shaping) > 6 else ""
    return f"; it was written with {sets}{more}"


class Checkpointer:
    """Saves and restores a run's train state under ``directory``.

    With ``read_only`` (``jaxtrain eval``/``export``) nothing under ``directory`` is ever
    written, moved or tidied. Use it as a context manager, or call :meth:`close`, on
    every path: Orbax's background threads must not outlive an error.
    """

    def __init__(self, directory: Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.directory = Path(directory).absolute()  # Orbax refuses relative paths
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save and not read_only,
            create=False,  # made by the first save, once the run has validated
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, config: Config, extra: dict | None = None) -> None:
        """Start saving ``state`` at ``step``, with ``extra`` entries in its JSON record;
        returns while the write goes on."""
        if self.read_only:
            raise RuntimeError("a read-only Checkpointer does not save")
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"step": step, "data_position": step, "seed": config.train.seed}
        meta["config"] = config.to_dict()
        meta.update(extra or {})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Read checkpoint ``step`` straight into ``abstract_state``'s shardings."""
        _quiet_cancelled_reads()
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def saved_meta(self, step: int) -> dict | None:
        """The JSON record of checkpoint ``step`` (None if it cannot be read)."""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001 - the record only improves a message
            return None
        return meta["meta"] if isinstance(meta["meta"], dict) else None

    def mismatch(self, step: int, abstract_state: Any, config: Config | None) -> str | None:
        """Why checkpoint ``step`` cannot fill ``abstract_state`` (None if its arrays
        match in names and shapes; dtypes are cast on restore).

        Raises:
            Exception: whatever reading the checkpoint's metadata raises (corruption or
                I/O; the caller tells them apart).
        """
        saved = _flat(self._manager.item_metadata(step)["state"].tree)
        wanted = _flat(abstract_state)
        diffs = [
            f"{k} is {saved[k]} there, {shape} now"
            for k, shape in wanted.items()
            if k in saved and saved[k] != shape
        ]
        diffs += [f"{k} is missing there" for k in wanted if k not in saved]
        diffs += [f"{k} is not in this model" for k in saved if k not in wanted]
        if not diffs:
            return None
        more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
        meta = self.saved_meta(step)
        return (
            f"checkpoint: {self.directory / str(step)} holds a different state than this "
            f"config builds: {diffs[0]}{more}{_config_hint(meta and meta.get('config'), config)}"
            "; or choose another run.dir"
        )

    def _attempt(
        self, step: int, abstract_state: Any, config: Config | None
    ) -> tuple[Outcome, Any, str]:
        """One restore of ``step``: (outcome, restored or None, what went wrong)."""
        for attempt in range(READ_ATTEMPTS):
            try:
                why = self.mismatch(step, abstract_state, config)
                if why is not None:
                    return Outcome.MISMATCH, None, why
                return Outcome.OK, self.restore(step, abstract_state), ""
            except Exception as err:  # noqa: BLE001 - classified below
                if not is_transient(err):
                    return Outcome.CORRUPT, None, _first_line(err)
                if attempt + 1 < READ_ATTEMPTS:
                    time.sleep(RETRY_DELAY_S * 2**attempt)
                last = _first_line(err)
        return Outcome.IO_ERROR, None, last

    def restore_latest(
        self,
        abstract_state: Any,
        console: Console,
        *,
        config: Config | None = None,
        set_aside: bool = True,
    ) -> tuple[Any, dict] | None:
        """The newest readable checkpoint, falling back past corrupt ones.

        Args:
            abstract_state: the target tree (shapes, dtypes, shardings).
            console: where warnings go.
            config: the run's config, to say which ``--set`` values match a checkpoint
                written for another model.
            set_aside: move corrupt checkpoints to ``unreadable_checkpoints/`` once an
                older one has been read (training); False reads only (eval, export).

        Returns:
            (state, meta), or None when there is no checkpoint at all.

        Raises:
            UserError: when a checkpoint was written for another state tree, when reading
                fails with an I/O error that retrying did not cure, or when checkpoints
                exist but every one is corrupt.
        """
        steps, corrupt = self.steps(), []
        for step in reversed(steps):
            outcome, restored, why = self._attempt(step, abstract_state, config)
            agreed = _agree(outcome)
            where = self.directory / str(step)
            if agreed == Outcome.OK:
                if set_aside:
                    self._set_aside(corrupt, console)
                return restored
            if agreed == Outcome.MISMATCH:
                raise UserError(
                    why or f"checkpoint: {where} holds a different state on another process"
                )
            if agreed == Outcome.IO_ERROR:
                raise UserError(
                    f"checkpoint: reading {where} failed {READ_ATTEMPTS} times with an I/O "
                    f"error ({why or 'on another process'}); it was left as it is - check "
                    "the storage and run again"
                )
            corrupt.append(step)
            console.print(
                f"warning: checkpoint {where} is unreadable ({why or 'on another process'}); "
                "trying an older one",
                highlight=False,
                markup=False,
            )
        if steps:
            raise UserError(
                f"checkpoint: none of the checkpoints in {self.directory} (steps "
                f"{', '.join(map(str, steps))}) can be read; not starting over a run - "
                "fix or remove them, or choose another run.dir"
            )
        return None

    def _set_aside(self, steps: list[int], console: Console) -> None:
        """Move corrupt checkpoints out of the way (kept, for inspection) so the resumed
        run can write those steps again. Only process 0 moves; all wait for it."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.parent / "unreadable_checkpoints"
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{int(time.time())}"
                (self.directory / str(step)).rename(target)
                console.print(
                    f"moved unreadable checkpoint to {target}", highlight=False, markup=False
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxtrain: corrupt checkpoints set aside")
        self._manager.reload()

    def close(self) -> None:
        # Orbax tidies old temporary directories on a thread of its own that only a save
        # waits for, and its close does not: a run that stops before its first save would
        # leave that thread running into interpreter shutdown, where it fails noisily.
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()
        self._manager.wait_until_finished()
        self._manager.close()
