"""How long a checkpoint save blocks the training loop: asynchronous vs. blocking.

Builds the train state of the benchmark shape (``configs/bench-cpu.yaml``: 58.5M
parameters, so ~0.7 GB with the AdamW moments), then saves it several times with
``checkpoint.async_save`` on and off, timing how long ``save()`` holds the caller (the
training loop's stall) and how long until the checkpoint is committed on disk.

    python benchmarks/checkpoint_save.py --saves 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jaxtrain.checkpoint import Checkpointer
from jaxtrain.config import load
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

HERE = Path(__file__).resolve().parent


def measure(async_save: bool, saves: int, directory: Path) -> dict[str, float]:
    cfg = load(str(HERE.parent / "configs" / "bench-cpu.yaml"))
    cfg = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=async_save, keep=2)
    )
    state = build_program(cfg, make_mesh(cfg)).init_state()
    jax.block_until_ready(state)
    checkpointer = Checkpointer(directory, cfg.checkpoint)
    blocked, committed = [], []
    for step in range(1, saves + 1):
        start = time.perf_counter()
        checkpointer.save(step, state, cfg)
        blocked.append(time.perf_counter() - start)
        checkpointer.wait()
        committed.append(time.perf_counter() - start)
    checkpointer.close()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return {
        "blocked_s": statistics.median(blocked),
        "committed_s": statistics.median(committed),
        "state_gb": state_bytes / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    print(f"{'mode':<10}{'state GB':>10}{'loop blocked s':>16}{'committed s':>13}")
    for async_save in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(async_save, args.saves, Path(tmp) / "checkpoints")
        mode = "async" if async_save else "blocking"
        print(f"{mode:<10}{r['state_gb']:>10.2f}{r['blocked_s']:>16.3f}{r['committed_s']:>13.3f}")


if __name__ == "__main__":
    main()
