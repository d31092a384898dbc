"""T5 v1.1 / FLAN-T5 (Raffel et al., 2020; Chung et al., 2022) in Flax NNX: an
encoder-decoder whose encoder and decoder stacks are each scanned.

Pre-norm blocks with T5's LayerNorm (RMS, no mean, no bias: :class:`RMSNorm`), the gated
GELU (tanh) feed-forward of v1.1, no biases and no ``1/sqrt(H)`` attention scaling (T5
folds it into the initialisation of wq). Positions enter only as a learned bias on the
attention scores, one per head and relative-position bucket: bidirectional buckets in
the encoder, causal ones in the decoder, each stack's table used by all its layers (HF
keeps it in the first layer). Decoder blocks attend to themselves (causally), then to the
encoder's output, then run the feed-forward. The LM head is untied (v1.1); with
``model.tie_embeddings`` it is the embedding with the output scaled by ``D^-0.5``, as in
the original T5.

Dimensions: B batch, L encoder length, M decoder length, D model width, N heads,
H head dim, F MLP width, V vocabulary, R relative-position buckets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.config import ModelConfig
from jaxtrain.models.decoding import DecodeState
from jaxtrain.models.kv_cache import Step, empty_cache, layer_of, step_view
from jaxtrain.models.layers import (
    MLP,
    RMSNorm,
    Shard,
    VocabHead,
    dropout,
    gelu_tanh,
    no_shard,
    param,
    vocab_head,
)
from jaxtrain.models.mha import MultiHeadAttention
from jaxtrain.models.stack import scan_blocks, scan_decode, stacked


def relative_buckets(
    q_len: int, k_len: int, *, bidirectional: bool, buckets: int, max_distance: int
) -> np.ndarray:
    """The [q_len, k_len] int32 bucket of each (query, key) pair's distance ``key - query``.

    Half the buckets (per direction, when bidirectional) hold the exact distances
    0, 1, ...; the rest grow logarithmically up to ``max_distance``, beyond which all
    distances share the last bucket. Causal buckets count only keys before the query.
    Computed in float32, as Mesh TensorFlow and HF do, so every bucket edge agrees.
    """
    distance = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    out = np.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        out += (distance > 0) * buckets
        distance = np.abs(distance)
    else:
        distance = -np.minimum(distance, 0)
    exact = buckets // 2
    with np.errstate(divide="ignore"):  # log(0) lands in the exact half, never used
        ratio = np.log(distance.astype(np.float32) / np.float32(exact))
    scaled = ratio / np.float32(math.log(max_distance / exact)) * np.float32(buckets - exact)
    large = exact + np.nan_to_num(scaled, neginf=0.0).astype(np.int64)
    large = np.minimum(large, buckets - 1)
    return (out + np.where(distance < exact, distance, large)).astype(np.int32)


def position_bias(
    table: jax.Array, q_len: int, k_len: int, *, bidirectional: bool, cfg: ModelConfig
) -> jax.Array:
    """[1, N, q_len, k_len] float32 bias from a [R, N] table."""
    buckets = relative_buckets(
        q_len,
        k_len,
        bidirectional=bidirectional,
        buckets=cfg.relative_buckets,
        max_distance=cfg.relative_max_distance,
    )
    values = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [L, S, N]
    return jnp.transpose(values, (2, 0, 1))[None]


def _attention(cfg: ModelConfig, shard: Shard, rngs: nnx.Rngs) -> MultiHeadAttention:
    d, h, n = cfg.d_model, cfg.head_dim, cfg.n_heads
    return MultiHeadAttention(
        d,
        n,
        cfg.n_kv_heads,
        head_dim=h,
        q_std=(d * h) ** -0.5,  # T5's init carries the 1/sqrt(H) the scores go without
        kv_std=d**-0.5,
        out_std=(n * h) ** -0.5,
        impl=cfg.attention,
        param_dtype=jnp.dtype(cfg.param_dtype),
        compute_dtype=jnp.dtype(cfg.compute_dtype),
        shard=shard,
        rngs=rngs,
        scale=1.0,
    )


def _mlp(cfg: ModelConfig, shard: Shard, rngs: nnx.Rngs) -> MLP:
    return MLP(
        cfg.d_model,
        cfg.mlp_dim,
        in_std=cfg.d_model**-0.5,
        out_std=cfg.mlp_dim**-0.5,
        activation=gelu_tanh,
        param_dtype=jnp.dtype(cfg.param_dtype),
        compute_dtype=jnp.dtype(cfg.compute_dtype),
        shard=shard,
        rngs=rngs,
    )


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm:
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class EncoderBlock(nnx.Module):
    """x + attn(norm(x)) with the position bias, then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg, rngs)
        self.attn = _attention(cfg, shard, rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = _mlp(cfg, shard, rngs)
        self.dropout = cfg.dropout
        self.shard = shard

    def __call__(self, x: jax.Array, bias: jax.Array, key: jax.Array | None) -> jax.Array:
        keys = (None, None) if key is None else jax.random.split(key)
        h = self.attn(self.attn_norm(x), position_bias=bias)
        x = self.shard(x + dropout(h, self.dropout, keys[0]), ("batch", "length", "act_embed"))
        h = self.mlp(self.mlp_norm(x))
        return self.shard(x + dropout(h, self.dropout, keys[1]), ("batch", "length", "act_embed"))


class DecoderBlock(nnx.Module):
    """x + causal self-attention, then x + attention to the encoder, then x + mlp."""

    def __init__(self, cfg: ModelConfig, shard: Shard, *, rngs: nnx.Rngs):
        self.self_attn_norm = _norm(cfg, rngs)
        self.self_attn = _attention(cfg, shard, rngs)
        self.cross_attn_norm = _norm(cfg, rngs)
        self.cross_attn = _attention(cfg, shard, rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = _mlp(cfg, shard, rngs)
        self.dropout = cfg.dropout
        self.shard = shard

    def __call__(
        self, x: jax.Array, encoded: jax.Array, bias: jax.Array, key: jax.Array | None
    ) -> jax.Array:
        keys = (None, None, None) if key is None else jax.random.split(key, 3)
        act = ("batch", "length", "act_embed")
        h = self.self_attn(self.self_attn_norm(x), causal=True, position_bias=bias)
        x = self.shard(x + dropout(h, self.dropout, keys[0]), act)
        h = self.cross_attn(self.cross_attn_norm(x), encoded)
        x = self.shard(x + dropout(h, self.dropout, keys[1]), act)
        h = self.mlp(self.mlp_norm(x))
        return self.shard(x + dropout(h, self.dropout, keys[2]), act)

    def decode(
        self,
        x: jax.Array,
        cache: tuple[jax.Array, ...],
        layer: jax.Array,
        step: Step,
        bias: jax.Array,
        cross: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """The block in incremental decoding, layer ``layer`` of the stacked caches:
        ``cache`` holds the self-attention keys and values [layers, B, K, S, H] and the
        encoder's [layers, B, K, L, H]; ``bias`` [1, N, M, S] is the step's position bias,
        ``cross`` [B, N, M, L] hides the prompts' padding."""
        keys, values, enc_keys, enc_values = cache
        act = ("batch", "length", "act_embed")
        h = self.self_attn_norm(x)
        new_keys, new_values = self.self_attn.project_kv(h)
        seen_keys, keys = step.write(keys, layer, new_keys)
        seen_values, values = step.write(values, layer, new_values)
        h = self.self_attn.attend_to(h, seen_keys, seen_values, bias=bias, mask=step.sees)
        x = self.shard(x + h, act)
        h = self.cross_attn.attend_to(
            self.cross_attn_norm(x), layer_of(enc_keys, layer), layer_of(enc_values, layer),
            bias=cross,
        )  # fmt: skip
        x = self.shard(x + h, act)
        x = self.shard(x + self.mlp(self.mlp_norm(x)), act)
        return x, (keys, values, enc_keys, enc_values)


class T5(nnx.Module):
    """Shared embedding -> encoder stack -> decoder stack (attending to it) -> LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Shard = no_shard):
        pdt = jnp.dtype(cfg.param_dtype)
        d, v, normal = cfg.d_model, cfg.vocab_size, nnx.initializers.normal
        self.embed = param(rngs, normal(1.0), (v, d), ("vocab", "embed"), pdt)
        bias_shape, bias_axes = (cfg.relative_buckets, cfg.n_heads), ("rel_buckets", "heads")
        self.encoder_bias = param(rngs, normal(d**-0.5), bias_shape, bias_axes, pdt)
        self.encoder = stacked(lambda r: EncoderBlock(cfg, shard, rngs=r), cfg.n_layers, rngs)
        self.encoder_norm = _norm(cfg, rngs)
        self.decoder_bias = param(rngs, normal(d**-0.5), bias_shape, bias_axes, pdt)
        self.decoder = stacked(lambda r: DecoderBlock(cfg, shard, rngs=r), cfg.n_layers, rngs)
        self.decoder_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(d**-0.5), (d, v), ("embed", "vocab"), pdt)
        self.cfg = cfg
        self.shard = shard

    def __call__(
        self,
        tokens: jax.Array,
        decoder_inputs: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, VocabHead]:
        """Logits [B, M, V] in float32 for encoder ``tokens`` [B, L] and
        ``decoder_inputs`` [B, M] (the targets shifted right after a start token).

        ``positions`` and ``segment_ids`` (packed rows) are not supported: T5's positions
        are relative and its rows are never packed here. With ``return_hidden`` it returns
        ``(hidden [B, M, D], head)`` instead, ``head(hidden)`` being the logits.
        """
        if positions is not None or segment_ids is not None:
            raise ValueError("t5 takes neither positions nor segment_ids (rows are not packed)")
        cfg = self.cfg
        keys = [None] * 6 if dropout_key is None else list(jax.random.split(dropout_key, 6))
        encoded = self.encode(tokens, dropout_keys=keys[:3])
        y = self._embed(decoder_inputs)  # [B, M, D]
        y = dropout(y, cfg.dropout, keys[3])
        length = decoder_inputs.shape[1]
        bias = position_bias(self.decoder_bias[...], length, length, bidirectional=False, cfg=cfg)
        y = scan_blocks(self.decoder, y, encoded, bias, cfg=cfg, dropout_key=keys[4])
        y = dropout(self.decoder_norm(y), cfg.dropout, keys[5])
        return self._head(y, return_hidden)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.compute_dtype))
        return self.shard(x, ("batch", "length", "act_embed"))

    def _head(self, y: jax.Array, return_hidden: bool = False):
        own = None if self.cfg.tie_embeddings else self.lm_head
        # The tied head scales its input by D^-0.5, as the original T5 does.
        dtype, scale = jnp.dtype(self.cfg.compute_dtype), self.cfg.d_model**-0.5
        head = vocab_head(self.embed, own, dtype, self.shard, tied_scale=scale)
        return (y, head) if return_hidden else head(y)

    def encode(
        self,
        tokens: jax.Array,
        pad: jax.Array | None = None,
        dropout_keys: list[jax.Array | None] | None = None,
    ) -> jax.Array:
        """The encoder's output [B, L, D] for ``tokens`` [B, L], each row's first ``pad[b]``
        tokens padding that no position attends to (the relative positions make left
        padding as good as right)."""
        cfg = self.cfg
        keys = dropout_keys or [None] * 3
        x = dropout(self._embed(tokens), cfg.dropout, keys[0])
        length = tokens.shape[1]
        bias = position_bias(self.encoder_bias[...], length, length, bidirectional=True, cfg=cfg)
        if pad is not None:
            bias = bias + padding_bias(pad, length)
        x = scan_blocks(self.encoder, x, bias, cfg=cfg, dropout_key=keys[1])
        return dropout(self.encoder_norm(x), cfg.dropout, keys[2])

    @staticmethod
    def max_positions(cfg: ModelConfig) -> None:
        """Relative positions: no limit."""
        del cfg

    def penalized(self, prompts: jax.Array, pad: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The tokens a repetition penalty counts as seen before the first new one: the
        decoder's start token (the prompt is the encoder's, as in transformers)."""
        del pad
        start = jnp.full((prompts.shape[0], 1), self.cfg.decoder_start_id, jnp.int32)
        return start, jnp.ones(start.shape, bool)

    def prefill(
        self, prompts: jax.Array, pad: jax.Array, max_new: int
    ) -> tuple[jax.Array, DecodeState]:
        """Encode the prompts once, project every decoder layer's cross-attention keys and
        values from them, and feed the decoder its start token (slot 0 of ``max_new``)."""
        cfg = self.cfg
        batch = prompts.shape[0]
        encoded = self.encode(prompts, pad)
        graphdef, layers = nnx.split(self.decoder)

        def project(_, layer):
            return None, nnx.merge(graphdef, layer).cross_attn.project_kv(encoded)

        _, encoder_kv = jax.lax.scan(project, None, layers)  # [layers, B, L, K, H] each
        enc_keys, enc_values = (jnp.swapaxes(t, 2, 3) for t in encoder_kv)
        dtype = jnp.dtype(cfg.compute_dtype)
        keys, values = empty_cache(
            cfg.n_layers, batch, max_new, cfg.n_kv_heads, cfg.head_dim, dtype
        )
        state = DecodeState(layers=(keys, values, enc_keys, enc_values), rows=pad, start=1)
        start = jnp.full((batch,), cfg.decoder_start_id, jnp.int32)
        logits, state = self._decode(start, state, 0)
        return logits, state

    def step(
        self, tokens: jax.Array, state: DecodeState, index: jax.Array
    ) -> tuple[jax.Array, DecodeState]:
        return self._decode(tokens, state, state.start + index)

    def _decode(
        self, tokens: jax.Array, state: DecodeState, slot: jax.Array
    ) -> tuple[jax.Array, DecodeState]:
        """Logits [B, V] after feeding the decoder ``tokens`` [B] at ``slot``."""
        cfg = self.cfg
        pad = state.rows
        slots, length = state.layers[0].shape[3], state.layers[2].shape[3]
        step = step_view(slot, 1, jnp.zeros_like(pad), slots, None)
        table = position_bias(self.decoder_bias[...], slots, slots, bidirectional=False, cfg=cfg)
        bias = jax.lax.dynamic_slice_in_dim(table, slot, 1, axis=2)  # [1, N, 1, S]
        cross = jnp.broadcast_to(padding_bias(pad, length), (len(pad), cfg.n_heads, 1, length))
        y = self._embed(tokens[:, None])
        y, cache = scan_decode(self.decoder, y, state.layers, step, bias, cross, shard=self.shard)
        return self._head(self.decoder_norm(y))[:, 0], state.replace(layers=cache)


def padding_bias(pad: jax.Array, length: int) -> jax.Array:
    """[B, 1, 1, L] float32: 0 for each row's keys, the float32 minimum for its first
    ``pad[b]`` (left padding), as transformers masks them."""
    hidden = jnp.arange(length)[None, :] < pad[:, None]
    return jnp.where(hidden, jnp.finfo(jnp.float32).min, 0.0)[:, None, None, :]
