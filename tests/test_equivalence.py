"""The core guarantee: every mesh layout computes the same numbers as one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrain import config
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

TINY = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_dim=128",
    "model.vocab_size=128",
    "data.seq_len=16",
    "train.global_batch=8",
    "train.steps=3",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
]


def random_batches(cfg, n):
    rng = np.random.default_rng(0)
    shape = (cfg.train.global_batch, cfg.data.seq_len + 1)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    return out


def run(overrides, devices):
    cfg = config.load(None, TINY + overrides)
    mesh = make_mesh(cfg, devices)
    program = build_program(cfg, mesh)
    state = program.init_state()
    losses = []
    for batch in random_batches(cfg, cfg.train.steps):
        batch = jax.device_put(batch, program.batch_sharding)
        state, metrics = program.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def relative_error(a, b):
    """max |a - b| / max |b|: float32 rounding differs between layouts by reduction order,
    so near-zero elements are judged against the scale of their tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference():
    return run(["mesh.fsdp=1"], jax.devices()[:1])


LAYOUTS = {
    "dp8": (["mesh.preset=dp", "mesh.data=8", "mesh.fsdp=1"], {"params": P()}),
    "fsdp8": (["mesh.preset=fsdp", "mesh.fsdp=8"], {"embed": "fsdp"}),
    "fsdp4_tp2": (["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2"], {"embed": "fsdp"}),
    "dp2_fsdp2_tp2": (
        ["mesh.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        {"embed": "fsdp"},
    ),
    "zero1_dp8": (["mesh.preset=zero1", "mesh.data=8", "mesh.fsdp=1"], {"params": P()}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(layout, reference):
    overrides, _ = LAYOUTS[layout]
    ref_losses, ref_state = reference
    losses, state = run(overrides, jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    errors = jax.tree.map(relative_error, state.params, ref_state.params)
    worst = max(jax.tree.leaves(errors))
    print(layout, losses, worst)
    assert worst <= 1e-5, errors
