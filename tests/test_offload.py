"""Optimizer state in host memory (train.offload=opt_state): the same numbers, the state
where it should be, and checkpoints that move between offloaded and not."""

import jax
import numpy as np
import pytest
from tiny import TINY

from jaxtrain import config
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.plan.report import make_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program


def program(offload):
    cfg = config.load(None, [*TINY, f"train.offload={offload}"])
    return build_program(cfg, make_mesh(cfg))


def batch(p, seed):
    tokens = np.random.default_rng(seed).integers(0, 128, (8, 17))
    return jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, p.batch_sharding)


def kinds(tree):
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def runs():
    """Three steps each way (8 devices, ZeRO-3): (program, state, losses) per offload."""
    out = {}
    for offload in ("none", "opt_state"):
        p = program(offload)
        state, losses = p.init_state(), []
        for seed in range(3):
            state, metrics = p.train_step(state, batch(p, seed))
            losses.append(float(metrics["loss"]))
        out[offload] = (p, state, losses)
    return out


def test_offloaded_state_trains_bit_exact(runs):
    _, plain, plain_losses = runs["none"]
    _, offloaded, losses = runs["opt_state"]
    assert losses == plain_losses
    jax.tree.map(np.testing.assert_array_equal, offloaded.params, plain.params)
    jax.tree.map(np.testing.assert_array_equal, offloaded.opt_state, plain.opt_state)


def test_the_optimizer_state_lives_in_host_memory(runs):
    """Between steps the moments are pinned-host arrays and the parameters device
    arrays; the compiled step takes and returns them in host memory (XLA's memory space
    S(5) in its signature), one per optimizer-state leaf each way."""
    p, state, _ = runs["opt_state"]
    assert kinds(state.opt_state) == {"pinned_host"} and kinds(state.params) == {"device"}
    assert kinds(runs["none"][1].opt_state) == {"device"}
    signature = p.train_step.lower(p.abstract_state, p.abstract_batch()).compile().as_text()
    signature = signature.splitlines()[0]  # HloModule ..., entry_computation_layout={...}
    assert signature.count("S(5)") == 2 * len(jax.tree.leaves(state.opt_state))


def test_checkpoints_move_between_offloaded_and_not(runs, tmp_path):
    """A checkpoint of an offloaded run restores onto devices, and one written on devices
    restores into host memory: the layout is the reader's."""
    for saved, read in (("opt_state", "none"), ("none", "opt_state")):
        writer, state, _ = runs[saved]
        checkpointer = Checkpointer(tmp_path / saved, writer.config.checkpoint)
        checkpointer.save(3, state, writer.config)
        checkpointer.wait()
        reader = runs[read][0]
        restored, _ = checkpointer.restore(3, reader.abstract_state)
        want = "pinned_host" if read == "opt_state" else "device"
        assert kinds(restored.opt_state) == {want}
        jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
        checkpointer.close()


def test_plan_counts_the_offloaded_state_out_of_device_memory(runs):
    plain, offloaded = (make_plan(runs[k][0]).memory for k in ("none", "opt_state"))
    assert plain.host == 0 and offloaded.host == offloaded.optimizer > 0
    assert offloaded.peak == plain.peak - offloaded.host
