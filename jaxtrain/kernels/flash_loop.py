"""FlashAttention-2 kernels that stream blocks with an in-kernel loop: the GPU (Triton)
family, also the one interpreted on CPU.

Each program owns one output block and keeps the operand it streams addressable whole:
one head's K/V for the forward and dQ kernels (one program per query block), one
group's Q/dO for the dK/dV kernel (one program per key block, looping over the G query
heads of its kv head and their query blocks, so grouped-query attention never repeats K
or V). On GPU those operands are pointers into HBM and the loop's loads are pipelined
through shared memory by Triton (``num_stages``). The loop visits only the blocks the
mask leaves visible (causal, window: :meth:`MaskSpec.key_blocks`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxtrain.kernels.flash_tile import (
    KernelSpec,
    Tile,
    attend,
    dkdv_step,
    dq_step,
    finish,
    initial_state,
    positions,
)

NUM_STAGES = 2  # Triton software-pipelining depth of the loop's loads


def num_warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


def _params(st: KernelSpec, head_dim: int):
    if st.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps(head_dim), num_stages=NUM_STAGES)


def _split(refs, n_in: int, segments: bool):
    """(inputs, q_seg ref, k_seg ref, outputs): the segment refs follow the inputs."""
    ins, rest = refs[:n_in], refs[n_in:]
    if segments:
        return ins, rest[0], rest[1], rest[2:]
    return ins, None, None, rest


# --- forward ------------------------------------------------------------------------


def _fwd_kernel(*refs, st: KernelSpec):
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split(refs, 3, st.mask.segments)
    bq, bk = st.bq, st.bk
    q_start = pl.program_id(2) * bq
    q = q_ref[...]  # [bq, H]
    q_pos = positions(q_start + st.mask.offset, bq, 0)
    q_seg = None if qs_ref is None else qs_ref[...]  # [bq, 1]

    def body(j, carry):
        start = pl.multiple_of(j * bk, bk)
        k_seg = None if ks_ref is None else ks_ref[:, pl.ds(start, bk)]  # [1, bk]
        tile = Tile(q_pos, positions(start, bk, 1), q_seg, k_seg)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]  # [bk, H]
        return attend(st, tile, q, k, v, *carry)

    lo, hi = st.mask.key_blocks(q_start, bq, bk, k_ref.shape[0] // bk)
    out, lse = finish(*lax.fori_loop(lo, hi, body, initial_state(bq, q.shape[1])))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward(st: KernelSpec, q, k, v, q_seg, k_seg):
    """(out [B, N, L, H], lse [B, N, L, 1] float32) on padded heads-major inputs."""
    b, n, length, h = q.shape
    s_len = k.shape[2]
    g = st.groups
    grid = (b, n, length // st.bq)
    q_spec = pl.BlockSpec((None, None, st.bq, h), lambda b, n, i: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, s_len, h), lambda b, n, i: (b, lax.div(n, g), 0, 0))
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
        compiler_params=_params(st, h),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(*args)


# --- backward -----------------------------------------------------------------------


def _dq_kernel(*refs, st: KernelSpec):
    ins, qs_ref, ks_ref, (dq_ref,) = _split(refs, 6, st.mask.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = st.bq_bwd, st.bk_bwd
    q_start = pl.program_id(2) * bq
    q, do = q_ref[...], do_ref[...]  # [bq, H]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_pos = positions(q_start + st.mask.offset, bq, 0)
    q_seg = None if qs_ref is None else qs_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k_seg = None if ks_ref is None else ks_ref[:, pl.ds(start, bk)]
        tile = Tile(q_pos, positions(start, bk, 1), q_seg, k_seg)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        return dq + dq_step(st, tile, q, k, v, do, lse, delta)

    lo, hi = st.mask.key_blocks(q_start, bq, bk, k_ref.shape[0] // bk)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, st: KernelSpec):
    ins, qs_ref, ks_ref, (dk_ref, dv_ref) = _split(refs, 6, st.mask.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = st.bq_bwd, st.bk_bwd
    k_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    k_pos = positions(k_start, bk, 1)
    k_seg = None if ks_ref is None else ks_ref[...]  # [1, bk]

    def body(i, carry, g):
        start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(start, bq)
        q_seg = None if qs_ref is None else qs_ref[rows, :]
        tile = Tile(positions(start + st.mask.offset, bq, 0), k_pos, q_seg, k_seg)
        q, do = q_ref[g, rows, :], do_ref[g, rows, :]  # [bq, H]
        lse, delta = lse_ref[g, rows, :], delta_ref[g, rows, :]  # [bq, 1]
        dk, dv = dkdv_step(st, tile, q, k, v, do, lse, delta)
        return carry[0] + dk, carry[1] + dv

    lo, hi = st.mask.query_blocks(k_start, bk, bq, q_ref.shape[1] // bq)

    def group(g, carry):
        return lax.fori_loop(lo, hi, functools.partial(body, g=g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, st.groups, group, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(st: KernelSpec, q, k, v, q_seg, k_seg, lse, delta, do):
    """(dq, dk, dv) on padded heads-major inputs; ``delta`` [B, N, L, 1] = rowsum(dO * O)."""
    b, n, length, h = q.shape
    kv, s_len = k.shape[1], k.shape[2]
    g = st.groups
    segments = st.mask.segments

    # dQ: one program per (batch, query head, query block), looping over key blocks.
    grid = (b, n, length // st.bq_bwd)
    rows = pl.BlockSpec((None, None, st.bq_bwd, h), lambda b, n, i: (b, n, i, 0))
    row_stats = pl.BlockSpec((None, None, st.bq_bwd, 1), lambda b, n, i: (b, n, i, 0))
    kv_all = pl.BlockSpec((None, None, s_len, h), lambda b, n, i: (b, lax.div(n, g), 0, 0))
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
        compiler_params=_params(st, h),
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
        compiler_params=_params(st, h),
        interpret=st.interpret,
        name="flash_attention_dkdv",
    )(*args)
    return dq, dk, dv
