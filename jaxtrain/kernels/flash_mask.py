"""Which keys a query may see in the flash-attention kernels, and which blocks to visit.

One frozen description of the mask (causal, sliding window, padded keys, segments) gives
both the per-element test inside a block and the range of blocks worth visiting, so a
causal or windowed kernel never loads a block that is wholly masked. Positions are key
positions: query row i sits at ``i + offset`` with ``offset = S - L``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


def _and(a: jax.Array | None, b: jax.Array) -> jax.Array:
    return b if a is None else a & b


def _cdiv(x: jax.Array, d: int) -> jax.Array:
    """ceil(x / d) for a non-negative int32 ``x``."""
    return lax.div(x + (d - 1), jnp.int32(d))


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The attention mask of one call.

    Attributes:
        causal: a query sees no key after it.
        window: a query sees only keys fewer than ``window`` positions away (before it;
            after it too when not causal), or every key when ``None``.
        offset: key position of query row 0 (``S - L``).
        kv_len: keys at or after this position are padding; ``None`` when none are.
        segments: queries see only keys with the same segment id.
    """

    causal: bool
    window: int | None
    offset: int
    kv_len: int | None
    segments: bool

    def keep(
        self,
        q_pos: jax.Array,
        k_pos: jax.Array,
        q_seg: jax.Array | None,
        k_seg: jax.Array | None,
    ) -> jax.Array | None:
        """True where query ``q_pos`` [bq, 1] may see key ``k_pos`` [1, bk] (broadcast to
        [bq, bk]); ``None`` when every key is visible."""
        keep = None
        if self.causal:
            keep = _and(keep, q_pos >= k_pos)
        if self.window is not None:
            keep = _and(keep, q_pos - k_pos < self.window)
            if not self.causal:
                keep = _and(keep, k_pos - q_pos < self.window)
        if self.kv_len is not None:
            keep = _and(keep, k_pos < self.kv_len)
        if self.segments:
            keep = _and(keep, q_seg == k_seg)
        return keep

    def key_blocks(self, q_start, bq: int, bk: int, n_blocks: int):
        """[lo, hi) of the key blocks (size ``bk``) that query rows
        ``[q_start, q_start + bq)`` can see; Python ints when they do not depend on
        ``q_start``."""
        first = q_start + self.offset  # key position of the block's first query
        last = first + bq - 1
        hi = n_blocks
        if self.kv_len is not None:
            hi = min(hi, -(-self.kv_len // bk))
        if self.causal:
            hi = jnp.minimum(hi, _cdiv(jnp.maximum(last + 1, 0), bk))
        elif self.window is not None:
            hi = jnp.minimum(hi, _cdiv(jnp.maximum(last + self.window, 0), bk))
        lo = 0
        if self.window is not None:
            lo = lax.div(jnp.maximum(first - self.window + 1, 0), jnp.int32(bk))
        return lo, hi

    def query_blocks(self, k_start, bk: int, bq: int, n_blocks: int):
        """[lo, hi) of the query blocks (size ``bq``) that can see keys
        ``[k_start, k_start + bk)``; Python ints when they do not depend on ``k_start``."""
        first = k_start - self.offset  # query row at the block's first key position
        last = first + bk - 1
        lo, hi = 0, n_blocks
        if self.causal:
            lo = lax.div(jnp.maximum(first, 0), jnp.int32(bq))
        elif self.window is not None:
            lo = lax.div(jnp.maximum(first - self.window + 1, 0), jnp.int32(bq))
        if self.window is not None:
            hi = jnp.minimum(hi, _cdiv(jnp.maximum(last + self.window, 0), bq))
        return lo, hi
