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

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ModelConfig
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
from jaxtrain.models.stack import scan_blocks, stacked


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
            param_dtype=pdt,
            compute_dtype=cdt,
            shard=shard,
            rngs=rngs,
            head_dim=cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            qk_norm_eps=cfg.norm_eps if cfg.qk_norm else None,
            window=cfg.sliding_window or None,
        )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = MLP(
            cfg.d_model,
            cfg.mlp_dim,
            out_std=out_std,
            param_dtype=pdt,
            compute_dtype=cdt,
            shard=shard,
            rngs=rngs,
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
    ) -> jax.Array:
        keys = (None, None) if key is None else jax.random.split(key)
        h = self.attn(self.attn_norm(x), sin, cos, segment_ids)
        x = x + dropout(h, self.dropout, keys[0])
        x = self.shard(x, ("batch", "length", "act_embed"))
        h = self.mlp(self.mlp_norm(x))
        x = x + dropout(h, self.dropout, keys[1])
        return self.shard(x, ("batch", "length", "act_embed"))


class Llama(nnx.Module):
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
    ) -> jax.Array | tuple[jax.Array, VocabHead]:
        """Logits [B, L, V] in float32 for int ``tokens`` [B, L].

        Args:
            tokens: token ids.
            positions: [B, L] RoPE positions; default 0..L-1 in every row.
            segment_ids: [B, L] document ids for packed rows; attention stays within one.
            dropout_key: enables dropout (training) when given.
            return_hidden: return ``(hidden, head)`` instead of the logits, where
                ``head(hidden)`` [B, L, V] are the logits (for a loss that forms them a
                chunk at a time: :mod:`jaxtrain.train.loss`).
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
            n=cfg.n_layers,
            remat=cfg.remat,
            dropout_key=dropout_key,
        )

        x = self.final_norm(x)
        own = None if cfg.tie_embeddings else self.lm_head
        head = vocab_head(self.embed, own, cdt, self.shard)
        return (x, head) if return_hidden else head(x)
