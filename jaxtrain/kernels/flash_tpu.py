"""FlashAttention-2 kernels tiled through the grid: the TPU (Mosaic) family.

Every operand reaches a kernel one block at a time. The grid ends in an "arbitrary"
(sequential) axis over the blocks a kernel reduces over: key blocks for the forward and
dQ kernels, (query head of the group, query block) for the dK/dV kernel. Pallas' TPU
pipeline double-buffers one block per operand in VMEM, and the partial results (running
max, normaliser and output; dQ; dK and dV) live in VMEM scratch across that axis and are
written out on its last step. VMEM thus holds O(block) per operand whatever the sequence
length; :mod:`jaxtrain.kernels.flash_budget` computes how much and checks it.

A step whose block the mask hides (causal, window) skips its compute with ``pl.when``,
and its index map clamps the block index into the visible range, so the step asks for
the block a neighbouring step uses. The pipeline copies a block only when its index
changes between consecutive steps, so a hidden block is never fetched.

Layout (Mosaic tiles the last two block dims in (8, 128)): blocks are [rows, H] with H
whole; row statistics are [rows, 1] columns; query segment ids are a [rows, 1] column
and key segment ids a [1, bk] row, so key blocks are multiples of 128 (or the whole
padded length). A [rows, 1] column fills whole 128-lane tiles, in VMEM (counted by the
budget) and, when XLA tiles it so, in HBM: JAX's own TPU flash kernel pays the same for
its 128-lane row statistics; lane-major rows (as in its splash kernel) would avoid it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxtrain.kernels.flash_budget import VMEM_BUDGET, VmemPlan, vmem_plan
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

MIN_BLOCK_Q = 16  # sublane tiling of bfloat16 (8 rows x 2 packed)
MIN_BLOCK_K = 128  # key segment ids put keys on the 128 lanes


def clamp(j, lo, hi, n: int):
    """Block index ``j`` moved into the visible range [lo, hi) and into [0, n)."""
    j = jnp.minimum(jnp.maximum(j, lo), hi - 1)
    return jnp.minimum(jnp.maximum(j, 0), n - 1)


def _block(spec: pl.BlockSpec) -> tuple[int, ...]:
    return tuple(d for d in spec.block_shape if d is not None)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One pallas_call, described before it runs so its VMEM plan can be read."""

    name: str
    kernel: Callable
    grid: tuple[int, ...]
    in_specs: list[pl.BlockSpec]
    out_specs: list[pl.BlockSpec]
    out_shape: list[jax.ShapeDtypeStruct]
    scratch: list
    temporaries: int  # bytes of [bq, bk] float32 intermediates (an estimate)
    sequential: int = 1  # trailing grid axes that carry the scratch ("arbitrary")

    def plan(self, args) -> VmemPlan:
        pairs = [*zip(self.in_specs, args, strict=True)]
        pairs += zip(self.out_specs, self.out_shape, strict=True)
        blocks = [(_block(spec), x.dtype) for spec, x in pairs]
        scratch = [(s.shape, s.dtype) for s in self.scratch]
        return vmem_plan(self.name, blocks, scratch, self.temporaries)

    def __call__(self, st: KernelSpec, *args):
        self.plan(args).check()
        parallel = len(self.grid) - self.sequential
        semantics = ("parallel",) * parallel + ("arbitrary",) * self.sequential
        return pl.pallas_call(
            self.kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=0,
                grid=self.grid,
                in_specs=self.in_specs,
                out_specs=self.out_specs,
                scratch_shapes=self.scratch,
            ),
            out_shape=self.out_shape,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=semantics, vmem_limit_bytes=VMEM_BUDGET
            ),
            interpret=pltpu.InterpretParams() if st.interpret else False,
            name=self.name,
        )(*args)


def _split(refs, n_in: int, segments: bool):
    """(inputs, q_seg ref, k_seg ref, outputs and scratch)."""
    ins, rest = refs[:n_in], refs[n_in:]
    if segments:
        return ins, rest[0], rest[1], rest[2:]
    return ins, None, None, rest


def _tile(st: KernelSpec, q_start, bq: int, k_start, bk: int, qs_ref, ks_ref) -> Tile:
    return Tile(
        positions(q_start + st.mask.offset, bq, 0),
        positions(k_start, bk, 1),
        None if qs_ref is None else qs_ref[...],
        None if ks_ref is None else ks_ref[...],
    )


