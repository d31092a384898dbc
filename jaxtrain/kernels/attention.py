"""Attention dispatch. ``impl="xla"`` is the plain-JAX reference: the specification that
every faster implementation is tested against. ``impl="chunked"`` is the same math
computed block by block so that causal attention skips the key blocks a query block can
never see (about half the work at long lengths); ``impl="auto"`` picks the fastest
implementation that applies.

Shapes: B batch, L query length, S key length, N query heads, K kv heads, H head dim.
Grouped-query attention (Ainslie et al., 2023) is computed by viewing the N query heads
as K groups of G = N / K, so K and V are never repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "chunked")
CHUNK = 128


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


def chunked_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    chunk: int = CHUNK,
) -> jax.Array:
    """Causal attention by query blocks: block i attends to keys [0, (i + 1) * chunk).

    Same contract as :func:`xla_attention` with ``causal=True``; needs L == S and L
    divisible by ``chunk``. Heads are moved in front of the length so every einsum is a
    plain batched matmul.
    """
    b, length, n, h = q.shape
    kv = k.shape[2]
    scale = h**-0.5 if scale is None else scale
    qh = q.transpose(0, 2, 1, 3).reshape(b, kv, n // kv, length, h)  # [B, K, G, L, H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    outs = []
    for i in range(length // chunk):
        start, stop = i * chunk, (i + 1) * chunk
        scores = jnp.einsum(
            "BKGLH,BKSH->BKGLS",
            qh[:, :, :, start:stop],
            kh[:, :, :stop],
            preferred_element_type=jnp.float32,
        )
        seg = None if segment_ids is None else segment_ids[:, start:stop]
        keys_seg = None if segment_ids is None else segment_ids[:, :stop]
        mask = _mask(chunk, stop, True, seg, keys_seg)
        scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("BKGLS,BKSH->BKGLH", probs, vh[:, :, :stop]))
    out = jnp.concatenate(outs, axis=3).reshape(b, n, length, h)
    return out.transpose(0, 2, 1, 3)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Dispatch attention to an implementation; see :func:`xla_attention` for the contract.

    ``auto`` uses ``chunked`` where it applies (causal, equal query and key lengths, a
    length that is a multiple of, and longer than, the block) and the reference elsewhere.
    """
    length = q.shape[1]
    chunkable = causal and k.shape[1] == length and length % CHUNK == 0 and length > CHUNK
    if impl == "chunked" or (impl == "auto" and chunkable):
        if not chunkable:
            raise ValueError(f"chunked attention needs causal, L == S, L % {CHUNK} == 0")
        return chunked_causal_attention(q, k, v, segment_ids=segment_ids, scale=scale)
    if impl in ("xla", "auto"):
        return xla_attention(q, k, v, segment_ids=segment_ids, causal=causal, scale=scale)
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
