"""Transformer building blocks with logical axis names on every parameter.

RMSNorm (Zhang & Sennrich, 2019), rotary position embeddings (Su et al., 2021),
grouped-query attention (Ainslie et al., 2023) and the SwiGLU MLP (Shazeer, 2020), as
used by LLaMA (Touvron et al., 2023).

Dimensions: B batch, L length, D model width, N query heads, K kv heads, H head dim,
F MLP width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.kernels import attention

Shard = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
Initializer = Callable[..., jax.Array]


def no_shard(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """The activation constraint used when no mesh is given: the identity."""
    del axes
    return x


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: tuple[str | None, ...],
    dtype: jnp.dtype,
) -> nnx.Param:
    """A parameter carrying its logical axes as ``out_sharding`` metadata."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False
    )


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each [B, L, H/2] in float32, for integer ``positions`` [B, L]."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate [B, L, N, H] by position, pairing dimension i with i + H/2 (LLaMA/HF layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``rate`` is 0 or there is no key (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        out_std: float,
        impl: str,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        shard: Shard,
        rngs: nnx.Rngs,
    ):
        head_dim = d_model // n_heads
        init = nnx.initializers.normal(0.02)
        self.wq = param(
            rngs, init, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype
        )
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.wk = param(rngs, init, (d_model, n_kv_heads, head_dim), kv_axes, param_dtype)
        self.wv = param(rngs, init, (d_model, n_kv_heads, head_dim), kv_axes, param_dtype)
        out_init = nnx.initializers.normal(out_std)
        self.wo = param(
            rngs,
            out_init,
            (n_heads, head_dim, d_model),
            ("heads", "head_dim", "embed"),
            param_dtype,
        )
        self.impl = impl
        self.compute_dtype = compute_dtype
        self.shard = shard

    def __call__(
        self, x: jax.Array, sin: jax.Array, cos: jax.Array, segment_ids: jax.Array | None
    ) -> jax.Array:
        dt = self.compute_dtype
        q = jnp.einsum("BLD,DNH->BLNH", x, self.wq[...].astype(dt))
        k = jnp.einsum("BLD,DKH->BLKH", x, self.wk[...].astype(dt))
        v = jnp.einsum("BLD,DKH->BLKH", x, self.wv[...].astype(dt))
        q = self.shard(apply_rope(q, sin, cos), ("batch", "length", "act_heads", None))
        k = self.shard(apply_rope(k, sin, cos), ("batch", "length", "act_kv_heads", None))
        v = self.shard(v, ("batch", "length", "act_kv_heads", None))
        out = attention(q, k, v, segment_ids=segment_ids, causal=True, impl=self.impl)
        return jnp.einsum("BLNH,NHD->BLD", out, self.wo[...].astype(dt))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        d_model: int,
        mlp_dim: int,
        *,
        out_std: float,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        shard: Shard,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)
        self.w_gate = param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"), param_dtype)
        self.w_up = param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"), param_dtype)
        out_init = nnx.initializers.normal(out_std)
        self.w_down = param(rngs, out_init, (mlp_dim, d_model), ("mlp", "embed"), param_dtype)
        self.compute_dtype = compute_dtype
        self.shard = shard

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        gate = jnp.einsum("BLD,DF->BLF", x, self.w_gate[...].astype(dt))
        up = jnp.einsum("BLD,DF->BLF", x, self.w_up[...].astype(dt))
        hidden = self.shard(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return jnp.einsum("BLF,FD->BLD", hidden, self.w_down[...].astype(dt))
