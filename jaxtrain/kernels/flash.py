"""FlashAttention-2 (Dao, 2023) in Pallas: forward and backward kernels under one
``jax.custom_vjp``.

The forward pass walks the key blocks of one query block with an online softmax
(Milakov & Gimelshein, 2018), keeping a running max ``m``, normaliser ``l`` and output
accumulator in float32, so the L x S score matrix never exists in memory; it saves only
the output and the per-row log-sum-exp. The backward pass recomputes the probabilities
block by block from that log-sum-exp: one kernel accumulates dQ over key blocks, another
accumulates dK and dV over query blocks and over the query heads of its kv-head group,
so grouped- and multi-query attention (Ainslie et al., 2023) never repeat K or V.

One kernel source lowers to Triton on GPU and to Mosaic on TPU; on CPU it runs in Pallas
interpret mode (slow, for testing). The kernels work on a heads-major [B, N, L, H] layout,
which both compilers tile (Mosaic wants the last two block dimensions to be whole or
multiples of (8, 128)); :func:`flash_attention` transposes and zero-pads to whole blocks
around them. Each program keeps one head's whole K/V (forward, dQ) or one group's whole
Q/dO (dK/dV) addressable and streams blocks from it with an in-kernel loop that skips
the blocks the mask hides (causal, window). On GPU those arrays are pointers into HBM;
on TPU Mosaic copies them whole into VMEM, which bounds the sequence length there. A TPU
variant that moves the inner loop onto an "arbitrary" grid axis with VMEM scratch
accumulators would lift that bound; it is not written because the kernels have only run
in interpret mode (no GPU or TPU was available), so the GPU and TPU lowerings are
untested.

Shapes: B batch, L query length, S key length, N query heads, K kv heads, G = N / K,
H head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxtrain.kernels.flash_mask import MaskSpec

# Finite, so a fully masked row gives exp(0) rather than inf - inf = NaN; its exp with a
# real row maximum underflows to exactly 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
MIN_BLOCK_GPU = 16  # Triton's tl.dot needs every matmul dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes, powers of two: ``q`` x ``k`` per forward step, ``q_bwd`` x ``k_bwd``
    per backward step. Each is clamped to the (padded) sequence length."""

    q: int = 128
    k: int = 128
    q_bwd: int = 64
    k_bwd: int = 64

    @classmethod
    def default(cls, backend: str) -> BlockSizes:
        """Defaults per backend: TPU tiles are at least 128 wide (the lane width); GPU
        backward tiles are smaller because dK and dV accumulate in registers."""
        if backend == "tpu":
            return cls(q=128, k=128, q_bwd=128, k_bwd=128)
        return cls()

    def __post_init__(self) -> None:
        for name in ("q", "k", "q_bwd", "k_bwd"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name}={size} must be a power of two")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels are specialised on (hashable: a custom_vjp static arg)."""

    mask: MaskSpec
    scale: float
    groups: int  # G query heads per kv head
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    backend: str
    interpret: bool

    def params(self, head_dim: int, n_grid: int):
        """Backend compiler parameters; ``None`` in interpret mode."""
        if self.interpret:
            return None
        if self.backend == "gpu":
            from jax.experimental.pallas import triton as plgpu

            return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
        if self.backend == "tpu":
            from jax.experimental.pallas import tpu as pltpu

            return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)
        return None


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
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


