"""The key/value cache of incremental decoding: its layout and what a step may see.

A cache holds every layer's keys and values for ``S`` slots, ``[layers, B, K, S, H]``
each (K the key/value heads: a grouped-query cache holds only those), logical axes
``("layers", "batch", "act_kv_heads", "length", None)``, so the rules table shards it
like the activations: rows over the batch axes, heads over ``tensor``. Heads come before
slots because that is the layout the attention's two matmuls read, and the whole stacked
cache is carried through the layers (``models/stack.py``): a step writes only its new
slots, in place, and no layer's cache is copied or transposed.

Prompts of different lengths are left-padded to one length: row b's first ``pad[b]``
slots are padding, never seen, and slot ``j`` holds the token at position
``j - pad[b]`` of that row. A step feeding ``L`` tokens at slots ``slot .. slot+L-1``
writes their keys and values there and lets each query see the filled, unpadded slots up
to its own (and, with a sliding window, fewer than ``window`` positions back).

With a sliding window shorter than the sequence, the cache is a rolling buffer of
``window`` entries (:func:`cache_slots`): slot ``j`` lives in entry ``j % window``, so
memory stays ``window`` positions however long the generation runs. A step then attends
over the buffer as it was plus its own new keys (a prompt longer than the window needs
keys the buffer no longer holds by its end), and writes the newest ``window`` of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", None)
LAYER_CACHE_AXES = ("batch", "act_kv_heads", "length", None)

Cache = tuple[jax.Array, jax.Array]  # (keys, values), each [layers, B, K, S, H]


def cache_slots(total: int, window: int | None) -> int:
    """How many slots a cache for ``total`` positions needs: ``total``, or a rolling
    buffer of ``window`` when the window is shorter."""
    return min(total, window) if window else total


def empty_cache(
    layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> Cache:
    """Zeroed keys and values for ``slots`` positions of ``batch`` rows."""
    shape = (layers, batch, kv_heads, slots, head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def step_slots(slot: jax.Array, length: int) -> jax.Array:
    """[1, L] slots of the ``length`` tokens fed at ``slot`` ([B, L] when ``slot`` is
    one per row)."""
    return jnp.reshape(slot, (-1, 1)) + jnp.arange(length)


def step_positions(slot: jax.Array, length: int, pad: jax.Array) -> jax.Array:
    """[B, L] positions of the ``length`` tokens fed at ``slot`` (a scalar, or [B] when
    each row is at its own slot), each row counted from its first unpadded slot (padding
    slots get 0)."""
    return jnp.maximum(step_slots(slot, length) - pad[:, None], 0)


@struct.dataclass
class Step:
    """One decode step's view of a layer cache: where its tokens go and what they see.

    Attributes:
        slot: the slot of the step's first token: a scalar, or [B] when each row is at
            its own slot (continuous batching: then a step feeds one token per row).
        sees: [B, L, S'] bool: which keys each query attends to, S' being the cache's
            slots, or (rolling) the buffer's entries followed by the step's own keys.
        rolling: the cache is a rolling buffer of ``window`` entries.
    """

    slot: jax.Array
    sees: jax.Array
    rolling: bool = struct.field(pytree_node=False)

    def write(
        self, cache: jax.Array, layer: jax.Array, new: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Store layer ``layer``'s ``new`` keys or values [B, L, K, H] in the stacked
        ``cache`` [layers, B, K, S, H]; returns (what the step attends over [B, K, S', H],
        the updated cache). Only the new slots are written."""
        if self.slot.ndim:
            return self._write_rows(cache, layer, new)
        new = jnp.swapaxes(new.astype(cache.dtype), 1, 2)[None]  # [1, B, K, L, H]
        length, slots = new.shape[3], cache.shape[3]
        if not self.rolling:
            cache = jax.lax.dynamic_update_slice(cache, new, (layer, 0, 0, self.slot, 0))
            return layer_of(cache, layer), cache
        held = layer_of(cache, layer)
        attended = jnp.concatenate([held, new[0]], axis=2)
        if length == 1:
            entry = self.slot % slots
            cache = jax.lax.dynamic_update_slice(cache, new, (layer, 0, 0, entry, 0))
        elif length >= slots:  # only the newest `window` survive, each at slot % window
            newest = jnp.roll(new[:, :, :, length - slots :], (self.slot + length) % slots, axis=3)
            cache = jax.lax.dynamic_update_slice(cache, newest, (layer, 0, 0, 0, 0))
        else:
            entries = (self.slot + jnp.arange(length)) % slots
            held = held.at[:, :, entries].set(new[0])
            cache = jax.lax.dynamic_update_slice(cache, held[None], (layer, 0, 0, 0, 0))
        return attended, cache

    def _write_rows(
        self, cache: jax.Array, layer: jax.Array, new: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """``write`` of one token per row, row b's at its own slot ``slot[b]``."""
        if new.shape[1] != 1:
            raise ValueError("a step with a slot per row feeds one token per row")
        new = jnp.swapaxes(new.astype(cache.dtype), 1, 2)  # [B, K, 1, H]
        rows = jnp.arange(new.shape[0])
        if not self.rolling:
            cache = cache.at[layer, rows, :, self.slot].set(new[:, :, 0])
            return layer_of(cache, layer), cache
        attended = jnp.concatenate([layer_of(cache, layer), new], axis=2)
        cache = cache.at[layer, rows, :, self.slot % cache.shape[3]].set(new[:, :, 0])
        return attended, cache


def layer_of(cache: jax.Array, layer: jax.Array) -> jax.Array:
    """Layer ``layer`` of a stacked cache [layers, B, K, S, H]: [B, K, S, H]."""
    return jax.lax.dynamic_index_in_dim(cache, layer, axis=0, keepdims=False)


def step_view(slot: jax.Array, length: int, pad: jax.Array, slots: int, window: int | None) -> Step:
    """The :class:`Step` of ``length`` tokens fed at ``slot`` (a scalar, or [B]: a slot
    per row) into a cache of ``slots`` slots (a rolling buffer when that is the window),
    rows left-padded by ``pad``.

    A padding query (a left-padded prompt's first tokens) sees its own slot only, so its
    softmax stays finite; nothing reads its output.
    """
    rolling = window is not None and slots == window
    query = step_slots(slot, length)  # [R, L], R = 1 or B
    if rolling:  # entry i holds the one slot in [slot - window, slot) that is i mod window
        first = query[:, :1]
        held = first - window + (jnp.arange(window) - first) % window
        key = jnp.concatenate([held, query], axis=1)
    else:
        key = jnp.arange(slots)[None, :]
    query, key = query[:, :, None], key[:, None, :]  # [R, L, 1], [R, 1, S']
    start = pad[:, None, None]  # [B, 1, 1]
    sees = (key <= query) & (key >= start)
    if window is not None:
        sees &= query - key < window
    sees |= (query < start) & (key == query)
    return Step(slot=jnp.asarray(slot, jnp.int32), sees=sees, rolling=rolling)
