"""Correctness of the pure step beyond layout equivalence: the init and training random
streams never share a key, the logged learning rate is the one the optimizer applied,
and gradient accumulation weighs microbatches by their token counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.nnx import rnglib
from tiny import TINY

from jaxtrain import config
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program, make_train_step
from jaxtrain.train.optim import schedule_count
from jaxtrain.train.state import seed_keys


def program_on(devices, *overrides):
    cfg = config.load(None, [*TINY, *overrides])
    return build_program(cfg, make_mesh(cfg, devices))


def key_set(keys):
    """Raw uint32 key data -> a set of (hi, lo) pairs."""
    return {tuple(int(x) for x in k) for k in np.asarray(keys).reshape(-1, 2)}


def descendants(keys, depth, width=4):
    """``keys`` and every key ``fold_in(...fold_in(k, i1)..., id)`` for i < width, up to
    ``depth`` levels: all that ``split(k, n)`` (== fold_in(k, i)) can derive."""
    out, level = [keys], keys
    for _ in range(depth):
        level = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(width)))(
            level
        ).reshape(-1, 2)
        out.append(level)
    return jnp.concatenate(out)


def test_init_and_dropout_keys_come_from_independent_streams(monkeypatch):
    """Every key nnx draws to initialise parameters (recorded as it draws them) differs
    from every key a training step derives from its step key (the first 64 steps, three
    levels of split below it). It once failed: the train key was the stacked layers'
    init key, so step s's dropout used layer s's init keys."""
    drawn = []
    original = rnglib.RngStream.__call__

    def recording(self):
        key = original(self)
        jax.debug.callback(lambda k: drawn.append(np.asarray(k)), jax.random.key_data(key))
        return key

    monkeypatch.setattr(rnglib.RngStream, "__call__", recording)
    program = program_on(jax.devices()[:1], "mesh.fsdp=1", "model.dropout=0.1", "model.n_layers=4")
    state = program.init_state()
    jax.effects_barrier()
    init_keys = key_set(drawn)
    assert len(init_keys) > 10  # embedding, every layer's weights, the head

    steps = jax.vmap(lambda s: jax.random.fold_in(state.rng, s))(jnp.arange(64))
    train_keys = key_set(descendants(jnp.concatenate([state.rng[None], steps]), depth=3))
    assert not init_keys & train_keys

    init_key, train_key = seed_keys(program.config.train.seed)
    np.testing.assert_array_equal(state.rng, train_key)
    from_init = descendants(jnp.concatenate([init_key[None], jax.random.split(init_key, 64)]), 1)
    assert not key_set(from_init) & train_keys


def skip_step(program):
    return jax.jit(
        make_train_step(program.spec, program.tx, program.lr_schedule, skip_nonfinite=True)
    )


def test_logged_lr_is_the_rate_applied_after_a_skipped_step():
    """With train.on_nonfinite=skip a NaN step leaves the optimizer's count behind
    state.step; the next step applies (and must log) the schedule at that count."""
    program = program_on(
        jax.devices()[:1],
        "mesh.fsdp=1",
        "train.on_nonfinite=skip",
        "train.steps=10",
        "optim.warmup_steps=4",
        "optim.lr=1e-3",
    )
    step = skip_step(program)
    tokens = np.random.default_rng(0).integers(0, 128, (8, 17))
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((8, 16), np.float32),
    }
    poisoned = dict(batch, weights=batch["weights"].copy())
    poisoned["weights"][3, 5] = np.nan
    state = program.init_state()
    logged = []
    for b in (batch, poisoned, batch):
        state, metrics = jax.device_get(step(state, b))
        logged.append(float(metrics["lr"]))
    assert (int(state.step), int(state.skipped), int(schedule_count(state.opt_state))) == (3, 1, 2)
    schedule = program.lr_schedule
    expected = [float(schedule(0)), float(schedule(1)), float(schedule(1))]
    assert logged == pytest.approx(expected, rel=1e-6)
    assert logged[2] != pytest.approx(float(schedule(2)))  # what state.step would give


def test_accumulation_weighs_microbatches_by_token_count():
    """Packed rows whose weights give microbatch 0 sixty-four counted tokens and
    microbatch 1 four: two microbatches must equal one batch (a mean of per-microbatch
    means would weigh microbatch 1's four tokens as much as the other sixty-four)."""
    rng = np.random.default_rng(1)
    weights = np.zeros((8, 16), np.float32)
    weights[0::2] = 1.0  # rows 0, 2, 4, 6 make microbatch 0 (interleaved split)
    weights[1::2, 7] = 1.0  # rows 1, 3, 5, 7 count one token each
    batches = []
    for _ in range(2):
        tokens = rng.integers(0, 128, (8, 17), dtype=np.int32)
        batches.append(
            {
                "inputs": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "segment_ids": np.zeros((8, 16), np.int32),
                "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
                "weights": weights,
            }
        )

    def run(microbatches):
        program = program_on(
            jax.devices()[:2],
            "mesh.fsdp=2",
            "data.packing=true",
            "optim.warmup_steps=0",
            "optim.lr=0.1",
            "optim.eps=1.0",  # updates ~ lr * gradient: Adam's sign(g) would hide small errors
            f"train.microbatches={microbatches}",
        )
        state, seen = program.init_state(), []
        for batch in batches:
            state, metrics = program.train_step(
                state, jax.device_put(batch, program.batch_sharding)
            )
            seen.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        return np.array(seen), jax.device_get(state.params)

    (seen, params), (reference, ref_params) = run(2), run(1)
    np.testing.assert_allclose(seen, reference, rtol=1e-5)  # loss and gradient norm
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        scale = np.max(np.abs(b))
        assert np.max(np.abs(a - b)) <= 1e-5 * scale
