"""LLaMA-family decoder (Touvron et al., 2023) in Flax NNX, with scanned layers.

One class, config switches: Llama 2 and 3, Llama 3.1 RoPE scaling
(``model.rope_scaling.kind: llama3``), Qwen2 (``qkv_bias``), Qwen3 (``qk_norm``,
``head_dim``) and Mistral (``sliding_window``; Jiang et al., 2023).

The ``n_layers`` blocks are created by a vmapped constructor, so every block parameter
has a leading ``layers`` axis, and run by ``jax.lax.scan`` (:mod:`jaxtrain.models.stack`):
compile time does not grow with depth. Each block is rematerialised per ``model.remat``.

Dimensions: B batch, L length, D model width, V vocabulary, H head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ModelConfig
from jaxtrain.models.decoding import CachedDecoder
from jaxtrain.models.kv_cache import Cache, Step, step_positions, step_view
from jaxtrain.models.layers import (
    MLP,
    Attention,
    RMSNorm,
    Shard,
    VocabHead,
    dropout,
    no_shard,
    param,
    rope_tables,
    vocab_head,
)
from jaxtrain.models.moe import MoE, Stats
from jaxtrain.models.stack import scan_blocks, scan_decode, stacked


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        out_std = 0.02 / (2 * cfg.n_layers) ** 0.5
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
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
            qkv_bias=cfg.qkv_bias,
            qk_norm_eps=cfg.norm_eps if cfg.qk_norm else None,
            window=cfg.sliding_window or None,
            fp8_history=cfg.fp8_steps(),
        )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        kind, width = (MoE, cfg.moe) if cfg.moe.num_experts else (MLP, cfg.mlp_dim)
        fp8 = {} if cfg.moe.num_experts else {"fp8_history": cfg.fp8_steps()}
        self.mlp = kind(
            cfg.d_model,
            width,
            out_std=out_std,
            param_dtype=pdt,
            compute_dtype=cdt,
            shard=shard,
            rngs=rngs,
            **fp8,
        )
        self.dropout = cfg.dropout
        self.shard = shard

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        segment_ids: jax.Array | None,
        key: jax.Array | None,
    ) -> jax.Array | tuple[jax.Array, Stats]:
        """The block's output; with experts, also their router statistics."""
        keys = (None, None) if key is None else jax.random.split(key)
        h = self.attn(self.attn_norm(x), sin, cos, segment_ids)
        x = x + dropout(h, self.dropout, keys[0])
        x = self.shard(x, ("batch", "length", "act_embed"))
        h = self.mlp(self.mlp_norm(x))
        h, stats = h if isinstance(self.mlp, MoE) else (h, None)
        x = x + dropout(h, self.dropout, keys[1])
        x = self.shard(x, ("batch", "length", "act_embed"))
        return x if stats is None else (x, stats)

    def decode(
        self,
        x: jax.Array,
        cache: Cache,
        layer: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        step: Step,
    ) -> tuple[jax.Array, Cache]:
        """The block in incremental decoding: layer ``layer`` of the stacked cache (no
        dropout)."""
        h, cache = self.attn.decode(self.attn_norm(x), sin, cos, cache, layer, step)
        x = self.shard(x + h, ("batch", "length", "act_embed"))
        h = self.mlp(self.mlp_norm(x))
        x = x + (h[0] if isinstance(self.mlp, MoE) else h)
        return self.shard(x, ("batch", "length", "act_embed")), cache


class Llama(nnx.Module, CachedDecoder):
    """Token embedding -> scanned blocks -> final RMSNorm -> (tied or own) LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Shard = no_shard):
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        self.blocks = stacked(lambda rngs: Block(cfg, shard, rngs=rngs), cfg.n_layers, rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
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
        with_stats: bool = False,
    ) -> jax.Array | tuple[jax.Array, VocabHead] | tuple[Any, Stats]:
        """Logits [B, L, V] in float32 for int ``tokens`` [B, L].

        Args:
            tokens: token ids.
            positions: [B, L] RoPE positions; default 0..L-1 in every row.
            segment_ids: [B, L] document ids for packed rows; attention stays within one.
            dropout_key: enables dropout (training) when given.
            return_hidden: return ``(hidden, head)`` instead of the logits, where
                ``head(hidden)`` [B, L, V] are the logits (for a loss that forms them a
                chunk at a time: :mod:`jaxtrain.train.loss`).
            with_stats: also return the experts' router statistics, each stacked over
                the layers (:mod:`jaxtrain.models.moe`; empty for a dense model), as
                ``(output, stats)``.
        """
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # [B, L, H/2] each
        sin, cos = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cdt)
        x = self.shard(x, ("batch", "length", "act_embed"))
        x = scan_blocks(
            self.blocks,
            x,
            sin,
            cos,
            segment_ids,
            cfg=cfg,
            dropout_key=dropout_key,
            shard=self.shard,
        )
        x, stats = x if cfg.moe.num_experts else (x, {})
        out = self._head(x, return_hidden)
        return (out, stats) if with_stats else out

    def _head(self, x: jax.Array, return_hidden: bool = False):
        x = self.final_norm(x)
        own = None if self.cfg.tie_embeddings else self.lm_head
        head = vocab_head(self.embed, own, jnp.dtype(self.cfg.compute_dtype), self.shard)
        return (x, head) if return_hidden else head(x)

    def decode(
        self, tokens: jax.Array, cache: Cache, slot: jax.Array, pad: jax.Array
    ) -> tuple[jax.Array, Cache]:
        """Incremental decoding (:mod:`jaxtrain.models.kv_cache`): float32 logits
        [B, L, V] of ``tokens`` [B, L] fed at cache slot ``slot``, rows left-padded by
        ``pad`` [B] slots, and the cache with their keys and values written.

        Prefill feeds the (left-padded) prompts at slot 0; each decode step then feeds one
        token per row at the next slot.
        """
        cfg = self.cfg
        length, slots = tokens.shape[1], cache[0].shape[3]
        positions = step_positions(slot, length, pad)
        sin, cos = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        step = step_view(slot, length, pad, slots, cfg.sliding_window or None)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(cfg.compute_dtype))
        x = self.shard(x, ("batch", "length", "act_embed"))
        x, cache = scan_decode(self.blocks, x, cache, sin, cos, step, shard=self.shard)
        return self._head(x), cache
