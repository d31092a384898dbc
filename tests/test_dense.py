"""weight_einsum: the plain einsum's values and gradients, with the weight gradient formed
and reduced across devices in float32 under bf16 compute."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.models.dense import weight_einsum
from jaxtrain.plan.hlo import collective_traffic

SPECS = {
    "BLD,DNH->BLNH": ((2, 8, 16), (16, 4, 8)),
    "BLNH,NHD->BLD": ((2, 8, 4, 8), (4, 8, 16)),
    "BLD,DF->BLF": ((2, 8, 16), (16, 32)),
}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_plain_einsum(spec, dtype):
    x_shape, w_shape = SPECS[spec]
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape).astype(dtype)
    w = jax.random.normal(kw, w_shape, jnp.float32)

    def plain(x, w):
        return jnp.einsum(spec, x, w.astype(dtype))

    def ours(x, w):
        return weight_einsum(spec, x, w, dtype)

    y, vjp = jax.vjp(ours, x, w)
    y_ref, vjp_ref = jax.vjp(plain, x, w)
    g = jax.random.normal(kg, y.shape).astype(dtype)
    (dx, dw), (dx_ref, dw_ref) = vjp(g), vjp_ref(g)
    assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype and dw.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)


def test_weight_gradient_is_reduced_in_float32():
    """Data-parallel: x's batch sharded, w's gradient summed over devices. The compiled
    cross-device sum is float32 all the way (plain JAX sums bf16 partial sums; XLA:CPU
    widens that all-reduce to f32 around bf16 converts, which the HLO count sees)."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.ShapeDtypeStruct((8, 4, 16), jnp.bfloat16, sharding=batch)
    w = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))

    def reduced(f):
        def loss(x, w):
            return jnp.sum(f(x, w).astype(jnp.float32) ** 2)

        hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile().as_text()
        return collective_traffic(hlo)["all-reduce"]

    ours = reduced(lambda x, w: weight_einsum("BLD,DF->BLF", x, w, jnp.bfloat16))
    plain = reduced(lambda x, w: jnp.einsum("BLD,DF->BLF", x, w.astype(jnp.bfloat16)))
    assert ours.bytes == plain.bytes == 16 * 32 * 4
    assert ours.program_bytes == ours.bytes  # float32 partial sums
    assert plain.program_bytes == plain.bytes // 2  # bf16 partial sums, widened by XLA:CPU


def test_dots_saveable_keeps_weight_matmuls():
    """The custom VJP hides the dot from dots_with_no_batch_dims_saveable; the policy
    named dots_saveable still saves its output instead of recomputing it."""
    from jaxtrain.models.remat import POLICIES as REMAT_POLICIES

    def block(x, w1, w2):
        h = jnp.tanh(weight_einsum("BD,DF->BF", x, w1, jnp.bfloat16))
        return jnp.sum(jnp.tanh(weight_einsum("BF,FD->BD", h, w2, jnp.bfloat16)))

    args = (jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 16)), jnp.ones((16, 8)))

    def matmul_outputs(policy):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(jax.checkpoint(block, policy=policy), *args)
        return sorted(line.split()[0] for line in out.getvalue().splitlines() if "named" in line)

    assert matmul_outputs(REMAT_POLICIES["dots_saveable"]) == ["bf16[4,16]", "bf16[4,8]"]
    assert matmul_outputs(REMAT_POLICIES["full"]) == []


def test_weight_is_gathered_at_the_compute_dtype():
    """ZeRO-3 weights in scanned, rematerialised layers (as models/stack.py runs them):
    the backward pass gathers the bf16 copy, never the float32 weight, so the gathers
    cost what plain JAX's do."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    x = jax.ShapeDtypeStruct(
        (8, 4, 64), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
    )
    w = jax.ShapeDtypeStruct(
        (3, 64, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    )

    def gathered(f):
        @jax.checkpoint
        def layer(x, w):
            return jnp.tanh(f(x, w)), None

        def loss(x, w):
            return jnp.sum(jax.lax.scan(layer, x, w)[0].astype(jnp.float32) ** 2)

        hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile().as_text()
        return collective_traffic(hlo)["all-gather"].program_bytes

    ours = gathered(lambda x, w: weight_einsum("BLD,DF->BLF", x, w, jnp.bfloat16))
    plain = gathered(lambda x, w: jnp.einsum("BLD,DF->BLF", x, w.astype(jnp.bfloat16)))
    assert 0 < ours <= plain, (ours, plain)
