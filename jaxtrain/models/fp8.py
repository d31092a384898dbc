"""FP8 matmuls with delayed scaling (``model.fp8``), as Transformer Engine and Flax's
fp8 ops compute them.

A projection ``x @ w`` computes in float8: the activation and the weight are scaled and
cast to e4m3 in the forward pass, the incoming gradient to e5m2 in the backward pass,
and each dot reads the float8 operands and accumulates in float32 (on hardware without
float8 units XLA converts them up first, so the same numbers come out on a CPU). The
weight is quantized before ZeRO-3 gathers it, so the gather moves float8 bytes.

Each tensor's scale is ``max / amax``, where ``amax`` is the largest magnitude in its
*history*: the amaxes seen in the last ``model.fp8_history`` steps (delayed scaling: a
step's own tensor is cast with the scale its predecessors set, no extra pass over it
first). An empty history (the first step) falls back to the tensor's own amax. A
projection keeps one ``[3, H]`` history, rows x, w and g, as a parameter whose logical
axes are ``("fp8_tensor", "fp8_history")``: it is stacked, scanned, sharded and
checkpointed with the layer's weights. It is not trained: its "gradient" is the amaxes
this step saw (the custom VJP returns them in column 0), which the step records into the
history (:mod:`jaxtrain.train.fp8_history`) instead of an optimizer update.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

E4M3 = jnp.float8_e4m3fn  # activations and weights: more mantissa
E5M2 = jnp.float8_e5m2  # gradients: more range
HISTORY_AXES = ("fp8_tensor", "fp8_history")  # logical axes of a projection's history
ROWS = 3  # x, w, g


def history(length: int) -> nnx.Param:
    """A projection's empty amax history, ``[3, length]`` zeros."""
    return nnx.Param(
        jnp.zeros((ROWS, length), jnp.float32), out_sharding=HISTORY_AXES, eager_sharding=False
    )


SUFFIX = "_fp8"  # a history's name: the weight's, then this


def is_history_path(path: tuple[str, ...]) -> bool:
    """Whether a parameter path (a tuple of keys) names an amax history."""
    return bool(path) and str(path[-1]).endswith(SUFFIX)


def add_histories(module: nnx.Module, weights: tuple[str, ...], length: int) -> None:
    """Give ``module`` an amax history ``<weight>_fp8`` for each of its ``weights`` that
    computes in float8 (none when ``length`` is 0: ``model.fp8`` off)."""
    for weight in weights if length else ():
        setattr(module, weight + SUFFIX, history(length))


def history_of(module: nnx.Module, weight: str) -> jax.Array | None:
    """The amax history of ``module``'s ``weight``, or None when it computes as usual."""
    found = getattr(module, weight + SUFFIX, None)
    return None if found is None else found[...]


def _amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def scale(past: jax.Array, current: jax.Array, fmt) -> jax.Array:
    """The factor that maps the largest magnitude of ``past`` (the history; ``current``
    when the history is empty) onto ``fmt``'s largest finite value; 1 when both are 0
    or not finite."""
    amax = jnp.max(past)
    amax = jnp.where(amax > 0, amax, current)
    good = jnp.isfinite(amax) & (amax > 0)
    return jnp.where(good, float(jnp.finfo(fmt).max) / jnp.where(good, amax, 1.0), 1.0)


def quantize(x: jax.Array, factor: jax.Array, fmt) -> jax.Array:
    """``x * factor`` saturated to ``fmt``'s range and rounded to ``fmt``."""
    top = float(jnp.finfo(fmt).max)
    return jnp.clip(x.astype(jnp.float32) * factor, -top, top).astype(fmt)


def _operands(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    return x, w, out


def fp8_einsum(spec: str, x: jax.Array, w: jax.Array, hist: jax.Array, dtype, g_dtype):
    """``einsum(spec, x, w)`` in float8 with the scales of the ``[3, H]`` history
    ``hist``, returned in ``dtype``; the weight gradient is formed in ``g_dtype`` and
    returned in ``w``'s dtype; ``hist``'s gradient is this call's amaxes (column 0)."""
    dtypes = (jnp.dtype(dtype), jnp.dtype(g_dtype), x.dtype, w.dtype)
    return _fp8(spec, dtypes, x, w, hist)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8(spec, dtypes, x, w, hist):
    return _forward(spec, dtypes, x, w, hist)[0]


def _forward(spec, dtypes, x, w, hist):
    ax, aw = _amax(x), _amax(w)
    sx, sw = scale(hist[0], ax, E4M3), scale(hist[1], aw, E4M3)
    xq, wq = quantize(x, sx, E4M3), quantize(w, sw, E4M3)
    out = jnp.einsum(spec, xq, wq, preferred_element_type=jnp.float32) / (sx * sw)
    return out.astype(dtypes[0]), (xq, wq, sx, sw, jnp.stack([ax, aw]), hist[2])


def _backward(spec, dtypes, residuals, g):
    _, g_dtype, x_dtype, w_dtype = dtypes
    xq, wq, sx, sw, seen, past_g = residuals
    x_axes, w_axes, out_axes = _operands(spec)
    ag = _amax(g)
    sg = scale(past_g, ag, E5M2)
    gq = quantize(g, sg, E5M2)
    dx = jnp.einsum(f"{out_axes},{w_axes}->{x_axes}", gq, wq, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{x_axes},{out_axes}->{w_axes}", xq, gq, preferred_element_type=jnp.float32)
    dw = (dw / (sx * sg)).astype(g_dtype)
    observed = jnp.zeros((ROWS, past_g.shape[0]), jnp.float32)
    observed = observed.at[:, 0].set(jnp.concatenate([seen, ag[None]]))
    return (dx / (sg * sw)).astype(x_dtype), dw.astype(w_dtype), observed


_fp8.defvjp(_forward, _backward)
