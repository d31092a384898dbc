"""Remat policies by name: each trains exactly like no remat, saves what it says, and
the offloading one moves its saved activations to host memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY

from jaxtrain import config
from jaxtrain.models import remat
from jaxtrain.plan.report import make_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program
from jaxtrain.train.state import model_spec


def test_the_config_offers_every_policy():
    assert config.REMAT_POLICIES == remat.NAMES


def two_steps(policy, *extra):
    cfg = config.load(None, [*TINY, f"model.remat={policy}", *extra])
    program = build_program(cfg, make_mesh(cfg))
    tokens = np.random.default_rng(0).integers(0, 128, (8, 17))
    batch = jax.device_put(
        {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, program.batch_sharding
    )
    state, rows = program.init_state(), []
    for _ in range(2):
        state, metrics = program.train_step(state, batch)
        rows.append(jax.device_get(metrics))
    return rows, jax.device_get(state.params)


@pytest.fixture(scope="module")
def no_remat():
    return two_steps("none")


@pytest.mark.parametrize("policy", remat.NAMES[1:])
def test_policy_trains_like_no_remat(policy, no_remat):
    """Recomputing instead of saving changes no number (8 devices, fsdp, float32)."""
    rows, params = two_steps(policy)
    want_rows, want_params = no_remat
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, want_params
    )


def test_a_fraction_of_the_layers_rematerialised():
    """model.remat_fraction=0.5 of 4 layers: the first 2 are recomputed, the last 2 save
    everything; the numbers are unchanged and the memory lies between the policies."""
    layers = "model.n_layers=4"
    rows, params = two_steps("full", layers, "model.remat_fraction=0.5")
    want_rows, want_params = two_steps("none", layers)
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want_rows], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, want_params
    )
    temps = {}
    for name, extra in {"none": [], "half": ["model.remat_fraction=0.5"], "full": []}.items():
        remat_ = "none" if name == "none" else "full"
        cfg = config.load(None, [*TINY, layers, f"model.remat={remat_}", *extra])
        temps[name] = make_plan(build_program(cfg, make_mesh(cfg))).memory.temporaries
    assert temps["full"] < temps["half"] < temps["none"], temps


def saved(policy):
    """The shapes the model's backward pass keeps per layer (stacked [layers, ...]),
    outside the parameters: what the policy saves, as JAX's partial evaluation decides."""
    cfg = config.load(None, [*TINY, f"model.remat={policy}"])
    spec = model_spec(cfg, None, None)
    vjp = jax.eval_shape(
        lambda p, t: jax.vjp(lambda q: spec.apply(q, t), p)[1],
        spec.abstract_params,
        jnp.zeros((8, 16), jnp.int32),
    )
    acts = [x.shape for x in jax.tree.leaves(vjp) if x.ndim >= 4 and x.shape[:2] == (2, 8)]
    return sorted(acts)


def test_policies_save_what_they_name():
    """[layers=2, B=8, L=16, ...] residuals per policy on the tiny model (D 64, 4 query
    heads and 2 KV heads of 16, F 128)."""
    x = (2, 8, 16, 64)  # the block's input, [B, L, D]
    q, kv, mlp_in = (2, 8, 16, 4, 16), (2, 8, 16, 2, 16), (2, 8, 16, 128)
    assert saved("full") == [x]  # each block's input, and nothing it computes
    attention = sorted([x, x, q, kv, kv])  # the input and q, k, v, o
    assert saved("save_qkvo_proj") == attention
    assert saved("save_dots_except_mlp_in") == attention
    assert saved("dots_saveable") == sorted([*attention, mlp_in, mlp_in])
    assert saved("offload_dots") == saved("dots_saveable")


def test_offload_policy_moves_saved_activations_to_host():
    """The traced step sends the saved matmul outputs to host memory in the forward pass
    and back in the backward pass (XLA:CPU, with one memory, compiles the copies away;
    on GPU/TPU they are transfers)."""
    cfg = config.load(None, [*TINY, "model.remat=offload_dots"])
    program = build_program(cfg, make_mesh(cfg))
    jaxpr = str(
        jax.make_jaxpr(program.train_step)(program.abstract_state, program.abstract_batch())
    )
    assert "MemorySpace.Host" in jaxpr and "MemorySpace.Device" in jaxpr
    plain = build_program(config.load(None, [*TINY, "model.remat=dots_saveable"]), make_mesh(cfg))
    jaxpr = str(jax.make_jaxpr(plain.train_step)(plain.abstract_state, plain.abstract_batch()))
    assert "MemorySpace.Host" not in jaxpr
