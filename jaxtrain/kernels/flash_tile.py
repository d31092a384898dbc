"""The math of FlashAttention-2 (Dao, 2023) on one tile: a block of queries against a
block of keys. Both kernel families (:mod:`jaxtrain.kernels.flash_loop` for GPU,
:mod:`jaxtrain.kernels.flash_tpu` for TPU) call these functions on values they loaded, so
the online softmax (Milakov & Gimelshein, 2018) and its gradient are written once; the
families differ only in how tiles reach the functions (an in-kernel loop, or the grid).

Shapes: bq query rows, bk key rows, H head dim. Row statistics (running max ``m``,
normaliser ``l``, log-sum-exp, delta) are [bq, 1] float32 columns.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtrain.kernels.flash_mask import MaskSpec

# Finite, so a fully masked row gives exp(0) rather than inf - inf = NaN; its exp with a
# real row maximum underflows to exactly 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything the kernels are specialised on (hashable: a custom_vjp static arg).

    Attributes:
        mask: which keys each query sees.
        scale: softmax scale.
        groups: G query heads per kv head.
        bq, bk: forward tile (query rows x key rows).
        bq_bwd, bk_bwd: backward tile.
        platform: "gpu" (Triton) or "tpu" (Mosaic): which kernel family to build.
        interpret: run in Pallas interpret mode (on CPU).
    """

    mask: MaskSpec
    scale: float
    groups: int
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    platform: str
    interpret: bool


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """A 2-D matmul contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``,
    accumulated in float32 (full float32 precision for float32 inputs, not TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def positions(start, size: int, axis: int) -> jax.Array:
    """int32 [size, 1] (axis 0) or [1, size] (axis 1) positions ``start + iota``."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


@dataclasses.dataclass(frozen=True)
class Tile:
    """Where a tile sits: query positions [bq, 1] (key coordinates, offset applied), key
    positions [1, bk], and the segment ids of each ([bq, 1], [1, bk]) or ``None``."""

    q_pos: jax.Array
    k_pos: jax.Array
    q_seg: jax.Array | None
    k_seg: jax.Array | None

    def keep(self, mask: MaskSpec) -> jax.Array | None:
        return mask.keep(self.q_pos, self.k_pos, self.q_seg, self.k_seg)


def attend(st: KernelSpec, tile: Tile, q, k, v, acc, m, l):
    """One online-softmax step: fold keys ``k`` and values ``v`` [bk, H] into the running
    output ``acc`` [bq, H], row max ``m`` and normaliser ``l`` (all float32)."""
    s = dot(q, k, (1, 1)) * st.scale  # [bq, bk]
    keep = tile.keep(st.mask)
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)  # a row with nothing visible yet stays empty
    correction = jnp.exp(m - m_new)
    l = correction * l + jnp.sum(p, axis=1, keepdims=True)
    acc = correction * acc + dot(p.astype(v.dtype), v, (1, 0))
    return acc, m_new, l


def finish(acc, m, l):
    """(output, log-sum-exp) of the running state; a query that saw no key outputs 0."""
    l = jnp.where(l == 0.0, 1.0, l)
    return acc / l, m + jnp.log(l)


def initial_state(bq: int, h: int):
    """(acc, m, l) before any key block."""
    return (
        jnp.zeros((bq, h), jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )


def _probs_and_dscores(st: KernelSpec, tile: Tile, q, k, v, do, lse, delta):
    """Recomputed probabilities P and score gradients dS = P * (dP - delta), [bq, bk]."""
    s = dot(q, k, (1, 1)) * st.scale
    keep = tile.keep(st.mask)
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    p = jnp.exp(s - lse)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    dp = dot(do, v, (1, 1))  # [bq, bk]
    return p, p * (dp - delta)


def dq_step(st: KernelSpec, tile: Tile, q, k, v, do, lse, delta):
    """This tile's contribution to dQ [bq, H] (float32, before the softmax scale)."""
    _, ds = _probs_and_dscores(st, tile, q, k, v, do, lse, delta)
    return dot(ds.astype(k.dtype), k, (1, 0))


def dkdv_step(st: KernelSpec, tile: Tile, q, k, v, do, lse, delta):
    """This tile's contributions (dK, dV) [bk, H] (float32; dK before the scale)."""
    p, ds = _probs_and_dscores(st, tile, q, k, v, do, lse, delta)
    dv = dot(p.astype(do.dtype), do, (0, 0))
    dk = dot(ds.astype(q.dtype), q, (0, 0))
    return dk, dv
