"""The LLaMA model: logical axes on every parameter, scanned layers, remat policies,
tied embeddings and dtype policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY

from jaxtrain import config, models
from jaxtrain.metrics import count_params
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program, model_spec


def tiny(*extra):
    return config.load(None, [*TINY, *extra])


def test_every_parameter_has_logical_axes_and_layers_are_stacked():
    spec = model_spec(tiny(), None, None)
    flat = jax.tree_util.tree_flatten_with_path(
        spec.logical, is_leaf=lambda x: isinstance(x, tuple)
    )[0]
    shapes = jax.tree.leaves(spec.abstract_params)
    assert len(flat) == len(shapes)
    for (path, axes), leaf in zip(flat, shapes, strict=True):
        assert len(axes) == leaf.ndim and None not in axes, (path, axes)
        if "blocks" in str(path):
            assert axes[0] == "layers" and leaf.shape[0] == 2


def test_compiled_program_size_does_not_grow_with_depth():
    def hlo_size(n_layers):
        cfg = tiny(f"model.n_layers={n_layers}")
        program = build_program(cfg, make_mesh(cfg))
        return len(
            program.train_step.lower(program.abstract_state, program.abstract_batch()).as_text()
        )

    small, deep = hlo_size(2), hlo_size(16)
    assert deep < small * 1.05


def logits_and_grads(cfg, tokens):
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policies_do_not_change_numbers(policy):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 128)
    ref_logits, ref_grads = logits_and_grads(tiny(), tokens)
    logits, grads = logits_and_grads(tiny(f"model.remat={policy}"), tokens)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
    )


def test_tied_embeddings_share_the_table():
    untied = model_spec(tiny(), None, None)
    tied = model_spec(tiny("model.tie_embeddings=true"), None, None)
    assert "lm_head" in untied.abstract_params and "lm_head" not in tied.abstract_params
    assert count_params(untied.abstract_params) - count_params(tied.abstract_params) == 64 * 128
    tokens = jnp.zeros((1, 16), jnp.int32)
    logits, _ = logits_and_grads(tiny("model.tie_embeddings=true"), tokens)
    assert logits.shape == (1, 16, 128)


def test_bfloat16_compute_with_float32_params():
    cfg = tiny("model.compute_dtype=bfloat16")
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 128)
    logits, grads = logits_and_grads(cfg, tokens)
    ref_logits, _ = logits_and_grads(tiny(), tokens)
    assert logits.dtype == jnp.float32  # logits are returned in float32 for the loss
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(logits, ref_logits, atol=5e-2)
    assert not np.allclose(logits, ref_logits, atol=1e-6)  # really computed in bf16


def test_rope_positions_matter_and_default_to_arange():
    cfg = tiny()
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 16), 0, 128)
    default = model(tokens)
    explicit = model(tokens, positions=jnp.arange(16)[None])
    shifted = model(tokens, positions=jnp.arange(16)[None] + 5)
    np.testing.assert_allclose(default, explicit, rtol=1e-6)
    # Relative positions are what RoPE encodes: a shift changes nothing...
    np.testing.assert_allclose(default, shifted, rtol=1e-4, atol=1e-4)
    # ...but scrambling them does.
    scrambled = model(tokens, positions=jnp.arange(16)[::-1][None])
    assert not np.allclose(default, scrambled, atol=1e-3)
