"""The core guarantee: every mesh layout computes the same numbers as one device.

Three AdamW steps of a tiny model (2 layers, width 64) on each layout must give the
same losses and final parameters as one device, and the state must really be laid out
as the preset says.
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import TINY

from jaxtrain import config
from jaxtrain.sharding import make_mesh, path_str
from jaxtrain.train import build_program

STEPS = (*TINY, "train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-3")


def random_batches(cfg, n):
    rng = np.random.default_rng(0)
    shape = (cfg.train.global_batch, cfg.data.seq_len + 1)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    return out


def run(overrides, devices):
    cfg = config.load(None, [*STEPS, *overrides])
    program = build_program(cfg, make_mesh(cfg, devices))
    state = program.init_state()
    losses = []
    for batch in random_batches(cfg, cfg.train.steps):
        state, metrics = program.train_step(state, jax.device_put(batch, program.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@functools.cache
def one_device(extra=()):
    return run(["mesh.fsdp=1", *extra], jax.devices()[:1])


def relative_error(a, b):
    """max |a - b| / max |b|: float32 rounding differs between layouts by reduction order,
    so near-zero elements are judged against the scale of their tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_same_run(result, reference):
    (losses, state), (ref_losses, ref_state) = result, reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    errors = jax.tree.map(relative_error, state.params, ref_state.params)
    assert max(jax.tree.leaves(errors)) <= 1e-5, errors


def specs(tree, suffix):
    """PartitionSpecs of the leaves whose path ends with ``suffix`` (e.g. 'mlp/w_gate')."""
    found = [
        leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if path_str(path).endswith(suffix)
    ]
    assert found, suffix
    return found


# layout -> (overrides, {path suffix: expected PartitionSpec} for params, and for mu/nu)
LAYOUTS = {
    "dp8": (
        ["mesh.preset=dp", "mesh.data=8", "mesh.fsdp=1"],
        {"embed": P(None, None), "mlp/w_gate": P(None, None, None)},
        {"mlp/w_gate": P(None, None, None)},
    ),
    "fsdp8": (
        ["mesh.preset=fsdp", "mesh.fsdp=8"],
        {
            "embed": P(None, "fsdp"),
            "mlp/w_gate": P(None, "fsdp", None),
            "attn/wo": P(None, None, None, "fsdp"),
        },
        {"mlp/w_gate": P(None, "fsdp", None)},
    ),
    "fsdp4_tp2": (
        ["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2"],
        {
            "embed": P("tensor", "fsdp"),
            "mlp/w_gate": P(None, "fsdp", "tensor"),
            "attn/wk": P(None, "fsdp", "tensor", None),
            "lm_head": P("fsdp", "tensor"),
        },
        {"mlp/w_down": P(None, "tensor", "fsdp")},
    ),
    "dp2_fsdp2_tp2": (
        ["mesh.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        {"embed": P("tensor", "fsdp"), "attn/wq": P(None, "fsdp", "tensor", None)},
        {"attn/wq": P(None, "fsdp", "tensor", None)},
    ),
    "zero1_dp8": (
        ["mesh.preset=zero1", "mesh.data=8", "mesh.fsdp=1"],
        {"embed": P(None, None), "mlp/w_gate": P(None, None, None)},
        {"mlp/w_gate": P(None, "data", None), "embed": P(None, "data")},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(layout):
    overrides, param_specs, opt_specs = LAYOUTS[layout]
    result = run(overrides, jax.devices())
    assert_same_run(result, one_device())
    state = result[1]
    for suffix, spec in param_specs.items():
        assert specs(state.params, suffix) == [spec], (layout, suffix)
    for suffix, spec in opt_specs.items():
        found = specs(state.opt_state, suffix)  # mu and nu
        assert found == [spec, spec], (layout, suffix, found)


def test_dropout_is_layout_independent():
    """Per-step dropout keys come from fold_in(seed, step) and are sharding-invariant."""
    extra = ("model.dropout=0.1",)
    result = run(["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2", *extra], jax.devices())
    reference = one_device(extra)
    assert_same_run(result, reference)
    assert not np.allclose(reference[0], one_device()[0])  # dropout really was on


def test_gradient_accumulation_matches_one_big_batch():
    """4 microbatches of 2 rows == one batch of 8 rows (on a 2-way fsdp mesh)."""
    devices = jax.devices()[:2]
    accumulated = run(["mesh.fsdp=2", "train.microbatches=4"], devices)
    whole = run(["mesh.fsdp=2", "train.microbatches=1"], devices)
    assert_same_run(accumulated, whole)


def test_chunked_attention_train_step_matches_reference():
    """The block-skipping attention path gives the reference's training run, sharded."""
    layout = ["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2", "data.seq_len=256"]
    chunked = run([*layout, "model.attention=chunked"], jax.devices())
    reference = run([*layout, "model.attention=xla"], jax.devices())
    assert_same_run(chunked, reference)
