"""Short training runs of the tiny model, and the comparison of a run with its
one-device reference that the layout tests share (equivalence, pipeline, context
parallelism, experts, FP8, kernels).

A run is three steps of :data:`helpers.bounds.LINEAR_ADAM` on fixed batches; two runs
agree when their losses agree at ``F32`` and each parameter tensor's update (after minus
before) at ``UPDATE`` of its scale (see :mod:`helpers.bounds` for why the update, and
why this optimizer).
"""

import functools
from typing import Any, NamedTuple

import jax
import numpy as np
from tiny import TINY

from helpers.bounds import F32, LINEAR_ADAM, LINEAR_LR, UPDATE, update_error
from jaxtrain import config
from jaxtrain.sharding import make_mesh, path_str
from jaxtrain.train import build_program

STEPS = (*TINY, "train.steps=3", "optim.warmup_steps=1", *LINEAR_ADAM)

# A step the plan tests compile (and never run): the default model at 2 layers, bfloat16,
# accumulating 2 microbatches of 8 rows x 64 tokens.
ACCUMULATING = [
    "model.compute_dtype=bfloat16",
    "model.n_layers=2",
    "train.global_batch=16",
    "train.microbatches=2",
    "data.seq_len=64",
]


class Run(NamedTuple):
    """What a short run leaves: its losses, its final state (parameters in the model's
    order of layers) and a host copy of its parameters before the first step."""

    losses: np.ndarray
    state: Any
    start: Any


def random_batches(program, n):
    """``n`` batches of random tokens in the program's batch layout; an MLM batch counts
    about half of its tokens (``weights``)."""
    rng = np.random.default_rng(0)
    vocab = program.config.model.vocab_size
    out = []
    for _ in range(n):
        batch = {}
        for key, spec in program.abstract_batch().items():
            if key == "weights":
                batch[key] = (rng.random(spec.shape) < 0.5).astype(np.float32)
            else:
                batch[key] = rng.integers(0, vocab, size=spec.shape, dtype=np.int32)
        out.append(batch)
    return out


def packed_batches(program, n):
    """``n`` batches of random tokens packed as documents of random lengths: segment ids
    count up along each row and positions restart at every document."""
    rng = np.random.default_rng(0)
    vocab = program.config.model.vocab_size
    rows, length = program.abstract_batch()["inputs"].shape
    out = []
    for _ in range(n):
        starts = [np.sort(rng.choice(np.arange(1, length), 3, replace=False)) for _ in range(rows)]
        segments = np.stack([np.searchsorted(s, np.arange(length), side="right") for s in starts])
        first = np.stack(
            [np.concatenate([[0], s])[seg] for s, seg in zip(starts, segments, strict=True)]
        )
        batch = {
            "inputs": rng.integers(0, vocab, (rows, length), dtype=np.int32),
            "targets": rng.integers(0, vocab, (rows, length), dtype=np.int32),
            "segment_ids": (segments + 1).astype(np.int32),
            "positions": (np.arange(length)[None] - first).astype(np.int32),
            "weights": (rng.random((rows, length)) < 0.9).astype(np.float32),
        }
        assert set(batch) == set(program.abstract_batch())
        out.append(batch)
    return out


def train(program, batches, state=None) -> Run:
    """Step ``program`` through ``batches`` from ``state`` (a fresh one by default)."""
    state = program.init_state() if state is None else state
    start = jax.device_get(program.model_params(state.params))
    losses = []
    for batch in batches:
        state, metrics = program.train_step(state, jax.device_put(batch, program.batch_sharding))
        losses.append(float(metrics["loss"]))
    final = state.replace(params=program.model_params(state.params))
    return Run(np.array(losses), final, start)


def program_for(overrides, devices):
    cfg = config.load(None, [*STEPS, *overrides])
    return build_program(cfg, make_mesh(cfg, devices))


def run(overrides, devices, packed=False) -> Run:
    """:data:`STEPS` with ``overrides`` on ``devices``, on random (or packed) batches."""
    program = program_for(overrides, devices)
    make = packed_batches if packed else random_batches
    return train(program, make(program, program.config.train.steps))


@functools.cache
def one_device(extra=()) -> Run:
    """The reference: :func:`run` on one device, computed once per process."""
    return run(["mesh.fsdp=1", *extra], jax.devices()[:1])


def specs(tree, suffix):
    """PartitionSpecs of the leaves whose path ends with ``suffix`` (e.g. 'mlp/w_gate')."""
    found = [
        leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if path_str(path).endswith(suffix)
    ]
    assert found, suffix
    return found


def update_errors(result: Run, reference: Run, bound: float = UPDATE) -> dict[str, tuple]:
    """:func:`helpers.bounds.update_error` of each tensor, by path. The attention key bias
    (GPT-2, BERT) is left out, and checked to have moved no further than its gradient's
    rounding allows: softmax ignores a shift shared by all keys, and ``q . bk`` is one, so
    its exact gradient is zero and what it gets is rounding noise (at most F32 of a
    gradient clipped to norm 1), which differs by layout; LINEAR_ADAM moves it by at most
    LINEAR_LR * F32 a step."""
    steps = len(reference.losses)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(result.state.params))[0]
    others = (jax.device_get(reference.state.params), result.start)
    leaves = zip(flat, *(jax.tree.leaves(tree) for tree in others), strict=True)
    errors = {}
    for (path, end), reference_end, start in leaves:
        name = path_str(path)
        if name.endswith("attn/bk"):
            for moved in (end, reference_end):
                assert np.max(np.abs(moved - start)) <= steps * LINEAR_LR * F32, name
        else:
            errors[name] = update_error(end, reference_end, start, steps, bound)
    return errors


def assert_same_run(result: Run, reference: Run, bound: float = UPDATE) -> None:
    """Losses at F32 and every tensor's update within ``bound`` of its scale (plus the
    weights' float32 storage rounding)."""
    np.testing.assert_allclose(result.losses, reference.losses, rtol=F32)
    errors = update_errors(result, reference, bound)
    assert all(error <= allowed for error, allowed in errors.values()), errors
