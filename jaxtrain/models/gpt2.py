"""GPT-2 (Radford et al., 2019) in Flax NNX, with scanned layers.

Pre-LayerNorm blocks with biases everywhere, a GELU (tanh form) MLP, learned absolute
positions and, as in the released models, the LM head tied to the token embedding
(``model.tie_embeddings: true``; untied works too). Attention is the shared grouped-query
layer without RoPE: GPT-2 proper has ``n_kv_heads == n_heads``.

Dimensions: B batch, L length, D model width, P positions, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ModelConfig
from jaxtrain.models.decoding import CachedDecoder
from jaxtrain.models.kv_cache import Cache, Step, step_positions, step_view
from jaxtrain.models.layers import (
    Attention,
    GeluMLP,
    LayerNorm,
    Shard,
    VocabHead,
    dropout,
    no_shard,
    param,
    vocab_head,
)
from jaxtrain.models.stack import scan_blocks, scan_decode, stacked


class Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        out_std = 0.02 / (2 * cfg.n_layers) ** 0.5
        self.attn_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            out_std=out_std,
            impl=cfg.attention,
            context=cfg.context_parallel,
            param_dtype=pdt,
            compute_dtype=cdt,
            shard=shard,
            rngs=rngs,
            head_dim=cfg.head_dim,
            qkv_bias=True,
            out_bias=True,
            fp8_history=cfg.fp8_steps(),
        )
        self.mlp_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = GeluMLP(
            cfg.d_model,
            cfg.mlp_dim,
            out_std=out_std,
            param_dtype=pdt,
            compute_dtype=cdt,
            shard=shard,
            rngs=rngs,
            fp8_history=cfg.fp8_steps(),
        )
        self.dropout = cfg.dropout
        self.shard = shard

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None, key: jax.Array | None
    ) -> jax.Array:
        keys = (None, None) if key is None else jax.random.split(key)
        h = self.attn(self.attn_norm(x), None, None, segment_ids)
        x = x + dropout(h, self.dropout, keys[0])
        x = self.shard(x, ("batch", "length", "act_embed"))
        h = self.mlp(self.mlp_norm(x))
        x = x + dropout(h, self.dropout, keys[1])
        return self.shard(x, ("batch", "length", "act_embed"))

    def decode(
        self, x: jax.Array, cache: Cache, layer: jax.Array, step: Step
    ) -> tuple[jax.Array, Cache]:
        """The block in incremental decoding: layer ``layer`` of the stacked cache (no
        dropout)."""
        h, cache = self.attn.decode(self.attn_norm(x), None, None, cache, layer, step)
        x = self.shard(x + h, ("batch", "length", "act_embed"))
        x = x + self.mlp(self.mlp_norm(x))
        return self.shard(x, ("batch", "length", "act_embed")), cache


class GPT2(nnx.Module, CachedDecoder):
    """Token + position embedding -> scanned blocks -> final LayerNorm -> LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Shard = no_shard):
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        self.pos_embed = param(
            rngs, nnx.initializers.normal(0.01), (cfg.max_seq_len, cfg.d_model),
            ("positions", "embed"), pdt,
        )  # fmt: skip
        self.blocks = stacked(lambda rngs: Block(cfg, shard, rngs=rngs), cfg.n_layers, rngs)
        self.final_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
        self.cfg = cfg
        self.shard = shard

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, VocabHead]:
        """Logits [B, L, V] in float32 for int ``tokens`` [B, L]; arguments as
        :meth:`jaxtrain.models.llama.Llama.__call__` (``positions`` index the table)."""
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self._embed(tokens, positions)
        key, dropout_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = dropout(x, cfg.dropout, key)
        x = scan_blocks(
            self.blocks, x, segment_ids, cfg=cfg, dropout_key=dropout_key, shard=self.shard
        )
        return self._head(x, return_hidden)

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token plus position embeddings [B, L, D] in the compute dtype."""
        x = jnp.take(self.embed[...], tokens, axis=0) + jnp.take(
            self.pos_embed[...], positions, axis=0
        )
        x = x.astype(jnp.dtype(self.cfg.compute_dtype))
        return self.shard(x, ("batch", "length", "act_embed"))

    def _head(self, x: jax.Array, return_hidden: bool = False):
        x = self.final_norm(x)
        own = None if self.cfg.tie_embeddings else self.lm_head
        head = vocab_head(self.embed, own, jnp.dtype(self.cfg.compute_dtype), self.shard)
        return (x, head) if return_hidden else head(x)

    @staticmethod
    def max_positions(cfg: ModelConfig) -> int:
        """The learned position table's length: no position past it can be encoded."""
        return cfg.max_seq_len

    def decode(
        self, tokens: jax.Array, cache: Cache, slot: jax.Array, pad: jax.Array
    ) -> tuple[jax.Array, Cache]:
        """Incremental decoding, as :meth:`jaxtrain.models.llama.Llama.decode`; positions
        must stay below :meth:`max_positions` (the generator checks)."""
        length, slots = tokens.shape[1], cache[0].shape[3]
        x = self._embed(tokens, step_positions(slot, length, pad))
        step = step_view(slot, length, pad, slots, None)
        x, cache = scan_decode(self.blocks, x, cache, step, shard=self.shard)
        return self._head(x), cache
