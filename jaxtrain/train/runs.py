"""Read a finished or running run back: ``jaxtrain eval`` and ``jaxtrain export``.

Both load the run's saved ``config.yaml``, build the program on the current devices
(any mesh: the checkpoint is resharded on restore) and read the newest readable
checkpoint exactly as auto-resume does.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from rich.console import Console

from jaxtrain import config
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.data import check_dataset, load_tokenizer, open_dataset
from jaxtrain.errors import UserError
from jaxtrain.sharding import make_mesh
from jaxtrain.train.loop import evaluate
from jaxtrain.train.program import Program, build_program
from jaxtrain.train.rundir import check_dir_path


def load_run(
    run: str, overrides: Sequence[str], console: Console
) -> tuple[config.Config, Program, Any, int]:
    """(config, program, restored state, step) of the newest checkpoint of ``run``.

    Raises:
        UserError: if ``run`` is not a run directory or has no readable checkpoint.
    """
    run_dir = Path(run).absolute()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--run: {run} is not a run directory (no config.yaml)")
    cfg = config.load(str(run_dir / "config.yaml"), overrides)
    program = build_program(cfg, make_mesh(cfg))
    # Reading a run never writes to it: no tidying, no setting corrupt checkpoints aside.
    with Checkpointer(run_dir / "checkpoints", cfg.checkpoint, read_only=True) as checkpointer:
        restored = checkpointer.restore_latest(
            program.abstract_state, console, config=cfg, set_aside=False
        )
    if restored is None:
        raise UserError(f"--run: {run} has no checkpoint yet")
    state, meta = restored
    return cfg, program, program.adopt(state, meta), int(meta["step"])


def eval_run(run: str, overrides: Sequence[str], console: Console) -> tuple[int, float]:
    """(step, validation loss) of the newest checkpoint of ``run``."""
    cfg, program, state, step = load_run(run, overrides, console)
    tokenizer = load_tokenizer(cfg.data.tokenizer, eos_id=cfg.data.eos_id)
    dataset = open_dataset(cfg.data.path, tokenizer)
    check_dataset(dataset, cfg.model.vocab_size)
    loader = program.loader(dataset)
    return step, evaluate(program, state.params, loader, cfg.train.eval_batches)


def export_run(
    run: str, out: str, overrides: Sequence[str], console: Console, *, fmt: str = "orbax"
) -> int:
    """Write the parameters (no optimizer state) of ``run``'s newest checkpoint to
    ``out`` and return the step: as an Orbax checkpoint (``fmt="orbax"``), or as a
    Hugging Face model directory (``fmt="hf"``: config.json + safetensors, and the run's
    tokenizer.json when it has one).

    Raises:
        UserError: if ``out`` exists and is not empty, or no HF architecture expresses
            the run's model.
    """
    target = Path(out).resolve()
    check_dir_path(target, "--out")
    if target.exists() and any(target.iterdir()):
        raise UserError(f"--out: {out} exists and is not empty")
    cfg, program, state, step = load_run(run, overrides, console)
    params = program.model_params(state.params)
    if fmt == "hf":
        from jaxtrain.models.hf import config_to_hf, save_pretrained

        config_to_hf(cfg.model)  # refuse before writing anything
        save_pretrained(cfg.model, params, target)
        tokenizer = load_tokenizer(cfg.data.tokenizer, eos_id=cfg.data.eos_id)
        if tokenizer.name != "byte" and jax.process_index() == 0:
            shutil.copyfile(tokenizer.name, target / "tokenizer.json")
        return step
    saver = ocp.StandardCheckpointer()
    try:
        saver.save(target, params, force=True)
        saver.wait_until_finished()
    finally:
        saver.close()
    return step
