"""FlashAttention-2 (Dao, 2023) in Pallas: forward and backward kernels under one
``jax.custom_vjp``.

The forward pass walks the key blocks of each query block with an online softmax
(Milakov & Gimelshein, 2018), keeping a running max, normaliser and output accumulator in
float32, so the L x S score matrix never exists in memory; it saves only the output and
the per-row log-sum-exp. The backward pass recomputes the probabilities block by block
from that log-sum-exp: one kernel accumulates dQ over key blocks, another accumulates dK
and dV over query blocks and over the query heads of its kv-head group, so grouped- and
multi-query attention (Ainslie et al., 2023) never repeat K or V. The math on one tile
is :mod:`jaxtrain.kernels.flash_tile`; the mask and the blocks it leaves visible are
:mod:`jaxtrain.kernels.flash_mask`.

Two kernel families carry the tiles, one per compiler:

- GPU (Triton), :mod:`jaxtrain.kernels.flash_loop`: each program streams the blocks it
  reduces over with an in-kernel loop from operands left in HBM, which Triton pipelines
  through shared memory.
- TPU (Mosaic), :mod:`jaxtrain.kernels.flash_tpu`: the blocks a kernel reduces over are a
  sequential grid axis, one block per operand double-buffered in VMEM and the partial
  results in VMEM scratch, so VMEM use does not grow with the sequence length.

On CPU either family runs in Pallas interpret mode (slow, for testing); the GPU family
by default. Both lower without the hardware (``jax.export`` with ``platforms=["cuda"]``
or ``["tpu"]``; tests/test_kernel_lowering.py), and :mod:`jaxtrain.kernels.flash_budget`
checks their on-chip memory from the block shapes, since the device compile that would
find an overflow is not run here. The kernels work on a heads-major [B, N, L, H] layout
that both compilers tile; :func:`flash_attention` transposes and zero-pads around them.

Shapes: B batch, L query length, S key length, N query heads, K kv heads, G = N / K,
H head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxtrain.kernels import flash_loop, flash_tpu
from jaxtrain.kernels.flash_budget import H100_SMEM_PER_BLOCK, triton_smem_bytes
from jaxtrain.kernels.flash_mask import MaskSpec
from jaxtrain.kernels.flash_tile import KernelSpec

MIN_BLOCK_GPU = 16  # Triton's tl.dot needs every matmul dimension >= 16
PLATFORMS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes, powers of two: ``q`` x ``k`` per forward step, ``q_bwd`` x ``k_bwd``
    per backward step. Each is clamped to the (padded) sequence length."""

    q: int = 128
    k: int = 128
    q_bwd: int = 128
    k_bwd: int = 64

    @classmethod
    def default(cls, backend: str, head_dim: int = 128, dtype=jnp.bfloat16) -> BlockSizes:
        """Defaults per backend.

        TPU: 128 everywhere, the lane width and the default of JAX's own Pallas TPU flash
        and splash attention kernels. GPU: 128 x 128 forward and 128 x 64 backward (dK
        and dV accumulate in registers), each kernel's larger block halved (the key block
        on a tie) until its shared memory (:func:`flash_budget.triton_smem_bytes`) fits
        an H100's 227 KiB per thread block; at bfloat16 and head dim 256 that takes the
        forward to 128 x 64 and the backward to 64 x 64. On an H200 at head dim 128 the
        128 x 64 backward ran forward + backward 1.45x faster than 64 x 64, the best of
        five block shapes tried (``benchmarks/RESULTS.md``).
        """
        if backend == "tpu":
            return cls(q=128, k=128, q_bwd=128, k_bwd=128)
        h = max(pl.next_power_of_2(head_dim), MIN_BLOCK_GPU)
        size = np.dtype(dtype).itemsize

        def fit(kernel: str, bq: int, bk: int) -> tuple[int, int]:
            while (
                triton_smem_bytes(kernel, bq, bk, h, size, flash_loop.NUM_STAGES)
                > H100_SMEM_PER_BLOCK
                and max(bq, bk) > MIN_BLOCK_GPU
            ):
                bq, bk = (bq, bk // 2) if bk >= bq else (bq // 2, bk)
            return bq, bk

        q, k = fit("fwd", 128, 128)
        q_dq, k_dq = fit("dq", 128, 64)
        q_dkdv, k_dkdv = fit("dkdv", 128, 64)
        return cls(q=q, k=k, q_bwd=min(q_dq, q_dkdv), k_bwd=min(k_dq, k_dkdv))

    def __post_init__(self) -> None:
        for name in ("q", "k", "q_bwd", "k_bwd"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name}={size} must be a power of two")


def _kernels(st: KernelSpec):
    return flash_tpu if st.platform == "tpu" else flash_loop


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: KernelSpec, q, k, v, q_seg, k_seg):
    """(out [B, N, L, H], log-sum-exp [B, N, L, 1] float32); differentiable in both."""
    return _kernels(st).forward(st, q, k, v, q_seg, k_seg)


def _flash_fwd(st: KernelSpec, q, k, v, q_seg, k_seg):
    out, lse = _kernels(st).forward(st, q, k, v, q_seg, k_seg)
    return (out, lse), (q, k, v, q_seg, k_seg, out, lse)


def _flash_bwd(st: KernelSpec, residuals, cotangents):
    q, k, v, q_seg, k_seg, out, lse = residuals
    do, dlse = cotangents
    # delta_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij: the softmax-backward row term. A
    # cotangent on the log-sum-exp adds dlse_i * P_ij to dS_ij = P_ij (dP_ij - delta_i),
    # since d lse_i / d s_ij = P_ij: the same kernels with delta_i - dlse_i.
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    delta = delta - dlse
    dq, dk, dv = _kernels(st).backward(st, q, k, v, q_seg, k_seg, lse, delta, do)
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


