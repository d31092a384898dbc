"""The Pallas kernel inside the sharded training step: run per shard (shard_map over the
batch and head axes), it gives the reference's training run on every layout.

Batches are packed (several documents per row), so the kernel's segment-id path runs
through the sharded step too.
"""

import functools

import jax
import numpy as np
import pytest
from helpers.bounds import F32, LINEAR_ADAM, UPDATE, update_error
from tiny import TINY

from jaxtrain import config
from jaxtrain.data import document_boundaries
from jaxtrain.sharding import ActivationSharding, make_mesh, per_shard, preset
from jaxtrain.train import build_program

EOS = 0
STEPS = (*TINY, "train.steps=2", "optim.warmup_steps=1", *LINEAR_ADAM, "data.packing=true")

LAYOUTS = {
    "dp8": ["mesh.preset=dp", "mesh.data=8", "mesh.fsdp=1"],
    "fsdp8": ["mesh.preset=fsdp", "mesh.fsdp=8"],
    "fsdp4_tp2": ["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2"],
}


def packed_batches(cfg, n):
    """Random tokens with an EOS about every 5 tokens, and their document boundaries."""
    rng = np.random.default_rng(1)
    shape = (cfg.train.global_batch, cfg.data.seq_len + 1)
    out = []
    for _ in range(n):
        tokens = rng.integers(1, cfg.model.vocab_size, size=shape, dtype=np.int32)
        tokens[rng.random(shape) < 0.2] = EOS
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        out.append(batch | document_boundaries(batch["inputs"], EOS))
    return out


def run(overrides, devices, initial=None):
    """(losses, final params, initial state on the host) of a short run; ``initial``
    (laid out in this run's shardings) saves compiling the initialisation again."""
    cfg = config.load(None, [*STEPS, *overrides])
    program = build_program(cfg, make_mesh(cfg, devices))
    if initial is None:
        initial = jax.device_get(program.init_state())
    state = jax.device_put(initial, program.state_shardings)
    losses = []
    for batch in packed_batches(cfg, cfg.train.steps):
        assert batch.keys() == program.abstract_batch().keys()
        state, metrics = program.train_step(state, jax.device_put(batch, program.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), initial


def _pair(x):
    return isinstance(x, tuple)


@functools.cache
def reference():
    """The plain-XLA attention on one device."""
    return run(["mesh.fsdp=1", "model.attention=xla"], jax.devices()[:1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pallas_train_step_matches_reference(layout):
    ref_losses, ref_params, initial = reference()
    losses, params, _ = run([*LAYOUTS[layout], "model.attention=pallas"], jax.devices(), initial)
    np.testing.assert_allclose(losses, ref_losses, rtol=F32)
    # Each tensor's update (see helpers.bounds: why the update, and why this optimizer).
    errors = jax.tree.map(
        lambda a, b, s: update_error(a, b, s, len(losses), UPDATE),
        params,
        ref_params,
        initial.params,
    )
    assert all(e <= allowed for e, allowed in jax.tree.leaves(errors, is_leaf=_pair)), errors


def test_per_shard_runs_on_local_blocks():
    """The function sees each device's rows and heads; without a mesh it is untouched."""
    cfg = config.load(None, ["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2"])
    mesh = make_mesh(cfg)
    shard = ActivationSharding(mesh, preset("fsdp_tp"))
    x = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8, 3, 4)
    axes = ("batch", None, "act_heads")
    seen = []

    def local(x, nothing):
        assert nothing is None
        seen.append(x.shape)
        return x * 2

    out = jax.jit(per_shard(local, shard, (axes, None), axes))(x, None)
    np.testing.assert_array_equal(out, x * 2)
    assert (2, 3, 2) in seen  # batch over fsdp=4, heads over tensor=2
    assert per_shard(local, lambda x, axes: x, (axes, None), axes) is local
    assert per_shard(local, ActivationSharding(), (axes, None), axes) is local
