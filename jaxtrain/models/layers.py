"""Transformer building blocks with logical axis names on every parameter.

RMSNorm (Zhang & Sennrich, 2019), rotary position embeddings (Su et al., 2021) with
Llama 3.1's frequency scaling, grouped-query attention (Ainslie et al., 2023) with the
optional q/k/v biases of Qwen2, q/k RMSNorm of Qwen3 and sliding window of Mistral, and
the SwiGLU MLP (Shazeer, 2020), as used by LLaMA (Touvron et al., 2023); LayerNorm (Ba et
al., 2016) and the GELU MLP (Hendrycks & Gimpel, 2016) of GPT-2 (Radford et al., 2019).

Dimensions: B batch, L length, D model width, N query heads, K kv heads, H head dim,
F MLP width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxtrain.config import RopeScalingConfig
from jaxtrain.errors import UserError
from jaxtrain.kernels import KERNEL_IMPLS, attention, resolve_call, xla_attention
from jaxtrain.models import remat
from jaxtrain.models.dense import weight_einsum
from jaxtrain.models.fp8 import add_histories, history_of
from jaxtrain.models.kv_cache import LAYER_CACHE_AXES, Step
from jaxtrain.sharding import per_shard
from jaxtrain.sharding.context import context_attention, sequence_ways
from jaxtrain.sharding.partition import ActivationSharding

Shard = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
Initializer = Callable[..., jax.Array]


def no_shard(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """The activation constraint used when no mesh is given: the identity."""
    del axes
    return x


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: tuple[str | None, ...],
    dtype: jnp.dtype,
) -> nnx.Param:
    """A parameter carrying its logical axes as ``out_sharding`` metadata."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False
    )


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer norm with a learned scale and bias, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
) -> np.ndarray:
    """The [H/2] float32 inverse frequencies of RoPE, scaled as Llama 3.1 does when
    ``scaling.kind == "llama3"`` (long wavelengths divided by ``factor``, short ones kept,
    a smooth blend between)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if scaling is None or scaling.kind == "none":
        return inv_freq.astype(np.float32)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    long_wave = wavelen > scaling.original_max_len / low
    short_wave = wavelen < scaling.original_max_len / high
    smooth = (scaling.original_max_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(long_wave, inv_freq / scaling.factor, blended)
    return np.where(short_wave, inv_freq, scaled).astype(np.float32)


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each [B, L, H/2] in float32, for integer ``positions`` [B, L]."""
    inv_freq = jnp.asarray(rope_frequencies(head_dim, theta, scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate [B, L, N, H] by position, pairing dimension i with i + H/2 (LLaMA/HF layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU in its tanh form (HF's ``gelu_new``), as T5 v1.1's gated feed-forward uses."""
    return jax.nn.gelu(x, approximate=True)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``rate`` is 0 or there is no key (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@struct.dataclass
class VocabHead:
    """The LM head as data: what turns final hidden states into logits.

    ``head(x)`` maps x [B, L, D] in the compute dtype to float32 logits [B, L, V]:
    ``(x * scale) @ W + bias`` in ``dtype``, then float32, where W is the tied embedding
    [V, D] (``tied``) or an own head [D, V]. The model's ``__call__`` applies it to all
    positions; :func:`jaxtrain.train.loss.chunked_cross_entropy_sum` to a chunk at a time.
    ``weight`` and ``bias`` are the parameters as stored (float32 master copies), cast to
    ``dtype`` here, where they are used: inside a chunked loss's rematerialised body, so
    their gradients sum over chunks in float32.

    Attributes:
        weight: [V, D] when ``tied``, else [D, V].
        bias: [V] (BERT's per-token output bias) or None.
        tied: the layout of ``weight``.
        dtype: the compute dtype of the matmul and the bias.
        shard: the model's activation constraint, applied to the logits.
        scale: multiplies x first (T5's tied head: ``D**-0.5``), or None.
    """

    weight: jax.Array
    bias: jax.Array | None
    tied: bool = struct.field(pytree_node=False)
    dtype: jnp.dtype = struct.field(pytree_node=False)
    shard: Shard = struct.field(pytree_node=False)
    scale: float | None = struct.field(pytree_node=False, default=None)

    @property
    def weight_axes(self) -> tuple[str, str]:
        """The logical axes of ``weight`` in the layout the matmul reads it: whole over D,
        split over V as the logits are."""
        return ("act_vocab", "act_embed") if self.tied else ("act_embed", "act_vocab")

    def project(self, x: jax.Array) -> jax.Array:
        """x [B, L, D] -> float32 logits [B, L, V], unconstrained."""
        dt = self.dtype
        if self.scale is not None:
            x = x * self.scale
        if self.tied:
            logits = weight_einsum("BLD,VD->BLV", x, self.weight, dt)
        else:
            logits = weight_einsum("BLD,DV->BLV", x, self.weight, dt)
        if self.bias is not None:
            logits = logits + self.bias.astype(dt)
        return logits.astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.shard(self.project(x), ("batch", "length", "act_vocab"))


def vocab_head(
    embed: nnx.Param,
    lm_head: nnx.Param | None,
    dtype: jnp.dtype,
    shard: Shard,
    *,
    bias: nnx.Param | None = None,
    tied_scale: float | None = None,
) -> VocabHead:
    """The head through the tied embedding [V, D] when ``lm_head`` is None (its input
    scaled by ``tied_scale``, if given), else through ``lm_head`` [D, V]."""
    bias = None if bias is None else bias[...]
    if lm_head is None:
        return VocabHead(embed[...], bias, tied=True, dtype=dtype, shard=shard, scale=tied_scale)
    return VocabHead(lm_head[...], bias, tied=False, dtype=dtype, shard=shard)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str,
    shard: Shard,
    causal: bool,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    context: str = "ring",
) -> jax.Array:
    """Attention through the kernel dispatcher (:func:`jaxtrain.kernels.attention`).

    An opaque kernel (Pallas, cuDNN) cannot be partitioned by XLA, so it runs per shard:
    each device gets its own rows and heads, with the length whole. When the rules split
    the length (context parallelism), attention is ``context`` (ring or all-gather) over
    that split (:mod:`jaxtrain.sharding.context`).
    """
    if isinstance(shard, ActivationSharding) and sequence_ways(shard.mesh, shard.rules) > 1:
        if bias is not None:
            raise UserError("mesh.sequence: context parallelism takes no attention score bias")
        return context_attention(
            q, k, v, segment_ids, shard=shard, mode=context, causal=causal, window=window,
            scale=scale, impl=impl,
        )  # fmt: skip
    impl = resolve_call(impl, q, k, causal=causal, segment_ids=segment_ids, window=window,
                        biased=bias is not None)  # fmt: skip

    def fn(q, k, v, segment_ids):
        return attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            causal=causal,
            window=window,
            scale=scale,
            bias=bias,
            impl=impl,
        )

    if impl in KERNEL_IMPLS:  # never biased: resolve_impl keeps biased calls on the reference
        heads = ("batch", None, "act_heads", None)
        kv_heads = ("batch", None, "act_kv_heads", None)
        fn = per_shard(fn, shard, (heads, kv_heads, kv_heads, ("batch", None)), heads)
    return fn(q, k, v, segment_ids)


class Attention(nnx.Module):
    """Causal grouped-query self-attention, rotary unless called without (sin, cos).

    Args:
        head_dim: H; default ``d_model // n_heads``.
        qkv_bias: learned biases on q, k and v (Qwen2, GPT-2).
        out_bias: a learned bias on the output projection (GPT-2).
        qk_norm_eps: RMSNorm q and k over H before RoPE, with this epsilon (Qwen3).
        window: each query sees only the ``window`` latest keys, itself included (Mistral).
        context: attention when the length is split (``model.context_parallel``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        out_std: float,
        impl: str,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        shard: Shard,
        rngs: nnx.Rngs,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm_eps: float | None = None,
        window: int | None = None,
        context: str = "ring",
        fp8_history: int = 0,
    ):
        head_dim = head_dim or d_model // n_heads
        add_histories(self, ("wq", "wk", "wv", "wo"), fp8_history)
        init = nnx.initializers.normal(0.02)
        self.wq = param(
            rngs, init, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype
        )
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.wk = param(rngs, init, (d_model, n_kv_heads, head_dim), kv_axes, param_dtype)
        self.wv = param(rngs, init, (d_model, n_kv_heads, head_dim), kv_axes, param_dtype)
        out_init = nnx.initializers.normal(out_std)
        self.wo = param(
            rngs,
            out_init,
            (n_heads, head_dim, d_model),
            ("heads", "head_dim", "embed"),
            param_dtype,
        )
        zeros = nnx.initializers.zeros
        if qkv_bias:
            # A bias's last axis is named "bias": replicated and exempt from weight decay.
            self.bq = param(rngs, zeros, (n_heads, head_dim), ("heads", "bias"), param_dtype)
            self.bk = param(rngs, zeros, (n_kv_heads, head_dim), ("kv_heads", "bias"), param_dtype)
            self.bv = param(rngs, zeros, (n_kv_heads, head_dim), ("kv_heads", "bias"), param_dtype)
        if out_bias:
            self.bo = param(rngs, zeros, (d_model,), ("bias",), param_dtype)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.qkv_bias, self.out_bias, self.qk_norm = qkv_bias, out_bias, qk_norm_eps is not None
        self.window = window
        self.impl = impl
        self.context = context
        self.compute_dtype = compute_dtype
        self.shard = shard

    def _qkv(
        self, x: jax.Array, sin: jax.Array | None, cos: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project x [B, L, D] to q [B, L, N, H] and k, v [B, L, K, H]; bias, norm, rotate."""
        dt = self.compute_dtype
        q = weight_einsum(
            "BLD,DNH->BLNH", x, self.wq[...], dt, remat.QUERY_PROJ, history_of(self, "wq")
        )
        k = weight_einsum(
            "BLD,DKH->BLKH", x, self.wk[...], dt, remat.KEY_PROJ, history_of(self, "wk")
        )
        v = weight_einsum(
            "BLD,DKH->BLKH", x, self.wv[...], dt, remat.VALUE_PROJ, history_of(self, "wv")
        )
        if self.qkv_bias:
            q, k, v = (t + b[...].astype(dt) for t, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if sin is not None:
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array | None,
        cos: jax.Array | None,
        segment_ids: jax.Array | None,
    ) -> jax.Array:
        q, k, v = self._qkv(x, sin, cos)
        q = self.shard(q, ("batch", "length", "act_heads", None))
        k = self.shard(k, ("batch", "length", "act_kv_heads", None))
        v = self.shard(v, ("batch", "length", "act_kv_heads", None))
        out = attend(
            q,
            k,
            v,
            impl=self.impl,
            shard=self.shard,
            causal=True,
            segment_ids=segment_ids,
            window=self.window,
            context=self.context,
        )
        return self._out(out)

    def _out(self, out: jax.Array) -> jax.Array:
        """The heads [B, L, N, H] projected back to [B, L, D]."""
        dt = self.compute_dtype
        out = weight_einsum(
            "BLNH,NHD->BLD", out, self.wo[...], dt, remat.OUT_PROJ, history_of(self, "wo")
        )
        return out + self.bo[...].astype(dt) if self.out_bias else out

    def decode(
        self,
        x: jax.Array,
        sin: jax.Array | None,
        cos: jax.Array | None,
        cache: tuple[jax.Array, jax.Array],
        layer: jax.Array,
        step: Step,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Incremental self-attention (:mod:`jaxtrain.models.kv_cache`): the keys and
        values of x [B, L, D] are written into layer ``layer`` of the stacked cache
        [layers, B, K, S, H] as ``step`` places them, and each query attends to the keys
        ``step.sees`` allows.

        Returns:
            (output [B, L, D], the updated (keys, values) caches).
        """
        q, k, v = self._qkv(x, sin, cos)
        (keys, cached_k), (values, cached_v) = (
            step.write(c, layer, t) for c, t in zip(cache, (k, v), strict=True)
        )
        keys, values = (self.shard(t, LAYER_CACHE_AXES) for t in (keys, values))
        q = self.shard(q, ("batch", "length", "act_heads", None))
        out = xla_attention(q, keys, values, causal=False, mask=step.sees, heads_first=True)
        return self._out(out), (cached_k, cached_v)


class MLP(nnx.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU with the default ``silu``,
    T5 v1.1's gated GELU with :func:`gelu_tanh` (Shazeer, 2020)."""

    def __init__(
        self,
        d_model: int,
        mlp_dim: int,
        *,
        out_std: float,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        shard: Shard,
        rngs: nnx.Rngs,
        in_std: float = 0.02,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
        fp8_history: int = 0,
    ):
        add_histories(self, ("w_gate", "w_up", "w_down"), fp8_history)
        init = nnx.initializers.normal(in_std)
        self.w_gate = param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"), param_dtype)
        self.w_up = param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"), param_dtype)
        out_init = nnx.initializers.normal(out_std)
        self.w_down = param(rngs, out_init, (mlp_dim, d_model), ("mlp", "embed"), param_dtype)
        self.activation = activation
        self.compute_dtype = compute_dtype
        self.shard = shard

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        gate = weight_einsum(
            "BLD,DF->BLF", x, self.w_gate[...], dt, remat.MLP_IN, history_of(self, "w_gate")
        )
        up = weight_einsum(
            "BLD,DF->BLF", x, self.w_up[...], dt, remat.MLP_IN, history_of(self, "w_up")
        )
        hidden = self.shard(self.activation(gate) * up, ("batch", "length", "act_mlp"))
        down = history_of(self, "w_down")
        return weight_einsum("BLF,FD->BLD", hidden, self.w_down[...], dt, remat.MLP_OUT, down)


class GeluMLP(nnx.Module):
    """GPT-2's feed-forward: out(gelu(in(x) + b_in)) + b_out, GELU in its tanh form
    (``approximate``) or exact, with erf (BERT)."""

    def __init__(
        self,
        d_model: int,
        mlp_dim: int,
        *,
        out_std: float,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        shard: Shard,
        rngs: nnx.Rngs,
        approximate: bool = True,
        fp8_history: int = 0,
    ):
        add_histories(self, ("w_in", "w_out"), fp8_history)
        init, zeros = nnx.initializers.normal(0.02), nnx.initializers.zeros
        self.w_in = param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"), param_dtype)
        self.b_in = param(rngs, zeros, (mlp_dim,), ("bias",), param_dtype)
        out_init = nnx.initializers.normal(out_std)
        self.w_out = param(rngs, out_init, (mlp_dim, d_model), ("mlp", "embed"), param_dtype)
        self.b_out = param(rngs, zeros, (d_model,), ("bias",), param_dtype)
        self.approximate = approximate
        self.compute_dtype = compute_dtype
        self.shard = shard

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        hidden = weight_einsum(
            "BLD,DF->BLF", x, self.w_in[...], dt, remat.MLP_IN, history_of(self, "w_in")
        )
        hidden = hidden + self.b_in[...].astype(dt)
        hidden = jax.nn.gelu(hidden, approximate=self.approximate)
        hidden = self.shard(hidden, ("batch", "length", "act_mlp"))
        out = weight_einsum(
            "BLF,FD->BLD", hidden, self.w_out[...], dt, remat.MLP_OUT, history_of(self, "w_out")
        )
        return out + self.b_out[...].astype(dt)