@dataclasses.dataclass(frozen=True)
class Plan:
    """A call's kernel specialisation and padded sizes (queries, keys, head dim)."""

    spec: KernelSpec
    q_pad: int
    k_pad: int
    h_pad: int


def plan(
    q,
    k,
    *,
    segments: bool = False,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
) -> Plan:
    """The :class:`Plan` :func:`flash_attention` runs for ``q`` [B, L, N, H] and ``k``
    [B, S, K, H] (arrays or ShapeDtypeStructs); the other arguments are its own."""
    b, q_len, n, h = q.shape
    k_len, kv = k.shape[1], k.shape[2]
    backend = jax.default_backend()
    if platform is None:
        platform = backend if backend in PLATFORMS else "gpu"
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    interpret = backend not in PLATFORMS if interpret is None else bool(interpret)
    if block_sizes is None:
        block_sizes = BlockSizes.default(platform, h, q.dtype)
    triton = platform == "gpu" and not interpret
    if platform == "tpu":  # Mosaic's (8, 128) tiling; in interpret mode too, to match
        min_q, min_k = flash_tpu.MIN_BLOCK_Q, flash_tpu.MIN_BLOCK_K
    else:
        min_q = min_k = MIN_BLOCK_GPU if triton else 1
    bq, bq_bwd = _fit(block_sizes.q, q_len, min_q), _fit(block_sizes.q_bwd, q_len, min_q)
    bk, bk_bwd = _fit(block_sizes.k, k_len, min_k), _fit(block_sizes.k_bwd, k_len, min_k)
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
        segments=segments,
    )
    spec = KernelSpec(
        mask=mask,
        scale=float(h**-0.5 if scale is None else scale),
        groups=n // kv,
        bq=bq,
        bk=bk,
        bq_bwd=bq_bwd,
        bk_bwd=bk_bwd,
        platform=platform,
        interpret=interpret,
    )
    return Plan(spec=spec, q_pad=q_pad, k_pad=k_pad, h_pad=h_pad)


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
    platform: str | None = None,
    interpret: bool | None = None,
    kv_segment_ids: jax.Array | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """FlashAttention-2 with the contract of ``jaxtrain.kernels.xla_attention``.

    Args:
        q: [B, L, N, H] queries, float32 or bfloat16.
        k: [B, S, K, H] keys, K dividing N.
        v: [B, S, K, H] values.
        segment_ids: optional [B, L] ints (L == S); tokens attend only within a segment.
        causal: mask keys after each query (query i sits at key position i + S - L).
        window: sliding window: keys fewer than ``window`` positions away, or ``None``.
        scale: softmax scale; default 1 / sqrt(H).
        block_sizes: tile sizes; default :meth:`BlockSizes.default` for the platform.
        platform: kernel family, "gpu" (Triton) or "tpu" (Mosaic); default the backend
            JAX runs on, and "gpu" on CPU.
        interpret: run in Pallas interpret mode; default on when not on GPU or TPU.
        kv_segment_ids: optional [B, S] segment ids of the keys, when they are not the
            queries' (a block of another part of the sequence, as in ring attention);
            needs ``segment_ids``.
        return_lse: also return each query's log-sum-exp of its scaled scores, so that
            partial results over separate key blocks can be combined (and differentiated).

    Returns:
        [B, L, N, H] in q's dtype; with ``return_lse`` also the log-sum-exp [B, L, N]
        float32. A query that sees no key at all (possible only when L > S, or with
        ``kv_segment_ids``) gives zeros, where the reference averages every value, and a
        log-sum-exp of about -2.4e38.

    Raises:
        ValueError: for mismatched shapes or dtypes, an unknown platform, or TPU blocks
            whose VMEM footprint exceeds the budget of :mod:`flash_budget`.
    """
    b, q_len, n, h = q.shape
    k_len, kv = k.shape[1], k.shape[2]
    if n % kv:
        raise ValueError(f"{kv} kv heads do not divide {n} query heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids need segment_ids for the queries")
    if segment_ids is not None and kv_segment_ids is None and q_len != k_len:
        raise ValueError("segment_ids need equal query and key lengths (or kv_segment_ids)")
    p = plan(
        q,
        k,
        segments=segment_ids is not None,
        causal=causal,
        window=window,
        scale=scale,
        block_sizes=block_sizes,
        platform=platform,
        interpret=interpret,
    )

    def heads_major(x, length):  # [B, T, heads, H] -> [B, heads, T_pad, H_pad]
        return _pad(_pad(x.transpose(0, 2, 1, 3), 2, length), 3, p.h_pad)

    q_seg = k_seg = None
    if segment_ids is not None:
        keys = segment_ids if kv_segment_ids is None else kv_segment_ids
        q_seg = _pad(segment_ids.astype(jnp.int32), 1, p.q_pad)[:, :, None]  # [B, L_pad, 1]
        k_seg = _pad(keys.astype(jnp.int32), 1, p.k_pad)[:, None, :]  # [B, 1, S_pad]
    out, lse = _flash(
        p.spec,
        heads_major(q, p.q_pad),
        heads_major(k, p.k_pad),
        heads_major(v, p.k_pad),
        q_seg,
        k_seg,
    )
    out = out[:, :, :q_len, :h].transpose(0, 2, 1, 3)
    return (out, lse[:, :, :q_len, 0].transpose(0, 2, 1)) if return_lse else out


__all__ = ["BlockSizes", "Plan", "flash_attention", "plan"]