# --- forward ------------------------------------------------------------------------


def _fwd_kernel(*refs, st: KernelSpec, nk: int):
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, rest = _split(refs, 3, st.mask.segments)
    o_ref, lse_ref, acc_ref, m_ref, l_ref = rest
    bq, bk = st.bq, st.bk
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...], m_ref[...], l_ref[...] = initial_state(bq, acc_ref.shape[1])

    lo, hi = st.mask.key_blocks(i * bq, bq, bk, nk)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        tile = _tile(st, i * bq, bq, j * bk, bk, qs_ref, ks_ref)
        state = (acc_ref[...], m_ref[...], l_ref[...])
        acc_ref[...], m_ref[...], l_ref[...] = attend(
            st, tile, q_ref[...], k_ref[...], v_ref[...], *state
        )

    @pl.when(j == nk - 1)
    def _finish():
        out, lse = finish(acc_ref[...], m_ref[...], l_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _visited(blocks, own: int, other: int, n: int):
    """Index map helper: the block of the other side (of ``other`` rows, ``n`` of them)
    that step j of own block i fetches, clamped to the blocks the mask lets it see
    (``blocks(start, own, other, n) -> (lo, hi)``)."""

    def index(i, j):
        lo, hi = blocks(i * own, own, other, n)
        return clamp(j, lo, hi, n)

    return index


def key_block(st: KernelSpec, bq: int, bk: int, nk: int):
    """Index map helper: the key block a (query block i, step j) fetches."""
    return _visited(st.mask.key_blocks, bq, bk, nk)


def _forward_call(st: KernelSpec, q, k) -> _Call:
    b, n, length, h = q.shape
    bq, bk, g = st.bq, st.bk, st.groups
    nq, nk = length // bq, k.shape[2] // bk
    kb = key_block(st, bq, bk, nk)
    rows = pl.BlockSpec((None, None, bq, h), lambda b, n, i, j: (b, n, i, 0))
    stats = pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j: (b, n, i, 0))
    keys = pl.BlockSpec((None, None, bk, h), lambda b, n, i, j: (b, lax.div(n, g), kb(i, j), 0))
    in_specs = [rows, keys, keys]
    if st.mask.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, n, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, n, i, j: (b, 0, kb(i, j))),
        ]
    return _Call(
        name="flash_attention_fwd",
        kernel=functools.partial(_fwd_kernel, st=st, nk=nk),
        grid=(b, n, nq, nk),
        in_specs=in_specs,
        out_specs=[rows, stats],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, length, 1), jnp.float32),
        ],
        scratch=[
            pltpu.VMEM((bq, h), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
        ],
        temporaries=(2 * bq * bk + bq * h) * 4,  # scores, probabilities; P @ V
    )


def forward(st: KernelSpec, q, k, v, q_seg, k_seg):
    """(out [B, N, L, H], lse [B, N, L, 1] float32) on padded heads-major inputs."""
    segs = [q_seg, k_seg] if st.mask.segments else []
    return _forward_call(st, q, k)(st, q, k, v, *segs)


# --- backward -----------------------------------------------------------------------


def _dq_kernel(*refs, st: KernelSpec, nk: int):
    ins, qs_ref, ks_ref, (dq_ref, acc_ref) = _split(refs, 6, st.mask.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = st.bq_bwd, st.bk_bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = st.mask.key_blocks(i * bq, bq, bk, nk)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        tile = _tile(st, i * bq, bq, j * bk, bk, qs_ref, ks_ref)
        operands = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref)
        acc_ref[...] += dq_step(st, tile, *(r[...] for r in operands))

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * st.scale).astype(dq_ref.dtype)


def _dq_call(st: KernelSpec, q, k) -> _Call:
    b, n, length, h = q.shape
    bq, bk, g = st.bq_bwd, st.bk_bwd, st.groups
    nq, nk = length // bq, k.shape[2] // bk
    kb = key_block(st, bq, bk, nk)
    rows = pl.BlockSpec((None, None, bq, h), lambda b, n, i, j: (b, n, i, 0))
    stats = pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j: (b, n, i, 0))
    keys = pl.BlockSpec((None, None, bk, h), lambda b, n, i, j: (b, lax.div(n, g), kb(i, j), 0))
    in_specs = [rows, keys, keys, rows, stats, stats]
    if st.mask.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, n, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, n, i, j: (b, 0, kb(i, j))),
        ]
    return _Call(
        name="flash_attention_dq",
        kernel=functools.partial(_dq_kernel, st=st, nk=nk),
        grid=(b, n, nq, nk),
        in_specs=in_specs,
        out_specs=[rows],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        scratch=[pltpu.VMEM((bq, h), jnp.float32)],
        temporaries=(3 * bq * bk + bq * h) * 4,  # P, dP, dS; dS @ K
    )


