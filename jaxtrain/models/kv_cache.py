"""The key/value cache of incremental decoding: its layout and what a step may see.

A cache holds every layer's keys and values for ``S`` slots, ``[layers, B, S, K, H]``
each (K the key/value heads: a grouped-query cache holds only those), logical axes
``("layers", "batch", "length", "act_kv_heads", None)``, so the rules table shards it
like the activations: rows over the batch axes, heads over ``tensor``.

Prompts of different lengths are left-padded to one length: row b's first ``pad[b]``
slots are padding, never seen, and slot ``j`` holds the token at position
``j - pad[b]`` of that row. A step feeding ``L`` tokens at slots ``slot .. slot+L-1``
writes their keys and values there and lets each query see the filled, unpadded slots up
to its own (and, with a sliding window, fewer than ``window`` positions back).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CACHE_AXES = ("layers", "batch", "length", "act_kv_heads", None)

Cache = tuple[jax.Array, jax.Array]  # (keys, values), each [layers, B, S, K, H]


def empty_cache(
    layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> Cache:
    """Zeroed keys and values for ``slots`` positions of ``batch`` rows."""
    shape = (layers, batch, slots, kv_heads, head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def step_positions(slot: jax.Array, length: int, pad: jax.Array) -> jax.Array:
    """[B, L] positions of the ``length`` tokens fed at ``slot``, each row counted from
    its first unpadded slot (padding slots get 0)."""
    slots = slot + jnp.arange(length)
    return jnp.maximum(slots[None, :] - pad[:, None], 0)


def visible(
    slot: jax.Array, length: int, pad: jax.Array, slots: int, window: int | None
) -> jax.Array:
    """[B, L, S] bool: which cache slots each of the ``length`` queries at ``slot`` sees.

    A padding query (a left-padded prompt's first tokens) sees its own slot only, so its
    softmax stays finite; nothing reads its output.
    """
    query = (slot + jnp.arange(length))[None, :, None]  # [1, L, 1]
    key = jnp.arange(slots)[None, None, :]  # [1, 1, S]
    start = pad[:, None, None]  # [B, 1, 1]
    sees = (key <= query) & (key >= start)
    if window is not None:
        sees &= query - key < window
    return sees | ((query < start) & (key == query))
