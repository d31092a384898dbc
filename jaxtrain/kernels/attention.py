"""Attention dispatch. ``impl="xla"`` is the plain-JAX reference: the specification that
every faster implementation is tested against.

Shapes: B batch, L query length, S key length, N query heads, K kv heads, H head dim.
Grouped-query attention (Ainslie et al., 2023) is computed by viewing the N query heads
as K groups of G = N / K, so K and V are never repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla",)


def _mask(
    q_len: int, k_len: int, causal: bool, q_segments: jax.Array | None, k_segments: jax.Array | None
) -> jax.Array | None:
    """A boolean [B or 1, 1, 1, L, S] mask: True where a query may attend to a key."""
    mask = None
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
        mask = (q_pos >= jnp.arange(k_len)[None, :])[None, None, None]
    if q_segments is not None:
        same = q_segments[:, :, None] == k_segments[:, None, :]  # [B, L, S]
        same = same[:, None, None]
        mask = same if mask is None else mask & same
    return mask


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention in plain JAX, accumulating in float32.

    Args:
        q: [B, L, N, H] queries.
        k: [B, S, K, H] keys, K dividing N.
        v: [B, S, K, H] values.
        segment_ids: optional [B, L] ints (L == S); tokens attend only within a segment.
        causal: mask keys after each query.
        scale: softmax scale; default 1 / sqrt(H).

    Returns:
        [B, L, N, H] in q's dtype.
    """
    b, q_len, n, h = q.shape
    k_len, kv = k.shape[1], k.shape[2]
    scale = h**-0.5 if scale is None else scale
    q = q.reshape(b, q_len, kv, n // kv, h)  # [B, L, K, G, H]
    scores = jnp.einsum("BLKGH,BSKH->BKGLS", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    mask = _mask(q_len, k_len, causal, segment_ids, segment_ids)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGLS,BSKH->BLKGH", probs, v)
    return out.reshape(b, q_len, n, h)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Dispatch attention to an implementation; see :func:`xla_attention` for the contract."""
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids=segment_ids, causal=causal, scale=scale)
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
