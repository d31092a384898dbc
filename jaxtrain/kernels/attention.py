"""Attention dispatch. ``impl="xla"`` is the plain-JAX reference: the specification that
every faster implementation is tested against. ``impl="chunked"`` is the same math
computed block by block so that causal attention skips the key blocks a query block can
never see (about half the work at long lengths). ``impl="pallas"`` is the FlashAttention-2
kernel of :mod:`jaxtrain.kernels.flash` (interpreted on CPU), ``impl="cudnn"`` is cuDNN's
fused attention through ``jax.nn.dot_product_attention`` (GPU only). ``impl="auto"``
picks cuDNN on GPU where it applies and Pallas otherwise, Pallas on TPU, and the fastest
correct path on CPU (:func:`resolve_impl`).

Shapes: B batch, L query length, S key length, N query heads, K kv heads, H head dim.
Grouped-query attention (Ainslie et al., 2023) is computed by viewing the N query heads
as K groups of G = N / K, so K and V are never repeated in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtrain.errors import UserError
from jaxtrain.kernels.flash import flash_attention

IMPLS = ("auto", "xla", "chunked", "pallas", "cudnn")
KERNEL_IMPLS = ("pallas", "cudnn")  # run per shard, on local blocks (see sharding.per_shard)
CHUNK = 128


def _mask(
    q_len: int,
    k_len: int,
    causal: bool,
    q_segments: jax.Array | None,
    k_segments: jax.Array | None,
    window: int | None = None,
) -> jax.Array | None:
    """A boolean [B or 1, 1, 1, L, S] mask: True where a query may attend to a key.

    Query i sits at key position ``i + S - L`` (the last query is aligned with the last
    key). ``window`` keeps keys less than ``window`` positions away (before the query,
    and after it too when not causal).
    """
    mask = None
    q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
    k_pos = jnp.arange(k_len)[None, :]
    if causal:
        mask = (q_pos >= k_pos)[None, None, None]
    if window is not None:
        near = q_pos - k_pos < window
        if not causal:
            near &= k_pos - q_pos < window
        near = near[None, None, None]
        mask = near if mask is None else mask & near
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
    window: int | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    heads_first: bool = False,
) -> jax.Array:
    """Softmax attention in plain JAX, accumulating in float32.

    Query i is at key position ``i + S - L`` (the last query sees the last key).

    Args:
        q: [B, L, N, H] queries.
        k: [B, S, K, H] keys, K dividing N.
        v: [B, S, K, H] values.
        segment_ids: optional [B, L] ints (L == S); tokens attend only within a segment.
        causal: mask keys after each query.
        window: sliding window (Beltagy et al., 2020; Mistral): a query sees only keys
            fewer than ``window`` positions before it (and after it, when not causal),
            itself included. ``None`` sees every key.
        scale: softmax scale; default 1 / sqrt(H).
        bias: optional [1 or B, N, L, S] added to the scaled scores (T5's relative
            position bias; Raffel et al., 2020). Only this reference takes one.
        mask: optional [B, L, S] bool, True where a query may see a key, on top of the
            other masks (a KV cache's filled, unpadded slots). Only this reference takes
            one; every query must see at least one key.
        heads_first: k and v are [B, K, S, H] (a KV cache's layout) instead.

    Returns:
        [B, L, N, H] in q's dtype.
    """
    b, q_len, n, h = q.shape
    kv_spec = "BKSH" if heads_first else "BSKH"
    k_len, kv = k.shape[kv_spec.index("S")], k.shape[kv_spec.index("K")]
    scale = h**-0.5 if scale is None else scale
    q = q.reshape(b, q_len, kv, n // kv, h)  # [B, L, K, G, H]
    scores = jnp.einsum(f"BLKGH,{kv_spec}->BKGLS", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32).reshape(-1, kv, n // kv, q_len, k_len)
    visible = _mask(q_len, k_len, causal, segment_ids, segment_ids, window)
    if mask is not None:
        given = mask[:, None, None]
        visible = given if visible is None else visible & given
    if visible is not None:
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"BKGLS,{kv_spec}->BLKGH", probs, v)
    return out.reshape(b, q_len, n, h)


def chunked_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    chunk: int = CHUNK,
) -> jax.Array:
    """Causal attention by query blocks: block i attends to keys [0, (i + 1) * chunk).

    Same contract as :func:`xla_attention` with ``causal=True``; needs L == S and L
    divisible by ``chunk``. Heads are moved in front of the length so every einsum is a
    plain batched matmul. A ``window`` is applied as a mask (no extra blocks skipped).
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
        mask = _mask(chunk, stop, True, seg, keys_seg, window)
        scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("BKGLS,BKSH->BKGLH", probs, vh[:, :, :stop]))
    out = jnp.concatenate(outs, axis=3).reshape(b, n, length, h)
    return out.transpose(0, 2, 1, 3)


def resolve_impl(
    impl: str,
    *,
    causal: bool,
    q_len: int,
    k_len: int,
    biased: bool = False,
    dtype=None,
    head_dim: int | None = None,
    segments: bool = False,
    window: int | None = None,
) -> str:
    """The implementation ``impl`` stands for on this backend (``auto`` made concrete).

    ``auto`` on GPU is ``cudnn`` for the calls cuDNN's fused attention takes whole and
    ``pallas`` for the rest; on TPU it is ``pallas``. The cuDNN calls are bfloat16 or
    float16 (``dtype``) with a head dim (``head_dim``) of at most 128 in steps of 8, no
    segment ids (they would become a dense [B, 1, L, S] mask), no ``window``, and equal
    lengths when causal. A caller that leaves ``dtype`` out (the context-parallel ring,
    whose blocks take the Pallas kernel) keeps ``pallas``. On an H200 cuDNN ran the
    bfloat16 forward + backward 1.9-2.0x faster than the Pallas kernel
    (``benchmarks/RESULTS.md``). On CPU ``auto`` is ``chunked`` where that applies
    (causal, equal query and key lengths, a length that is a multiple of, and longer
    than, the block) and the reference elsewhere: the interpreted kernel is for testing.
    Attention with an additive score bias (``biased``) is always the reference.

    Raises:
        ValueError: for an unknown ``impl``.
        UserError: for a biased call with an implementation other than auto or xla.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if biased:
        if impl not in ("auto", "xla"):
            raise UserError(
                f"model.attention: {impl!r} takes no additive score bias (T5's relative "
                "positions); use auto or xla"
            )
        return "xla"
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        heads_fit = head_dim is not None and head_dim <= 128 and head_dim % 8 == 0
        whole = not segments and window is None and (not causal or q_len == k_len)
        return "cudnn" if half and heads_fit and whole else "pallas"
    if backend == "tpu":
        return "pallas"
    chunkable = causal and k_len == q_len and q_len % CHUNK == 0 and q_len > CHUNK
    return "chunked" if chunkable else "xla"


def resolve_call(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None,
    window: int | None,
    biased: bool,
) -> str:
    """:func:`resolve_impl` for the call ``attention(q, k, ...)``: lengths, dtype and head
    dim read off q [B, L, N, H] and k [B, S, K, H]."""
    return resolve_impl(
        impl,
        causal=causal,
        q_len=q.shape[1],
        k_len=k.shape[1],
        biased=biased,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        segments=segment_ids is not None,
        window=window,
    )


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """cuDNN fused attention via ``jax.nn.dot_product_attention``; same contract as
    :func:`xla_attention`, on a GPU with bfloat16 or float16 inputs.

    Segment ids become a dense [B, 1, L, S] boolean mask (cuDNN's packed-sequence path
    wants per-document offsets instead), so packed batches use O(L * S) memory here.
    cuDNN aligns a causal mask at the first query, not the last, so causal needs L == S.

    Raises:
        UserError: off GPU, or for float32 inputs (the message names ``model.attention``,
            the only way a run reaches this).
        ValueError: causal with L != S.
    """
    backend = jax.default_backend()
    if backend != "gpu":
        raise UserError(
            f"model.attention: 'cudnn' needs a GPU, but JAX runs on {backend}; "
            "use auto, pallas or xla"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
            f"model.attention: 'cudnn' needs bfloat16 or float16 activations, got {q.dtype}; "
            "set model.compute_dtype=bfloat16 or use pallas"
        )
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("cudnn causal attention needs equal query and key lengths")
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, L, S]
    local = None if window is None else (window - 1, 0 if causal else window - 1)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=causal,
        local_window_size=local,
        implementation="cudnn",
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Dispatch attention to an implementation; see :func:`xla_attention` for the contract
    and :func:`resolve_impl` for what ``auto`` picks (the reference, given a ``bias``).

    ``pallas`` and ``cudnn`` see whole arrays: inside a sharded program call them per
    shard (``jaxtrain.sharding.per_shard``), as the model's attention layer does.

    Raises:
        ValueError: for an unknown ``impl`` or ``chunked`` where it does not apply.
        UserError: for ``cudnn`` off GPU or on float32 inputs.
    """
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1, got {window}")
    length = q.shape[1]
    impl = resolve_call(impl, q, k, causal=causal, segment_ids=segment_ids, window=window,
                        biased=bias is not None)  # fmt: skip
    kwargs = dict(segment_ids=segment_ids, window=window, scale=scale)
    if impl == "chunked":
        if not (causal and k.shape[1] == length and length % CHUNK == 0):
            raise ValueError(f"chunked attention needs causal, L == S, L % {CHUNK} == 0")
        return chunked_causal_attention(q, k, v, **kwargs)
    if impl == "pallas":
        return flash_attention(q, k, v, causal=causal, **kwargs)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, causal=causal, **kwargs)
    return xla_attention(q, k, v, causal=causal, bias=bias, **kwargs)
