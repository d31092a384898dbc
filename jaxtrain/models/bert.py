"""BERT (Devlin et al., 2019) and RoBERTa (Liu et al., 2019) for masked-token prediction,
in Flax NNX with scanned layers.

A bidirectional encoder: token + learned position + token-type embeddings and a
LayerNorm, then post-LayerNorm blocks (x = norm(x + attn(x)), x = norm(x + mlp(x))) with
biases everywhere and an exact (erf) GELU MLP, then the MLM head: dense + GELU +
LayerNorm, and a decoder tied to the word embedding (``model.tie_embeddings: true``, as
every released checkpoint; untied trains too) plus a per-token bias.

``family: roberta`` is the same network; only its positions differ: they count from
``pad_id + 1``, and a padding token sits at position ``pad_id`` (HF's
``create_position_ids_from_input_ids``), so the table has ``max_seq_len + pad_id + 1`` rows.

Dimensions: B batch, L length, D model width, P positions, T token types, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ModelConfig
from jaxtrain.models.dense import weight_einsum
from jaxtrain.models.layers import (
    GeluMLP,
    LayerNorm,
    Shard,
    VocabHead,
    dropout,
    no_shard,
    param,
    vocab_head,
)
from jaxtrain.models.mha import MultiHeadAttention
from jaxtrain.models.stack import scan_blocks, stacked


def position_rows(cfg: ModelConfig) -> int:
    """Rows of the position table: RoBERTa's positions start after its padding index."""
    return cfg.max_seq_len + (cfg.pad_id + 1 if cfg.family == "roberta" else 0)


class Block(nnx.Module):
    """Post-norm encoder block: x = attn_norm(x + attn(x)), x = mlp_norm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        self.attn = MultiHeadAttention(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            q_std=0.02,
            kv_std=0.02,
            out_std=0.02,
            impl=cfg.attention,
            param_dtype=pdt,
            compute_dtype=cdt,
            shard=shard,
            rngs=rngs,
            bias=True,
        )
        self.attn_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = GeluMLP(
            cfg.d_model,
            cfg.mlp_dim,
            out_std=0.02,
            param_dtype=pdt,
            compute_dtype=cdt,
            shard=shard,
            rngs=rngs,
            approximate=False,
        )
        self.mlp_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.dropout = cfg.dropout
        self.shard = shard

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None, key: jax.Array | None
    ) -> jax.Array:
        keys = (None, None) if key is None else jax.random.split(key)
        h = self.attn(x, segment_ids=segment_ids)
        x = self.attn_norm(x + dropout(h, self.dropout, keys[0]))
        x = self.shard(x, ("batch", "length", "act_embed"))
        h = self.mlp(x)
        x = self.mlp_norm(x + dropout(h, self.dropout, keys[1]))
        return self.shard(x, ("batch", "length", "act_embed"))


class Bert(nnx.Module):
    """Embeddings + LayerNorm -> scanned post-norm blocks -> MLM head (transform, decoder)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Shard = no_shard):
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        d, v = cfg.d_model, cfg.vocab_size
        self.embed = param(rngs, init, (v, d), ("vocab", "embed"), pdt)
        self.pos_embed = param(rngs, init, (position_rows(cfg), d), ("positions", "embed"), pdt)
        self.type_embed = param(rngs, init, (cfg.type_vocab_size, d), ("token_types", "embed"), pdt)
        self.embed_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.blocks = stacked(lambda rngs: Block(cfg, shard, rngs=rngs), cfg.n_layers, rngs)
        # The MLM head's transform is a D -> D dense layer feeding a GELU: an MLP's hidden
        # layer of width D, so its output axis is named (and tensor-split) as "mlp".
        self.head_w = param(rngs, init, (d, d), ("embed", "mlp"), pdt)
        self.head_b = param(rngs, nnx.initializers.zeros, (d,), ("bias",), pdt)
        self.head_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, init, (d, v), ("embed", "vocab"), pdt)
        self.out_bias = param(rngs, nnx.initializers.zeros, (v,), ("bias",), pdt)
        self.cfg = cfg
        self.shard = shard

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_types: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, VocabHead]:
        """Logits [B, L, V] in float32 at every position of int ``tokens`` [B, L].

        Args:
            tokens: token ids (masked ones replaced by ``model.mask_id``).
            positions: [B, L] positions (0 at each document's first token); default
                0..L-1 (RoBERTa: HF's count of non-padding tokens).
            segment_ids: [B, L] document ids of packed rows; attention stays within one.
            token_types: [B, L] token types (segment A/B); default all 0.
            dropout_key: enables dropout (training) when given.
            return_hidden: return ``(hidden, head)``, the transformed states and the
                decoder with its bias, instead of the logits ``head(hidden)``.
        """
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        if positions is None:
            if cfg.family == "roberta":
                real = (tokens != cfg.pad_id).astype(jnp.int32)
                positions = jnp.cumsum(real, axis=1) * real + cfg.pad_id
            else:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        elif cfg.family == "roberta":
            positions = positions + cfg.pad_id + 1
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        x = (
            jnp.take(self.embed[...], tokens, axis=0)
            + jnp.take(self.pos_embed[...], positions, axis=0)
            + jnp.take(self.type_embed[...], token_types, axis=0)
        )  # [B, L, D]
        x = self.shard(self.embed_norm(x).astype(cdt), ("batch", "length", "act_embed"))
        key, dropout_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = dropout(x, cfg.dropout, key)
        x = scan_blocks(self.blocks, x, segment_ids, cfg=cfg, dropout_key=dropout_key)
        h = weight_einsum("BLD,DF->BLF", x, self.head_w[...], cdt)
        # Constrained like every hot activation: left free, XLA's SPMD partitioner gave
        # wrong gradients (right logits) on a data x fsdp x tensor mesh (test_equivalence).
        h = self.shard(h, ("batch", "length", "act_embed"))
        h = self.head_norm(jax.nn.gelu(h + self.head_b[...].astype(cdt), approximate=False))
        own = None if cfg.tie_embeddings else self.lm_head
        head = vocab_head(self.embed, own, cdt, self.shard, bias=self.out_bias)
        return (h, head) if return_hidden else head(h)
