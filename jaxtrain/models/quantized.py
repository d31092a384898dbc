"""Int8 weights as data: symmetric, one scale per output channel or per group of inputs.

A weight that a matmul reads (through :func:`jaxtrain.models.dense.weight_einsum`) lays
out its contracted (input) axes first and its output axes last: ``[D, N, H]``,
``[N, H, D]``, ``[F, D]``, ``[D, V]``, with a leading ``layers`` axis when stacked. Seen
as a matrix ``[C_in, C_out]`` (C_in the product of the contracted axes), each output
channel gets one float32 scale ``s = max|w| / 127`` over its inputs, or one per group of
``group`` consecutive inputs, and the weight is stored as ``q = round(w / s)`` in int8,
so ``|w - q * s| <= s / 2`` (absmax "vector-wise" quantization, Dettmers et al., 2022,
LLM.int8(); groups along the input as in GPTQ, Frantar et al., 2023).

:class:`QuantizedWeight` stands in for the array inside an ``nnx.Param``: layers read it
with ``param[...]`` as they read an array, and ``weight_einsum`` dequantizes it to the
compute dtype right before the dot, inside the jitted program. Embedding tables are read
by a lookup, not a matmul, and are not quantized here.

Dimensions: G groups per output channel, C_in inputs, C_out output channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

BITS = 8
QMAX = 2 ** (BITS - 1) - 1  # 127: symmetric, -128 unused

# The axes a matmul contracts lead its weight: the activations' last axis (D or F) or
# their last two (N, H, for the attention output projection).
_CONTRACTED = {"embed": 1, "mlp": 1, "heads": 2}


@struct.dataclass
class QuantizedWeight:
    """An int8 weight and its float32 scales.

    Attributes:
        values: int8, the weight's shape ``[..., *contracted, *outputs]``.
        scale: float32 ``[..., G, C_out]``; ``...`` are stacked axes (``layers``) that
            ``values`` shares.
    """

    values: jax.Array
    scale: jax.Array

    def __getitem__(self, key: object) -> QuantizedWeight:
        """``param[...]``: the weight whole, as layers read an array parameter."""
        if key is not Ellipsis:
            raise TypeError(f"a quantized weight is read whole (param[...]), not [{key!r}]")
        return self

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """The weight ``q * s`` in ``dtype``, in its own shape."""
        lead = self.scale.ndim - 2
        groups, c_out = self.scale.shape[-2:]
        rows = self.values.reshape(*self.values.shape[:lead], groups, -1, c_out)
        weight = rows.astype(jnp.float32) * self.scale[..., :, None, :]
        return weight.reshape(self.values.shape).astype(dtype)


def contracted_axes(axes: Sequence[str | None]) -> int:
    """How many axes a matmul contracts in a weight with these logical axes (after a
    leading ``layers`` axis); 0 for what is not a matmul weight (embedding tables, norm
    scales, biases)."""
    names = tuple(axes[1:] if axes and axes[0] == "layers" else axes)
    if "bias" in names or "norm" in names or not names:
        return 0
    n = _CONTRACTED.get(names[0], 0)
    if n == 2 and names[:2] != ("heads", "head_dim"):
        return 0
    return n if 0 < n < len(names) else 0


def input_size(shape: Sequence[int], contracted: int, lead: int = 0) -> int:
    """C_in of a weight of ``shape`` with ``lead`` stacked axes in front."""
    return math.prod(shape[lead : lead + contracted])


def quantize(w: jax.Array, contracted: int, *, lead: int = 0, group: int = 0) -> QuantizedWeight:
    """``w`` as int8 with one scale per output channel (``group`` 0) or per ``group``
    consecutive inputs of each output channel.

    Args:
        w: the float weight ``[*stacked, *contracted, *outputs]``.
        contracted: how many axes after the stacked ones the matmul contracts.
        lead: how many stacked axes lead ``w`` (1 for scanned layers).
        group: inputs per scale; 0: all of them (C_in).

    Raises:
        ValueError: if ``group`` does not divide C_in.
    """
    shape = w.shape
    c_in = input_size(shape, contracted, lead)
    c_out = math.prod(shape[lead + contracted :])
    size = group or c_in
    if size <= 0 or c_in % size:
        raise ValueError(f"group size {group} does not divide the {c_in} inputs")
    rows = jnp.asarray(w, jnp.float32).reshape(*shape[:lead], c_in // size, size, c_out)
    amax = jnp.max(jnp.abs(rows), axis=-2)  # [..., G, C_out]
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)  # an all-zero channel stays zero
    q = jnp.clip(jnp.round(rows / scale[..., :, None, :]), -QMAX, QMAX).astype(jnp.int8)
    return QuantizedWeight(q.reshape(shape), scale)
