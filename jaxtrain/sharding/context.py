"""Context parallelism: attention over a sequence sharded along the ``sequence`` mesh axis.

Each of the ``n`` devices of the ``sequence`` axis holds ``L / n`` positions of every
array: its queries, and the keys and values of the same positions. Two ways to let every
query see every key it may:

- ``ring`` (Liu et al., 2023, Ring Attention): the key/value blocks travel around the
  ring with ``ppermute``; at each of the ``n`` steps a device attends its queries to the
  block it holds and folds the partial result into a running one with the online-softmax
  rule (running max ``m``, normaliser ``l``, unnormalised output ``o``; Milakov &
  Gimelshein, 2018). No device ever holds more than one remote block, and autodiff of the
  loop is a ring in the other direction. Grouped-query models send only their K/V heads.
- ``all_gather``: gather the keys and values of the whole sequence, attend once. Simple,
  and fine while one device can hold a whole sequence's K/V.

Masks are computed from each token's index in the (unpermuted) sequence, which travels
with its block, not from where the block sits: so the causal mask, sliding windows and
segment ids (packed documents crossing shard boundaries) hold whatever order the
positions are laid out in. That is what makes the zigzag layout (:func:`zigzag`) free:
device ``i`` holds chunks ``i`` and ``2n - 1 - i`` of the sequence, so every device has
the same share of unmasked (causal) work, and since a loss sums over tokens the
permutation changes nothing but where tokens live. With a causal mask in that layout the
ring computes, at each step after the first, only the two quarter blocks that can be
visible (:func:`_zigzag_step`): half the work of the whole block, the same on every device.

Each block is computed by the Pallas FlashAttention kernel (``impl="pallas"``, what
``model.attention: auto`` picks on GPU and TPU) wherever the block's mask is one the
kernel is specialised on: in a zigzag causal ring the own block is causal in local order
(a device's positions are in sequence order) and every other block computed is wholly
visible, and a bidirectional ring's blocks are all wholly visible; segment ids go to the
kernel as they are. The kernel returns each query's log-sum-exp with its output, and
takes a gradient for it, which is what folding the partial results needs. A sliding
window, or a causal ring laid out contiguously, has masks that depend on where the block
sits and is computed in XLA (:func:`_block`), as is everything on CPU by default.

Shapes: B batch, L local query length, S local key length, N query heads, K kv heads
(G = N / K per group), H head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtrain.kernels import flash_attention, resolve_impl
from jaxtrain.sharding.local import per_shard
from jaxtrain.sharding.partition import ActivationSharding
from jaxtrain.sharding.rules import Rules

SEQUENCE = "sequence"  # the mesh axis the length is split over
MODES = ("ring", "all_gather")
QUERY_CHUNK = 512  # queries whose scores against a whole key block are formed at once


def zigzag(length: int, ways: int) -> np.ndarray:
    """The order of the ``length`` positions laid out over ``ways`` devices so each gets
    chunks ``i`` and ``2 * ways - 1 - i`` of ``2 * ways`` equal chunks: ``x[..., order]``
    permutes a sequence into that layout, and device ``i`` then holds
    ``order[i * length // ways : (i + 1) * length // ways]``.

    Raises:
        ValueError: if ``2 * ways`` does not divide ``length``.
    """
    if length % (2 * ways):
        raise ValueError(f"zigzag needs 2 x {ways} chunks to divide the length {length}")
    chunks = np.arange(length).reshape(2 * ways, length // (2 * ways))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ways - 1 - i]])
                           for i in range(ways)])  # fmt: skip


def _visible(
    q_index: jax.Array,
    k_index: jax.Array,
    q_segments: jax.Array | None,
    k_segments: jax.Array | None,
    causal: bool,
    window: int | None,
) -> jax.Array:
    """[B or 1, 1, 1, L, S] bool: where a query may see a key, from their sequence
    indices [L] and [S] and segment ids [B, L] and [B, S]."""
    q, k = q_index[:, None], k_index[None, :]
    mask = jnp.ones((q_index.shape[0], k_index.shape[0]), bool)
    if causal:
        mask &= k <= q
    if window is not None:
        mask &= q - k < window
        if not causal:
            mask &= k - q < window
    mask = mask[None, None, None]
    if q_segments is not None:
        mask = mask & (q_segments[:, :, None] == k_segments[:, None, :])[:, None, None]
    return mask


def _block(q, k, v, q_index, k_index, q_segments, k_segments, *, causal, window, scale):
    """The partial attention of queries q [B, L, N, H] to one key block: (unnormalised
    output [B, K, G, L, H], row max m and normaliser l [B, K, G, L]), float32. A row that
    sees none of the block has m = -inf, l = 0, output 0."""
    b, length, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, length, kv, n // kv, h)
    scores = jnp.einsum("BLKGH,BSKH->BKGLS", q, k, preferred_element_type=jnp.float32) * scale
    visible = _visible(q_index, k_index, q_segments, k_segments, causal, window)
    scores = jnp.where(visible, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(visible, jnp.exp(scores - safe[..., None]), 0.0)
    out = jnp.einsum("BKGLS,BSKH->BKGLH", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)  # fmt: skip
    return out, m, jnp.sum(p, axis=-1)


def _chunked_block(q, k, v, q_index, k_index, q_segments, k_segments, *, chunk, **mask):
    """:func:`_block` a ``chunk`` of queries at a time (a scan, each chunk rematerialised
    in the backward pass), so the scores held at once are [chunk, S], not [L, S]: what
    lets a block of tens of thousands of positions fit. A length that ``chunk`` does not
    divide is done whole."""
    b, length, n, h = q.shape
    if length <= chunk or length % chunk:
        return _block(q, k, v, q_index, k_index, q_segments, k_segments, **mask)
    count = length // chunk

    def split(x, dim):
        return (
            None
            if x is None
            else jnp.moveaxis(x.reshape(*x.shape[:dim], count, chunk, *x.shape[dim + 1 :]), dim, 0)
        )

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(_, xs):
        q, q_index, q_segments = xs
        return None, _block(q, k, v, q_index, k_index, q_segments, k_segments, **mask)

    xs = (split(q, 1), split(q_index, 0), split(q_segments, 1))
    _, (o, m, l) = jax.lax.scan(one, None, xs)  # [count, B, K, G, chunk, ...]

    def join(x):
        x = jnp.moveaxis(x, 0, 3)  # [B, K, G, count, chunk, ...]
        return x.reshape(*x.shape[:3], length, *x.shape[5:])

    return join(o), join(m), join(l)


def _kernel_block(q, k, v, q_index, k_index, q_segments, k_segments, *, causal, scale, **_):
    """:func:`_block` by the Pallas flash kernel, for blocks whose mask is causal in local
    order (``causal``) or nothing but segments: the normalised output and the
    log-sum-exp stand for the unnormalised output and the row max with a normaliser of
    1, which :func:`_fold` combines the same way."""
    del q_index, k_index  # the caller has checked the mask needs no positions
    b, length, n, h = q.shape
    kv = k.shape[2]
    out, lse = flash_attention(
        q, k, v, segment_ids=q_segments, kv_segment_ids=k_segments, causal=causal,
        scale=scale, return_lse=True,
    )  # fmt: skip
    out = jnp.moveaxis(out.astype(jnp.float32).reshape(b, length, kv, n // kv, h), 1, 3)
    lse = jnp.moveaxis(lse.reshape(b, length, kv, n // kv), 1, 3)  # [B, K, G, L]
    return out, lse, jnp.ones_like(lse)


def _fold(acc, part):
    """Two partial results of the same queries combined (the online-softmax rule)."""
    (o1, m1, l1), (o2, m2, l2) = acc, part
    m = jnp.maximum(m1, m2)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    a1, a2 = jnp.exp(m1 - safe), jnp.exp(m2 - safe)
    return o1 * a1[..., None] + o2 * a2[..., None], m, l1 * a1 + l2 * a2


def _finish(q: jax.Array, o: jax.Array, l: jax.Array) -> jax.Array:
    b, length, n, h = q.shape
    out = o / l[..., None]  # [B, K, G, L, H]
    return jnp.moveaxis(out, 3, 1).reshape(b, length, n, h).astype(q.dtype)


def local_context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_index: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    mode: str = "ring",
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    axis: str = SEQUENCE,
    zigzag: bool = False,
    query_chunk: int = QUERY_CHUNK,
    impl: str = "xla",
) -> jax.Array:
    """Attention of this device's queries to the whole sequence; called per device
    (inside ``shard_map`` over ``axis``) on its local blocks.

    Args:
        q: [B, L, N, H] this device's queries.
        k, v: [B, L, K, H] the keys and values of the same positions.
        q_index: [L] int: each local position's index in the whole sequence.
        segment_ids: optional [B, L] document ids of the local positions.
        mode: "ring" or "all_gather".
        causal, window, scale: as :func:`jaxtrain.kernels.attention.xla_attention`.
        axis: the mesh axis the sequence is split over.
        zigzag: the positions are laid out by :func:`zigzag` (this device holds chunks i
            and 2n-1-i); a causal ring then computes only the visible half of each block.
        query_chunk: queries per piece of a block's computation (bounds the scores held).
        impl: "pallas" computes a ring's blocks with the flash kernel where their masks
            allow (see the module docstring); anything else, in XLA.

    Returns:
        [B, L, N, H] in q's dtype.
    """
    if mode not in MODES:
        raise ValueError(f"unknown context-parallel mode {mode!r}; expected one of {MODES}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block = functools.partial(
        _chunked_block, causal=causal, window=window, scale=scale, chunk=query_chunk
    )
    if mode == "all_gather":
        gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
        keys = gather(k, axis=1), gather(v, axis=1), gather(q_index, axis=0)
        k_segments = None if segment_ids is None else gather(segment_ids, axis=1)
        o, _, l = block(q, *keys[:2], q_index, keys[2], segment_ids, k_segments)
        return _finish(q, o, l)

    ways = jax.lax.axis_size(axis)
    shift = [(i, (i + 1) % ways) for i in range(ways)]
    skip = zigzag and causal
    own = block
    if impl == "pallas" and window is None and (skip or not causal):
        # The own block is causal in local order; every other block computed is whole.
        own = functools.partial(_kernel_block, causal=causal, scale=scale)
        block = functools.partial(_kernel_block, causal=False, scale=scale)
    # Recomputed in the backward pass: only each step's running result is kept.
    own, block = (jax.checkpoint(f, prevent_cse=False) for f in (own, block))
    me = jax.lax.axis_index(axis)

    def step(carry, r):
        acc, held = carry
        held = jax.lax.ppermute(held, axis, shift)
        if skip:
            acc = _zigzag_step(acc, q, q_index, segment_ids, held, block, (me - r) % ways < me)
        else:
            k, v, k_index, k_segments = held
            acc = _fold(acc, block(q, k, v, q_index, k_index, segment_ids, k_segments))
        return (acc, held), None

    acc = own(q, k, v, q_index, q_index, segment_ids, segment_ids)
    carry = (acc, (k, v, q_index, segment_ids))
    (acc, _), _ = jax.lax.scan(step, carry, jnp.arange(1, ways))
    o, _, l = acc
    return _finish(q, o, l)


def _zigzag_step(acc, q, q_index, q_segments, held, block, earlier: jax.Array):
    """A causal ring step in the zigzag layout, where this device holds chunks i (early)
    and 2n-1-i (late) and the held block came from device j != i: its late queries see
    all of j's early keys, its early queries none of j's late keys, and of the other two
    pairs exactly one is visible (early with early when j < i, ``earlier``; late with
    late when j > i). Two quarter blocks instead of the whole: every device does the same
    half of the work at every step."""
    k, v, k_index, k_segments = held
    half = q.shape[1] // 2

    def part(x, start, dim=1):
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, half, dim)

    def fold_at(acc, piece, start):
        """Fold a partial result of queries [start, start + half) into theirs in acc."""
        mine = tuple(jax.lax.dynamic_slice_in_dim(a, start, half, 3) for a in acc)
        new = _fold(mine, piece)
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(a, n, start, 3)
            for a, n in zip(acc, new, strict=True)
        )

    late, early = half, 0
    acc = fold_at(acc, block(part(q, late), part(k, early), part(v, early),
                             part(q_index, late, 0), part(k_index, early, 0),
                             part(q_segments, late), part(k_segments, early)), late)  # fmt: skip
    start = jnp.where(earlier, early, late)
    both = block(
        part(q, start), part(k, start), part(v, start), part(q_index, start, 0),
        part(k_index, start, 0), part(q_segments, start), part(k_segments, start),
    )  # fmt: skip
    return fold_at(acc, both, start)


def sequence_ways(mesh: Mesh | None, rules: Rules | None) -> int:
    """How many ways these rules split activations' length over ``mesh`` (1: not)."""
    if mesh is None or rules is None or rules.lookup("length") != SEQUENCE:
        return 1
    return mesh.shape.get(SEQUENCE, 1)


def zigzag_batch(batch: dict[str, Any], ways: int) -> dict[str, Any]:
    """``batch`` laid out for ``ways``-way context parallelism: every [B, L] array
    permuted along L by :func:`zigzag`, with ``positions`` (0..L-1 when the batch has
    none) permuted too, so rotary and learned positions see each token where it was."""
    inputs = batch["inputs"]
    length = inputs.shape[1]
    order = jnp.asarray(zigzag(length, ways), jnp.int32)
    batch = dict(batch)
    if batch.get("positions") is None:
        batch["positions"] = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), inputs.shape)
    return {
        key: x if x is None or x.ndim < 2 or x.shape[1] != length else jnp.take(x, order, axis=1)
        for key, x in batch.items()
    }


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    shard: ActivationSharding,
    mode: str,
    causal: bool,
    window: int | None,
    scale: float | None,
    impl: str = "auto",
) -> jax.Array:
    """Attention of q [B, L, N, H] to k, v [B, L, K, H] whose length is split over the
    ``sequence`` axis of ``shard``'s mesh, laid out zigzag (:func:`zigzag_batch`); rows
    and heads split as the rules say. Same contract as
    :func:`jaxtrain.kernels.attention.xla_attention` in sequence order. ``impl``
    (``model.attention``) is resolved for the local blocks: Pallas computes them where
    :func:`local_context_attention` can, everything else is XLA."""
    index = jnp.asarray(zigzag(q.shape[1], shard.mesh.shape[SEQUENCE]), jnp.int32)
    heads = ("batch", "length", "act_heads", None)
    kv_heads = ("batch", "length", "act_kv_heads", None)
    length = q.shape[1] // shard.mesh.shape[SEQUENCE]
    impl = resolve_impl(impl, causal=causal, q_len=length, k_len=length)
    local = functools.partial(local_context_attention, mode=mode, causal=causal,
                              window=window, scale=scale, zigzag=True, impl=impl)  # fmt: skip
    segments = None if segment_ids is None else ("batch", "length")
    in_axes = (heads, kv_heads, kv_heads, ("length",), segments)
    return per_shard(local, shard, in_axes, heads, out_like=0)(q, k, v, index, segment_ids)
