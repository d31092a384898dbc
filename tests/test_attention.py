"""Every attention implementation equals the plain-XLA reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.kernels import attention, chunked_causal_attention, xla_attention


def inputs(seed, b=2, length=256, n=4, kv=2, h=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, length, n, h), dtype)
    k = jax.random.normal(keys[1], (b, length, kv, h), dtype)
    v = jax.random.normal(keys[2], (b, length, kv, h), dtype)
    return q, k, v


def segments(b, length, seed):
    """Several documents per row: ids increase at random boundaries."""
    rng = np.random.default_rng(seed)
    starts = np.zeros((b, length), np.int32)
    for row in range(b):
        starts[row, rng.choice(np.arange(1, length), size=3, replace=False)] = 1
    return jnp.asarray(np.cumsum(starts, axis=1))


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("with_segments", [False, True])
def test_chunked_matches_reference(kv, with_segments):
    q, k, v = inputs(kv, kv=kv)
    seg = segments(2, 256, kv) if with_segments else None

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, segment_ids=seg)))

    ref = jax.value_and_grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    out = jax.value_and_grad(loss(chunked_causal_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_segments_block_cross_document_attention():
    q, k, v = inputs(0, length=256)
    seg = jnp.concatenate([jnp.zeros((2, 128), jnp.int32), jnp.ones((2, 128), jnp.int32)], 1)
    full = chunked_causal_attention(q, k, v, segment_ids=seg)
    alone = xla_attention(q[:, 128:], k[:, 128:], v[:, 128:])
    np.testing.assert_allclose(full[:, 128:], alone, rtol=1e-5, atol=1e-5)


def test_auto_dispatch():
    q, k, v = inputs(1, length=256)
    np.testing.assert_allclose(attention(q, k, v), xla_attention(q, k, v), rtol=1e-5, atol=1e-5)
    short = [x[:, :100] for x in (q, k, v)]  # not a multiple of the block: the reference
    np.testing.assert_array_equal(attention(*short), xla_attention(*short))
    with pytest.raises(ValueError):
        attention(*short, impl="chunked")
