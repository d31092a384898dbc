"""Token cross-entropy, over all the logits at once or a chunk of positions at a time.

The logits of a large vocabulary dwarf every other activation: Llama 3 8B's 128256
entries per token, in float32, are 8.4 GB for 16384 tokens, and their gradient as much
again. :func:`chunked_cross_entropy_sum` never forms them all: a ``lax.scan`` runs the LM
head and the softmax over one chunk of positions at a time, and its body is
rematerialised (``jax.checkpoint``; Chen et al., 2016), so the backward pass recomputes
each chunk's logits instead of keeping them. This is the chunked ("fused linear")
cross-entropy of Liger-Kernel (Hsu et al., 2024) and of Wijmans et al. (2024), written
with autodiff rather than a hand-written gradient.

Dimensions: B batch, L length, n chunks, C positions per chunk, D model width,
V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxtrain.models.layers import VocabHead


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of counted tokens (float32).

    Args:
        logits: [B, L, V] float32.
        targets: [B, L] int token ids.
        weights: optional [B, L] 0/1 weights; default all ones.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = jnp.ones_like(losses) if weights is None else weights.astype(losses.dtype)
    return jnp.sum(losses * weights), jnp.sum(weights)


def chunk_count(rows: int, length: int, chunk_tokens: int) -> int:
    """How many chunks of positions keep each at or under ``chunk_tokens`` tokens.

    The fewest that do, rounded up to one that divides ``length`` when one is at most
    twice as many (a dividing count needs no padding, and keeps a length sharded over
    devices local to each); never more than ``length`` (one position of every row).
    ``chunk_tokens`` 0 means one chunk: the logits whole.

    Args:
        rows: the rows of the batch (each device's, to bound memory per device).
        length: L of the targets.
        chunk_tokens: the most tokens (rows x C) of one chunk; 0 for no chunking.
    """
    if chunk_tokens <= 0 or rows * length <= chunk_tokens:
        return 1
    need = min(-(-rows * length // chunk_tokens), length)
    for n in range(need, min(2 * need, length) + 1):
        if length % n == 0:
            return n
    return need


def _chunks(x: jax.Array, n: int, replicas: int, ways: int) -> jax.Array:
    """[B, L, ...] -> [n, S, Q, B/S, L/(nQ), ...] for S ``replicas`` and Q ``ways``:
    chunk j takes positions j, j+n, j+2n, ... of every row, rows keep their order,
    S-major, and each chunk's positions are split into Q runs, Q-major.

    Interleaving positions (like the microbatches of :mod:`jaxtrain.train.step` rows)
    leaves every device's shard of B, and of L if it is sharded, spread evenly over the
    chunks; with S the number of devices B is split over, device s holds exactly the rows
    of replica s, and with Q the number L is split over (``n * Q`` dividing L), device q
    holds exactly the positions of run q. Splitting moves no data between devices.
    """
    b, length = x.shape[:2]
    x = x.reshape(replicas, b // replicas, ways, length // (n * ways), n, *x.shape[2:])
    return jnp.moveaxis(x, (4, 2), (0, 2))


def _replicate(head: VocabHead, n: int, ways: int, row_axis: str) -> VocabHead:
    """The head with its parameters broadcast to ``n`` x ``ways`` copies [n, ways, ...],
    copy (s, q) on the devices holding replica s of the rows and run q of the positions,
    each whole over D.

    Constrained outside the scan, the parameters are gathered over D once, not once per
    chunk. And since each device computes only its own tokens' share of the gradient, a
    copy per token shard lets each accumulate that share over the chunks locally; the
    broadcast's transpose then sums the copies once, after the scan. With one copy for
    all tokens, every chunk's share would be all-reduced over the devices that split
    them (the batch's, and ``sequence`` under context parallelism).
    """
    rows = row_axis if n > 1 else None
    runs = "length" if ways > 1 else None

    def copies(p: jax.Array, axes: tuple[str, ...]) -> jax.Array:
        return head.shard(jnp.broadcast_to(p, (n, ways, *p.shape)), (rows, runs, *axes))

    bias = None if head.bias is None else copies(head.bias, ("act_vocab",))
    return head.replace(weight=copies(head.weight, head.weight_axes), bias=bias)


def chunked_cross_entropy_sum(
    hidden: jax.Array,
    head: VocabHead,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    chunks: int,
    row_shards: int = 1,
    sequence_shards: int = 1,
    row_axis: str = "batch",
) -> tuple[jax.Array, jax.Array]:
    """:func:`cross_entropy_sum` of the logits ``head(hidden)``, formed a chunk at a time.

    With ``chunks`` 1 it is exactly ``cross_entropy_sum(head(hidden), ...)``, the logits'
    rows laid out by ``row_axis``. Otherwise the
    positions are split into ``chunks`` interleaved chunks (a length that ``chunks`` does
    not divide is padded with positions of weight 0), and a scan over them computes each
    chunk's float32 logits, their loss, and nothing more: at most one chunk's logits (and,
    in the backward pass, their gradient) exist at a time. The body casts the head's
    float32 parameters to the compute dtype itself, so their gradient is summed over the
    chunks in float32.

    Args:
        hidden: [B, L, D] final hidden states in the compute dtype.
        head: the model's LM head (``model(..., return_hidden=True)``).
        targets: [B, L] int token ids.
        weights: optional [B, L] 0/1 weights; default all ones.
        chunks: the number of chunks (:func:`chunk_count`).
        row_shards: the number of devices B is split over (the batch sharding's ways);
            each holds a float32 copy of the head's parameters and of their gradient, so
            that the gradient is reduced over devices once, not once per chunk. 1 (one
            shared copy) is always correct; a count that does not divide B is taken as 1.
        sequence_shards: the number of devices L is split over (context parallelism),
            each holding a copy too for the same reason; taken as 1 unless ``chunks``
            times it divides L.
        row_axis: the logical name of B's split (``head_batch`` after a pipeline, which
            splits the rows over its stages too).

    Returns:
        (summed loss, number of counted tokens), both float32 scalars.
    """
    if chunks == 1:
        logits = head.shard(head.project(hidden), (row_axis, "length", "act_vocab"))
        return cross_entropy_sum(logits, targets, weights)
    replicas = row_shards if targets.shape[0] % row_shards == 0 else 1
    ways = sequence_shards if targets.shape[1] % (chunks * sequence_shards) == 0 else 1
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
    weights = weights.astype(jnp.float32)
    count = jnp.sum(weights)
    pad = -targets.shape[1] % chunks
    if pad:
        hidden, targets, weights = (
            jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            for x in (hidden, targets, weights)
        )
    heads = _replicate(head, replicas, ways, row_axis)
    # The logits' rows [S, B/S] lie as B does: S split over the batch's devices, or B/S
    # with one copy; a B that row_shards does not divide is left to XLA. Their positions
    # [Q, C/Q] lie as L does: Q split over its devices, or C/Q with one copy.
    rows = None
    if replicas > 1:
        rows = (row_axis, None)
    elif row_shards == 1:
        rows = (None, row_axis)
    runs = ("length", None) if ways > 1 else (None, "length")

    # prevent_cse=False: inside a scan the recomputation cannot be merged with the forward.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_loss(heads: VocabHead, x: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
        """x [S, Q, B/S, C/Q, D], t and w [S, Q, B/S, C/Q] -> [S, Q] summed losses; the
        logits [S, Q, B/S, C/Q, V] are freed, and recomputed for the gradient."""
        logits = jax.vmap(jax.vmap(lambda h, x: h.project(x)))(heads, x)
        if rows is not None:
            logits = head.shard(logits, (rows[0], runs[0], rows[1], runs[1], "act_vocab"))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        return jnp.sum(losses * w, axis=(2, 3))

    def body(total: jax.Array, chunk: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + chunk_loss(heads, *chunk), None

    xs = tuple(_chunks(x, chunks, replicas, ways) for x in (hidden, targets, weights))
    total, _ = jax.lax.scan(body, jnp.zeros((replicas, ways), jnp.float32), xs)  # [S, Q]
    return jnp.sum(total), count
