"""LLaMA-family decoder (Touvron et al., 2023) in Flax NNX, with scanned layers.

The ``n_layers`` blocks are created by a vmapped constructor, so every block parameter
has a leading ``layers`` axis, and run by ``jax.lax.scan``: compile time does not grow
with depth. Each block is rematerialised per ``model.remat`` (Chen et al., 2016; BMTrain's
CheckpointBlock).

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
    dropout,
    no_shard,
    param,
    rope_tables,
)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, shard, rngs=rngs)

        self.blocks = make_blocks(rngs)
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
    ) -> jax.Array:
        """Logits [B, L, V] in float32 for int ``tokens`` [B, L].

        Args:
            tokens: token ids.
            positions: [B, L] RoPE positions; default 0..L-1 in every row.
            segment_ids: [B, L] document ids for packed rows; attention stays within one.
            dropout_key: enables dropout (training) when given.
        """
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        sin, cos = rope_tables(positions, cfg.head_dim, cfg.rope_theta)  # [B, L, H/2]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cdt)
        x = self.shard(x, ("batch", "length", "act_embed"))

        graphdef, layers = nnx.split(self.blocks)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_layers)

        def body(x, layer):
            layer_state, key = layer
            block = nnx.merge(graphdef, layer_state)
            return block(x, sin, cos, segment_ids, key), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (layers, keys))

        x = self.final_norm(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("BLD,VD->BLV", x, self.embed[...].astype(cdt))
        else:
            logits = jnp.einsum("BLD,DV->BLV", x, self.lm_head[...].astype(cdt))
        logits = logits.astype(jnp.float32)
        return self.shard(logits, ("batch", "length", "act_vocab"))