def _positions(start, size: int, axis: int) -> jax.Array:
    """int32 [size, 1] (axis 0) or [1, size] (axis 1) positions ``start + iota``."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


# --- forward ------------------------------------------------------------------------


def _fwd_kernel(*refs, st: _Static):
    if st.mask.segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
    bq, bk = st.bq, st.bk
    q_start = pl.program_id(2) * bq
    q = q_ref[...]  # [bq, H]
    q_pos = _positions(q_start + st.mask.offset, bq, 0)
    q_seg = None if qs_ref is None else qs_ref[...]  # [bq, 1]

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # [bk, H]
        v = v_ref[pl.ds(start, bk), :]
        s = _dot(q, k, (1, 1)) * st.scale  # [bq, bk]
        k_seg = None if ks_ref is None else ks_ref[:, pl.ds(start, bk)]  # [1, bk]
        keep = st.mask.keep(q_pos, _positions(start, bk, 1), q_seg, k_seg)
        if keep is not None:
            s = jnp.where(keep, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if keep is not None:
            p = jnp.where(keep, p, 0.0)  # a row with nothing visible yet stays empty
        correction = jnp.exp(m - m_new)
        l = correction * l + jnp.sum(p, axis=1, keepdims=True)
        acc = correction * acc + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, l

    lo, hi = st.mask.key_blocks(q_start, bq, bk, k_ref.shape[0] // bk)
    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    l = jnp.where(l == 0.0, 1.0, l)  # a query that sees no key outputs 0
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _forward(st: _Static, q, k, v, q_seg, k_seg):
    """(out [B, N, L, H], lse [B, N, L, 1] float32) on padded heads-major inputs."""
    b, n, length, h = q.shape
    s_len = k.shape[2]
    g = st.groups
    grid = (b, n, length // st.bq)
    q_spec = pl.BlockSpec((None, None, st.bq, h), lambda b, n, i: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, s_len, h), lambda b, n, i: (b, n // g, 0, 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    if st.mask.segments:
        in_specs += [
            pl.BlockSpec((None, st.bq, 1), lambda b, n, i: (b, i, 0)),
            pl.BlockSpec((None, 1, s_len), lambda b, n, i: (b, 0, 0)),
        ]
        args += [q_seg, k_seg]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=grid,
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, st.bq, 1), lambda b, n, i: (b, n, i, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, length, 1), jnp.float32),
        ],
        compiler_params=st.params(h, len(grid)),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(*args)


# --- backward -----------------------------------------------------------------------


def _probs(st: _Static, q, k, lse, q_pos, k_pos, q_seg, k_seg):
    """Recomputed probabilities [bq, bk] (float32) of a query block on a key block."""
    s = _dot(q, k, (1, 1)) * st.scale
    keep = st.mask.keep(q_pos, k_pos, q_seg, k_seg)
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    p = jnp.exp(s - lse)
    return p if keep is None else jnp.where(keep, p, 0.0)


def _dq_kernel(*refs, st: _Static):
    if st.mask.segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), qs_ref, ks_ref = (
            refs,
            None,
            None,
        )
    bq, bk = st.bq_bwd, st.bk_bwd
    q_start = pl.program_id(2) * bq
    q, do = q_ref[...], do_ref[...]  # [bq, H]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_pos = _positions(q_start + st.mask.offset, bq, 0)
    q_seg = None if qs_ref is None else qs_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        k_seg = None if ks_ref is None else ks_ref[:, pl.ds(start, bk)]
        p = _probs(st, q, k, lse, q_pos, _positions(start, bk, 1), q_seg, k_seg)
        dp = _dot(do, v, (1, 1))  # [bq, bk]
        ds = p * (dp - delta)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    lo, hi = st.mask.key_blocks(q_start, bq, bk, k_ref.shape[0] // bk)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, st: _Static):
    if st.mask.segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), qs_ref, ks_ref = (
            refs,
            None,
            None,
        )
    bq, bk = st.bq_bwd, st.bk_bwd
    k_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    k_pos = _positions(k_start, bk, 1)
    k_seg = None if ks_ref is None else ks_ref[...]  # [1, bk]
    q_len = q_ref.shape[1]

    def body(i, carry, g):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(start, bq)
        q, do = q_ref[g, rows, :], do_ref[g, rows, :]  # [bq, H]
        lse, delta = lse_ref[g, rows, :], delta_ref[g, rows, :]  # [bq, 1]
        q_seg = None if qs_ref is None else qs_ref[rows, :]
        q_pos = _positions(start + st.mask.offset, bq, 0)
        p = _probs(st, q, k, lse, q_pos, k_pos, q_seg, k_seg)  # [bq, bk]
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))  # [bk, H]
        dp = _dot(do, v, (1, 1))
        ds = p * (dp - delta)
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
        return dk, dv

    lo, hi = st.mask.query_blocks(k_start, bk, bq, q_len // bq)

    def group(g, carry):
        return lax.fori_loop(lo, hi, functools.partial(body, g=g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, st.groups, group, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(st: _Static, q, k, v, q_seg, k_seg, out, lse, do):
    b, n, length, h = q.shape
    kv, s_len = k.shape[1], k.shape[2]
    g = st.groups
    # delta_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij: the softmax-backward row term.
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    segments = st.mask.segments

    # dQ: one program per (batch, query head, query block), looping over key blocks.
    grid = (b, n, length // st.bq_bwd)
    rows = pl.BlockSpec((None, None, st.bq_bwd, h), lambda b, n, i: (b, n, i, 0))
    row_stats = pl.BlockSpec((None, None, st.bq_bwd, 1), lambda b, n, i: (b, n, i, 0))
    kv_all = pl.BlockSpec((None, None, s_len, h), lambda b, n, i: (b, n // g, 0, 0))
    in_specs = [rows, kv_all, kv_all, rows, row_stats, row_stats]
    args = [q, k, v, do, lse, delta]
    if segments:
        in_specs += [
            pl.BlockSpec((None, st.bq_bwd, 1), lambda b, n, i: (b, i, 0)),
            pl.BlockSpec((None, 1, s_len), lambda b, n, i: (b, 0, 0)),
        ]
        args += [q_seg, k_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=grid,
        in_specs=in_specs,
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=st.params(h, len(grid)),
        interpret=st.interpret,
        name="flash_attention_dq",
    )(*args)

    # dK, dV: one program per (batch, kv head, key block), looping over the G query
    # heads of the group and their query blocks, so no [B, N, S, H] partial sums exist.
    grid = (b, kv, s_len // st.bk_bwd)
    group_rows = pl.BlockSpec((None, g, length, h), lambda b, j, i: (b, j, 0, 0))
    group_stats = pl.BlockSpec((None, g, length, 1), lambda b, j, i: (b, j, 0, 0))
    cols = pl.BlockSpec((None, None, st.bk_bwd, h), lambda b, j, i: (b, j, i, 0))
    in_specs = [group_rows, cols, cols, group_rows, group_stats, group_stats]
    args = [q, k, v, do, lse, delta]
    if segments:
        in_specs += [
            pl.BlockSpec((None, length, 1), lambda b, j, i: (b, 0, 0)),
            pl.BlockSpec((None, 1, st.bk_bwd), lambda b, j, i: (b, 0, i)),
        ]
        args += [q_seg, k_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=grid,
        in_specs=in_specs,
        out_specs=[cols, cols],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=st.params(h, len(grid)),
        interpret=st.interpret,
        name="flash_attention_dkdv",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, q_seg, k_seg):
    return _forward(st, q, k, v, q_seg, k_seg)[0]


def _flash_fwd(st: _Static, q, k, v, q_seg, k_seg):
    out, lse = _forward(st, q, k, v, q_seg, k_seg)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _flash_bwd(st: _Static, residuals, do):
    q, k, v, q_seg, k_seg, out, lse = residuals
    dq, dk, dv = _backward(st, q, k, v, q_seg, k_seg, out, lse, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- wrapper ------------------------------------------------------------------------


def _fit(block: int, length: int, minimum: int) -> int:
    """``block`` shrunk to the smallest power of two covering ``length`` (>= minimum)."""
    return max(min(block, pl.next_power_of_2(length)), minimum)


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """FlashAttention-2 with the contract of ``jaxtrain.kernels.xla_attention``.

    Args:
        q: [B, L, N, H] queries, float32 or bfloat16.
        k: [B, S, K, H] keys, K dividing N.
        v: [B, S, K, H] values.
        segment_ids: optional [B, L] ints (L == S); tokens attend only within a segment.
        causal: mask keys after each query (query i sits at key position i + S - L).
        window: sliding window: keys fewer than ``window`` positions away, or ``None``.
        scale: softmax scale; default 1 / sqrt(H).
        block_sizes: tile sizes; default :meth:`BlockSizes.default` for the backend.
        interpret: run in Pallas interpret mode; default on when not on GPU or TPU.

    Returns:
        [B, L, N, H] in q's dtype. A query that sees no key at all (possible only when
        L > S) gives zeros, where the reference averages every value.
    """
    b, q_len, n, h = q.shape
    k_len, kv = k.shape[1], k.shape[2]
    if n % kv:
        raise ValueError(f"{kv} kv heads do not divide {n} query heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None and q_len != k_len:
        raise ValueError("segment_ids need equal query and key lengths")
    backend = jax.default_backend()
    interpret = backend not in ("gpu", "tpu") if interpret is None else interpret
    blocks = BlockSizes.default(backend) if block_sizes is None else block_sizes
    triton = backend == "gpu" and not interpret
    minimum = MIN_BLOCK_GPU if triton else 1
    bq, bq_bwd = _fit(blocks.q, q_len, minimum), _fit(blocks.q_bwd, q_len, minimum)
    bk, bk_bwd = _fit(blocks.k, k_len, minimum), _fit(blocks.k_bwd, k_len, minimum)
    # Blocks are powers of two, so the larger of each pair is a multiple of the other.
    q_pad = pl.cdiv(q_len, max(bq, bq_bwd)) * max(bq, bq_bwd)
    k_pad = pl.cdiv(k_len, max(bk, bk_bwd)) * max(bk, bk_bwd)
    # Triton tiles must be powers of two, and matmul dims >= 16: pad the head dim with
    # zeros (q.k and the kept output columns do not change).
    h_pad = max(pl.next_power_of_2(h), MIN_BLOCK_GPU) if triton else h
    mask = MaskSpec(
        causal=causal,
        window=window,
        offset=k_len - q_len,
        kv_len=k_len if k_pad > k_len else None,
        segments=segment_ids is not None,
    )
    st = _Static(
        mask=mask,
        scale=float(h**-0.5 if scale is None else scale),
        groups=n // kv,
        bq=bq,
        bk=bk,
        bq_bwd=bq_bwd,
        bk_bwd=bk_bwd,
        backend=backend,
        interpret=bool(interpret),
    )

    def heads_major(x, length):  # [B, T, heads, H] -> [B, heads, T_pad, H_pad]
        return _pad(_pad(x.transpose(0, 2, 1, 3), 2, length), 3, h_pad)

    q_seg = k_seg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        q_seg = _pad(seg, 1, q_pad)[:, :, None]  # [B, L_pad, 1]
        k_seg = _pad(seg, 1, k_pad)[:, None, :]  # [B, 1, S_pad]
    out = _flash(
        st, heads_major(q, q_pad), heads_major(k, k_pad), heads_major(v, k_pad), q_seg, k_seg
    )
    return out[:, :, :q_len, :h].transpose(0, 2, 1, 3)


__all__ = ["BlockSizes", "flash_attention"]
