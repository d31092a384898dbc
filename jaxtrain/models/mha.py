"""Multi-head attention for encoders and encoder-decoders (Vaswani et al., 2017).

:class:`jaxtrain.models.layers.Attention` is the decoders' causal, rotary self-attention.
Encoders need what it leaves out: attention both ways (BERT; Devlin et al., 2019, and the
T5 encoder), keys and values from another sequence (T5's cross-attention; Raffel et al.,
2020) and T5's additive relative position bias with no ``1/sqrt(H)`` scaling (T5 folds
the scale into its initialisation). The parameters are named and laid out as in
``Attention`` (``wq`` [D, N, H], ``wk``/``wv`` [D, K, H], ``wo`` [N, H, D], optional
biases), so the Hugging Face mappings read alike.

All of it goes through the kernel dispatcher (:func:`jaxtrain.models.layers.attend`):
unbiased self- and cross-attention reach the fused kernels on GPU/TPU (``resolve_impl``);
with T5's position bias it is
the plain-JAX reference, the one implementation that takes a bias.

Dimensions: B batch, L query length, S key length, D model width, N query heads, K kv
heads, G = N / K, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.kernels import xla_attention
from jaxtrain.models import remat
from jaxtrain.models.dense import weight_einsum
from jaxtrain.models.layers import Shard, attend, param


class MultiHeadAttention(nnx.Module):
    """Self- or cross-attention, bidirectional unless ``causal``, optionally biased.

    Args:
        head_dim: H (T5's ``d_kv`` need not be ``d_model / n_heads``).
        q_std, kv_std, out_std: initial standard deviations of wq, wk and wv, and wo.
        bias: learned biases on q, k, v and the output (BERT).
        scale: softmax scale; default ``1 / sqrt(H)`` (T5: 1).
        impl: the attention implementation (``model.attention``; biased calls use the
            reference).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        head_dim: int,
        q_std: float,
        kv_std: float,
        out_std: float,
        impl: str,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        shard: Shard,
        rngs: nnx.Rngs,
        bias: bool = False,
        scale: float | None = None,
    ):
        normal = nnx.initializers.normal
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.wq = param(
            rngs,
            normal(q_std),
            (d_model, n_heads, head_dim),
            ("embed", "heads", "head_dim"),
            param_dtype,
        )
        self.wk = param(rngs, normal(kv_std), (d_model, n_kv_heads, head_dim), kv_axes, param_dtype)
        self.wv = param(rngs, normal(kv_std), (d_model, n_kv_heads, head_dim), kv_axes, param_dtype)
        self.wo = param(
            rngs,
            normal(out_std),
            (n_heads, head_dim, d_model),
            ("heads", "head_dim", "embed"),
            param_dtype,
        )
        if bias:
            # A bias's last axis is named "bias": replicated and exempt from weight decay.
            zeros = nnx.initializers.zeros
            self.bq = param(rngs, zeros, (n_heads, head_dim), ("heads", "bias"), param_dtype)
            self.bk = param(rngs, zeros, (n_kv_heads, head_dim), ("kv_heads", "bias"), param_dtype)
            self.bv = param(rngs, zeros, (n_kv_heads, head_dim), ("kv_heads", "bias"), param_dtype)
            self.bo = param(rngs, zeros, (d_model,), ("bias",), param_dtype)
        self.bias = bias
        self.scale = head_dim**-0.5 if scale is None else scale
        self.impl = impl
        self.compute_dtype = compute_dtype
        self.shard = shard

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        causal: bool = False,
        position_bias: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` [B, L, D] attends to ``context`` [B, S, D] (to itself when None).

        Args:
            causal: mask keys after each query (self-attention only).
            position_bias: [1 or B, N, L, S] added to the scores (T5).
            segment_ids: [B, L] document ids of packed rows: attention stays within one
                (unbiased self-attention only).
        """
        source = x if context is None else context
        q = self._q(x)
        k, v = self.project_kv(source)
        assert context is None or segment_ids is None, "segment ids need self-attention"
        out = attend(
            q,
            k,
            v,
            impl=self.impl,
            shard=self.shard,
            causal=causal,
            segment_ids=segment_ids,
            scale=self.scale,
            bias=position_bias,
        )
        return self._out(out)

    def _q(self, x: jax.Array) -> jax.Array:
        q = weight_einsum("BLD,DNH->BLNH", x, self.wq[...], self.compute_dtype, remat.QUERY_PROJ)
        if self.bias:
            q = q + self.bq[...].astype(self.compute_dtype)
        return self.shard(q, ("batch", "length", "act_heads", None))

    def project_kv(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The keys and values [B, S, K, H] of ``source`` [B, S, D]."""
        dt = self.compute_dtype
        k = weight_einsum("BSD,DKH->BSKH", source, self.wk[...], dt, remat.KEY_PROJ)
        v = weight_einsum("BSD,DKH->BSKH", source, self.wv[...], dt, remat.VALUE_PROJ)
        if self.bias:
            k, v = k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        axes = ("batch", "length", "act_kv_heads", None)
        return self.shard(k, axes), self.shard(v, axes)

    def _out(self, out: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        out = weight_einsum("BLNH,NHD->BLD", out, self.wo[...], dt, remat.OUT_PROJ)
        return out + self.bo[...].astype(dt) if self.bias else out

    def attend_to(
        self,
        x: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` [B, L, D] attends to given keys and values [B, K, S, H] (a KV cache's
        layout: a decode step's cache, or the encoder's, projected once),
        bidirectionally: ``bias`` [1 or B, N, L, S] added to the scores, ``mask``
        [B, L, S] True where a query sees a key. Always the plain-JAX reference (it alone
        takes a mask)."""
        q = self._q(x)
        out = xla_attention(
            q, k, v, causal=False, scale=self.scale, bias=bias, mask=mask, heads_first=True
        )
        return self._out(out)
