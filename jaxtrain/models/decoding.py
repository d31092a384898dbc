"""What generation asks of a model: read the prompts once, then one token per row a step.

The decoding loops (:mod:`jaxtrain.generate.decode`, :mod:`jaxtrain.generate.beam`)
drive every family through these methods:

- ``prefill(prompts, pad, max_new)``: the left-padded prompts [B, T] (row b padded by
  ``pad[b]``) read once; returns the logits [B, V] that pick each row's first new token
  and a :class:`DecodeState` with room for ``max_new`` more;
- ``step(tokens, state, index)``: the ``index``-th new token of each row [B] fed;
  returns the logits [B, V] of the next one and the updated state;
- ``penalized(prompts, pad)``: the tokens a repetition penalty counts as already seen
  (a decoder's prompt; an encoder-decoder's decoder start token), with a validity mask;
- ``max_positions(cfg)`` (static): the longest sequence it can encode, or None.

:class:`CachedDecoder` implements them for the decoder-only families on top of their
``decode(tokens, cache, slot, pad)`` over a KV cache (:mod:`jaxtrain.models.kv_cache`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxtrain.config import ModelConfig
from jaxtrain.models.kv_cache import cache_slots, empty_cache


@struct.dataclass
class DecodeState:
    """Everything a decoding model carries from step to step, by where its rows are.

    Attributes:
        layers: per-layer arrays [layers, B, ...] (KV caches).
        rows: per-row arrays [B, ...] (left padding, encoder masks).
        start: the cache slot of the first new token.
    """

    layers: Any
    rows: Any
    start: int = struct.field(pytree_node=False)

    def take(self, index: jax.Array) -> DecodeState:
        """The state of rows ``index`` [B'] (beam search's reordering)."""
        return self.replace(
            layers=jax.tree.map(lambda x: jnp.take(x, index, axis=1), self.layers),
            rows=jax.tree.map(lambda x: jnp.take(x, index, axis=0), self.rows),
        )


class CachedDecoder:
    """``prefill`` and ``step`` of a decoder-only model that defines
    ``decode(tokens, cache, slot, pad) -> (logits, cache)``: a cache of every prompt and
    new token (a rolling buffer of ``model.sliding_window`` when that is shorter), the
    prompts' padding kept per row."""

    cfg: ModelConfig

    @staticmethod
    def max_positions(cfg: ModelConfig) -> int | None:
        """The most positions the model of ``cfg`` can encode (None: no limit, as with
        RoPE)."""
        del cfg
        return None

    def penalized(self, prompts: jax.Array, pad: jax.Array) -> tuple[jax.Array, jax.Array]:
        """([B, T] tokens, [B, T] bool valid): what a repetition penalty counts as seen
        before the first new token (the prompt)."""
        return prompts, jnp.arange(prompts.shape[1])[None, :] >= pad[:, None]

    def prefill(
        self, prompts: jax.Array, pad: jax.Array, max_new: int
    ) -> tuple[jax.Array, DecodeState]:
        cfg = self.cfg
        batch, length = prompts.shape
        slots = cache_slots(length + max_new, cfg.sliding_window or None)
        dtype = jnp.dtype(cfg.compute_dtype)
        cache = empty_cache(cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim, dtype)
        logits, cache = self.decode(prompts, cache, 0, pad)
        return logits[:, -1], DecodeState(layers=cache, rows=pad, start=length)

    def step(
        self, tokens: jax.Array, state: DecodeState, index: jax.Array
    ) -> tuple[jax.Array, DecodeState]:
        logits, cache = self.decode(tokens[:, None], state.layers, state.start + index, state.rows)
        return logits[:, 0], state.replace(layers=cache)
