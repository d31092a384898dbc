"""Optimizer state, and master parameters, in host memory (train.offload=opt_state,
opt_state+params): the same numbers, the state where it should be, and checkpoints that
move between offloaded and not."""

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


OFFLOADS = ("none", "opt_state", "opt_state+params")


@pytest.fixture(scope="module")
def runs():
    """Three steps each way (8 devices, ZeRO-3): (program, state, losses) per offload."""
    out = {}
    for offload in OFFLOADS:
        p = program(offload)
        state, losses = p.init_state(), []
        for seed in range(3):
            state, metrics = p.train_step(state, batch(p, seed))
            losses.append(float(metrics["loss"]))
        out[offload] = (p, state, losses)
    return out


@pytest.mark.parametrize("offload", OFFLOADS[1:])
def test_offloaded_state_trains_bit_exact(runs, offload):
    _, plain, plain_losses = runs["none"]
    _, offloaded, losses = runs[offload]
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


def test_offloaded_parameters_live_in_host_memory_and_evaluate_on_devices(runs):
    """With opt_state+params the master parameters are pinned-host arrays between steps
    too (the step's signature takes and returns them there); the eval step reads them
    from there, and ``device_params`` hands generation a device copy."""
    p, state, _ = runs["opt_state+params"]
    assert kinds(state.opt_state) == kinds(state.params) == {"pinned_host"}
    signature = p.train_step.lower(p.abstract_state, p.abstract_batch()).compile().as_text()
    offloaded = len(jax.tree.leaves(state.opt_state)) + len(jax.tree.leaves(state.params))
    assert signature.splitlines()[0].count("S(5)") == 2 * offloaded
    plain, plain_state, _ = runs["none"]
    eval_batch = batch(p, 7)
    got = p.eval_step(state.params, eval_batch)
    want = plain.eval_step(plain_state.params, eval_batch)
    assert float(got["loss_sum"]) == float(want["loss_sum"])
    on_devices = p.device_params(state.params)
    assert kinds(on_devices) == {"device"}
    jax.tree.map(np.testing.assert_array_equal, on_devices, plain_state.params)


def test_checkpoints_move_between_offloaded_and_not(runs, tmp_path):
    """A checkpoint of an offloaded run restores onto devices, and one written on devices
    restores into host memory: the layout is the reader's."""
    pairs = [("opt_state", "none"), ("none", "opt_state")]
    pairs += [("opt_state+params", "none"), ("none", "opt_state+params")]
    for saved, read in pairs:
        writer, state, _ = runs[saved]
        checkpointer = Checkpointer(tmp_path / f"{saved}-{read}", writer.config.checkpoint)
        checkpointer.save(3, state, writer.config)
        checkpointer.wait()
        reader = runs[read][0]
        restored, _ = checkpointer.restore(3, reader.abstract_state)
        want = "device" if read == "none" else "pinned_host"
        assert kinds(restored.opt_state) == {want}
        assert kinds(restored.params) == {"pinned_host" if read == "opt_state+params" else "device"}
        jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
        jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
        checkpointer.close()


def test_plan_counts_the_offloaded_state_out_of_device_memory(runs):
    plain, offloaded, both = (make_plan(runs[k][0]).memory for k in OFFLOADS)
    assert plain.host == 0 and offloaded.host == offloaded.optimizer > 0
    assert offloaded.peak == plain.peak - offloaded.host
    assert both.host == both.optimizer + both.parameters
    print(plain, offloaded, both)
    assert both.peak < offloaded.peak


def device_puts_in_scans(jaxpr, inside=False):
    """(memory space, operand type) of every device_put inside a scan's body."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "device_put" and inside:
            found += [
                (str(d), str(v.aval))
                for d, v in zip(eqn.params["devices"], eqn.invars, strict=True)
            ]
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", value)
            if hasattr(sub, "eqns"):
                found += device_puts_in_scans(sub, inside or eqn.primitive.name == "scan")
    return found


def test_offloaded_parameters_stream_a_layer_at_a_time():
    """The step's layer scan copies each layer's parameters from host memory to the
    device inside its body (forward, and again for the rematerialised backward) and
    sends that layer's gradients back: the whole stack is never fetched before it. With
    microbatches and remat the run is still bit-exact."""
    extra = ["model.remat=full", "train.microbatches=2", "train.global_batch=16"]
    cfg = config.load(None, [*TINY, "train.offload=opt_state+params", *extra])
    p = build_program(cfg, make_mesh(cfg))
    jaxpr = jax.make_jaxpr(p.train_step)(p.abstract_state, p.abstract_batch()).jaxpr
    puts = device_puts_in_scans(jaxpr)
    leaves = zip(
        jax.tree.leaves(p.abstract_state.params),
        jax.tree.leaves(p.spec.logical, is_leaf=lambda x: isinstance(x, tuple)),
        strict=True,
    )
    layer_shapes = [leaf.shape[1:] for leaf, axes in leaves if axes[0] == "layers"]

    def per_layer(space):
        """The per-layer shapes that device_puts inside scans move into ``space``."""
        return sorted(
            tuple(int(n) for n in t.split("[")[1].rstrip("]").split(",") if n)
            for where, t in puts
            if where.endswith(space) and ("<host>" in t) == (space == "Device")
        )

    one_layer = sorted(layer_shapes)
    # Forward and rematerialised backward each fetch one layer; its gradients go back.
    assert [s for s in per_layer("Device") if s in one_layer] == sorted(2 * layer_shapes)
    assert per_layer("Host") == one_layer

    plain_cfg = config.load(None, [*TINY, *extra])
    plain = build_program(plain_cfg, make_mesh(plain_cfg))
    states = [p.init_state(), plain.init_state()]
    for seed in range(2):
        tokens = np.random.default_rng(seed).integers(0, 128, (16, 17))
        data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        losses = []
        for i, prog in enumerate((p, plain)):
            states[i], metrics = prog.train_step(
                states[i], jax.device_put(data, prog.batch_sharding)
            )
            losses.append(float(metrics["loss"]))
        assert losses[0] == losses[1]
    jax.tree.map(np.testing.assert_array_equal, states[0].params, states[1].params)