def _dkdv_kernel(*refs, st: KernelSpec, nq: int):
    ins, qs_ref, ks_ref, rest = _split(refs, 6, st.mask.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    dk_ref, dv_ref, dk_acc, dv_acc = rest
    bq, bk = st.bq_bwd, st.bk_bwd
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    lo, hi = st.mask.query_blocks(j * bk, bk, bq, nq)

    @pl.when((i >= lo) & (i < hi))
    def _step():
        tile = _tile(st, i * bq, bq, j * bk, bk, qs_ref, ks_ref)
        operands = (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref)
        dk, dv = dkdv_step(st, tile, *(r[...] for r in operands))
        dk_acc[...] += dk
        dv_acc[...] += dv

    @pl.when((g == st.groups - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def query_block(st: KernelSpec, bq: int, bk: int, nq: int):
    """Index map helper: the query block a (key block j, step i) fetches."""
    return _visited(st.mask.query_blocks, bk, bq, nq)


def _dkdv_call(st: KernelSpec, q, k) -> _Call:
    b, _, length, h = q.shape
    kv, s_len = k.shape[1], k.shape[2]
    bq, bk, groups = st.bq_bwd, st.bk_bwd, st.groups
    nq, nk = length // bq, s_len // bk
    qb = query_block(st, bq, bk, nq)

    # Grid (b, kv head c, key block j, head of group g, query block i).
    def row_index(b, c, j, g, i):
        return b, c * groups + g, qb(j, i), 0

    rows = pl.BlockSpec((None, None, bq, h), row_index)
    stats = pl.BlockSpec((None, None, bq, 1), row_index)
    cols = pl.BlockSpec((None, None, bk, h), lambda b, c, j, g, i: (b, c, j, 0))
    in_specs = [rows, cols, cols, rows, stats, stats]
    if st.mask.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, c, j, g, i: (b, qb(j, i), 0)),
            pl.BlockSpec((None, 1, bk), lambda b, c, j, g, i: (b, 0, j)),
        ]
    return _Call(
        name="flash_attention_dkdv",
        kernel=functools.partial(_dkdv_kernel, st=st, nq=nq),
        grid=(b, kv, nk, groups, nq),
        in_specs=in_specs,
        out_specs=[cols, cols],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        scratch=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
        temporaries=(3 * bq * bk + 2 * bk * h) * 4,  # P, dP, dS; P^T @ dO, dS^T @ Q
        sequential=2,
    )


def backward(st: KernelSpec, q, k, v, q_seg, k_seg, lse, delta, do):
    """(dq, dk, dv) on padded heads-major inputs; ``delta`` [B, N, L, 1] = rowsum(dO * O)."""
    segs = [q_seg, k_seg] if st.mask.segments else []
    dq = _dq_call(st, q, k)(st, q, k, v, do, lse, delta, *segs)[0]
    dk, dv = _dkdv_call(st, q, k)(st, q, k, v, do, lse, delta, *segs)
    return dq, dk, dv


def vmem_plans(st: KernelSpec, q, k) -> list[VmemPlan]:
    """The VMEM plans of the three kernels on padded heads-major ``q`` [B, N, L, H] and
    ``k`` [B, K, S, H] (arrays or ShapeDtypeStructs), in the order fwd, dq, dkdv."""
    b, n, length, h = q.shape
    row_stats = jax.ShapeDtypeStruct((b, n, length, 1), jnp.float32)
    segs = []
    if st.mask.segments:
        q_seg = jax.ShapeDtypeStruct((b, length, 1), jnp.int32)
        segs = [q_seg, jax.ShapeDtypeStruct((b, 1, k.shape[2]), jnp.int32)]
    bwd_args = (q, k, k, q, row_stats, row_stats, *segs)
    return [
        _forward_call(st, q, k).plan((q, k, k, *segs)),
        _dq_call(st, q, k).plan(bwd_args),
        _dkdv_call(st, q, k).plan(bwd_args),
    ]
