"""A weight contraction whose weight gradient is formed, and reduced, in float32.

``weight_einsum("BLD,DF->BLF", x, w, dtype)`` is ``einsum(x, w.astype(dtype))``. Plain
JAX would give the bf16 copy ``w.astype(bf16)`` a bf16 gradient, so the partial sums
that data-parallel devices add together (the all-reduce or reduce-scatter over the
batch) would be rounded to bf16 before they reach the float32 master weight. Here the
backward pass forms the weight gradient with a float32 result (``preferred_element_type``;
the matmul still reads bf16) and returns it for the float32 weight, so the cross-device
sum runs in float32. The input gradient stays in the input's dtype. Under
:func:`weight_gradients_in` (``train.grad_comm_dtype: bfloat16``) the weight gradient is
formed in that dtype instead, so the reduction after it is narrower, and widened to the
weight's dtype after it.

The output is named for rematerialisation policies (``name``: the projection it is, one
of :data:`jaxtrain.models.remat.MATMULS`): a custom VJP hides the dot from
``dots_with_no_batch_dims_saveable``, so the policies save these names
(``models/remat.py``).

An int8 :class:`~jaxtrain.models.quantized.QuantizedWeight` (generation from a quantized
checkpoint) is dequantized to ``dtype`` here, inside the jitted program, right before the
dot: the weights stay int8 in memory and the dequantized copy is a temporary of the one
matmul (one layer's, inside the scan over layers). It has no gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtrain.models.fp8 import fp8_einsum
from jaxtrain.models.quantized import QuantizedWeight
from jaxtrain.models.remat import WEIGHT_MATMUL

_GRADIENT_DTYPE: contextvars.ContextVar = contextvars.ContextVar("weight_grad", default=None)


@contextlib.contextmanager
def weight_gradients_in(dtype) -> Iterator[None]:
    """Within this block, weight matmuls traced form their weight gradients in ``dtype``
    (default float32); the step sets it for the gradient computation it traces."""
    token = _GRADIENT_DTYPE.set(jnp.dtype(dtype))
    try:
        yield
    finally:
        _GRADIENT_DTYPE.reset(token)


def _operands(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    return x, w, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _einsum(spec: str, x: jax.Array, w: jax.Array, dtype, w_dtype, g_dtype) -> jax.Array:
    return jnp.einsum(spec, x, w.astype(dtype))


def _forward(spec: str, x: jax.Array, w: jax.Array, dtype, w_dtype, g_dtype):
    # The weight is kept as cast for the matmul, so the backward pass (and a remat's
    # recomputation) gathers it, sharded, at the compute dtype once, as plain JAX does.
    cast = w.astype(dtype)
    return jnp.einsum(spec, x, cast), (x, cast)


def _backward(spec: str, dtype, w_dtype, g_dtype, residuals, g: jax.Array):
    x, cast = residuals
    x_axes, w_axes, out_axes = _operands(spec)
    dx = jnp.einsum(f"{out_axes},{w_axes}->{x_axes}", g, cast)
    dw = jnp.einsum(f"{x_axes},{out_axes}->{w_axes}", x, g, preferred_element_type=g_dtype)
    return dx.astype(x.dtype), dw.astype(w_dtype)


_einsum.defvjp(_forward, _backward)


def weight_einsum(
    spec: str,
    x: jax.Array,
    w: jax.Array | QuantizedWeight,
    dtype,
    name: str = WEIGHT_MATMUL,
    fp8: jax.Array | None = None,
) -> jax.Array:
    """``einsum(spec, x, w.astype(dtype))`` with a float32 weight gradient; ``spec`` names
    the activation first and the weight second; the output is named ``name`` for remat
    policies. An int8 ``w`` is dequantized first. With ``fp8`` (the projection's amax
    history, :mod:`jaxtrain.models.fp8`) the matmul computes in float8."""
    if isinstance(w, QuantizedWeight):
        return checkpoint_name(jnp.einsum(spec, x, w.dequantize(dtype)), name)
    g_dtype = _GRADIENT_DTYPE.get() or jnp.dtype(jnp.float32)
    if fp8 is not None:
        return checkpoint_name(fp8_einsum(spec, x, w, fp8, dtype, g_dtype), name)
    return checkpoint_name(_einsum(spec, x, w, jnp.dtype(dtype), w.dtype, g_dtype), name)
