"""Dynamic loss scaling: the scale's rule, exactness, and overflowing float16 steps.

A killed float16 run resuming bit-exact with its scale restored is in test_checkpoint.py
(its killed runs compute in float16 with a scale that overflows every few steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY

from jaxtrain import config
from jaxtrain.config import LossScaleConfig
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program
from jaxtrain.train.loss_scale import advance, initial


def test_overflow_lowers_the_scale_and_a_finite_period_raises_it():
    cfg = LossScaleConfig(init=8.0, period=3, factor=2.0, min=2.0)
    state = initial(cfg)
    seen = []
    for finite in (True, True, True, True, False, False, False, True):
        state = advance(state, jnp.asarray(finite), cfg)
        seen.append((float(state.scale), int(state.good_steps), int(state.overflows)))
    assert seen == [
        (8.0, 1, 0),
        (8.0, 2, 0),
        (16.0, 0, 0),  # the third finite step in a row
        (16.0, 1, 0),
        (8.0, 0, 1),  # an overflow restarts the count
        (4.0, 0, 2),
        (2.0, 0, 3),  # not below min
        (2.0, 1, 3),
    ]
    top = LossScaleConfig(init=3e38, period=1)  # raising would leave float32's range
    assert float(advance(initial(top), jnp.asarray(True), top).scale) == np.float32(3e38)


def batches(n, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        tokens = rng.integers(0, vocab, (8, 17))
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def run(overrides, steps, skip=0):
    """(per-step metrics, state) of ``steps`` steps of the tiny model on 8 devices (fsdp),
    on the batches after the first ``skip``."""
    cfg = config.load(None, [*TINY, "model.vocab_size=512", "optim.warmup_steps=0", *overrides])
    program = build_program(cfg, make_mesh(cfg))
    state, rows = program.init_state(), []
    for batch in list(batches(skip + steps))[skip:]:
        state, metrics = program.train_step(state, jax.device_put(batch, program.batch_sharding))
        rows.append(jax.device_get(metrics))
    return rows, jax.device_get(state)


def test_a_scaled_float32_run_equals_the_unscaled_one():
    """Scaling the loss by 2**k and the gradients by 2**-k commutes with float32 rounding
    (XLA may still fuse or flush subnormals differently in the two programs), so a scaled
    run equals the unscaled one to float32 precision; a step that forgot to unscale, or
    unscaled twice, would be off by 1024x."""
    plain_rows, plain = run([], 3)
    scaled_rows, scaled = run(["train.loss_scale.kind=dynamic", "train.loss_scale.init=1024"], 3)
    for key in ("loss", "grad_norm", "update_norm"):
        got, want = ([r[key] for r in rows] for rows in (scaled_rows, plain_rows))
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        scaled.params,
        plain.params,
    )
    assert plain.loss_scale is None and float(scaled.loss_scale.scale) == 1024.0


@pytest.fixture(scope="module")
def float16_run():
    """float16 compute from a scale (2**16) whose first step overflows: the run halves
    it step by step, then trains."""
    overrides = ["model.compute_dtype=float16", "train.loss_scale.period=1000"]
    rows, state = run(overrides, 6)
    cfg = config.load(None, [*TINY, "model.vocab_size=512", "optim.warmup_steps=0", *overrides])
    program = build_program(cfg, make_mesh(cfg))
    return rows, state, jax.device_get(program.init_state())


def test_an_overflowing_step_is_dropped_and_lowers_the_scale(float16_run):
    rows, state, fresh = float16_run
    overflowed = [not np.isfinite(r["grad_norm"]) for r in rows]
    first = overflowed.index(False)
    assert overflowed[0] and not any(overflowed[first:]), overflowed
    # Each overflow halved the scale from 2**16 and counted itself; no step was a fault.
    for i, row in enumerate(rows):
        assert row["loss_scale"] == 2.0 ** (16 - min(i + 1, first))
        assert row["overflow_steps"] == min(i + 1, first) and row["skipped_steps"] == 0
        assert np.isfinite(row["loss"]) and np.isfinite(row["param_norm"])
    # The dropped updates left the optimizer where it was: the first applied update ran
    # at the schedule's first count, and the state moved on from there.
    assert [r["lr"] for r in rows[: first + 1]] == [rows[0]["lr"]] * (first + 1)
    assert int(state.step) == 6 and int(state.loss_scale.overflows) == first
    counts = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
    assert all(int(c) == 6 - first for c in counts), counts
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params, fresh.params)
    assert all(jax.tree.leaves(changed))


def test_float16_gradients_match_float32_once_scaled(float16_run):
    """The first applied float16 update (from the initial parameters, every update before
    it dropped) has the float32 step's loss and gradient norm within float16's
    precision: the scale kept the small gradients from flushing to zero."""
    rows, _, _ = float16_run
    first = next(i for i, r in enumerate(rows) if np.isfinite(r["grad_norm"]))
    reference, _ = run([], 1, skip=first)
    assert rows[first]["loss"] == pytest.approx(reference[0]["loss"], rel=2e-3)
    assert rows[first]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=2e-2)
