"""On-chip memory the flash-attention tiles need, computed from the block shapes.

Lowering for another platform (``jax.export`` with ``platforms=["tpu"]`` or ``["cuda"]``)
proves a kernel reaches Mosaic or Triton, not that the device compiler will fit it in
on-chip memory: that happens only on the device. So each kernel's footprint is computed
here from its block shapes and checked against the chip's budget before lowering.

TPU (VMEM): every input and output block is double-buffered by the Pallas pipeline, and
scratch accumulators live for the whole kernel. A block occupies whole (8 x packing, 128)
tiles of (sublanes, lanes), so a [bq, 1] column of row statistics takes bq x 128 words.
The score-sized float32 temporaries ([bq, bk]: scores, probabilities, their gradient)
are counted too, as an estimate of what Mosaic keeps in VMEM beyond the 64 vector
registers. The budget is the smallest VMEM per TensorCore among the TPU generations
targeted, read from JAX's own table (``pltpu.get_tpu_info_for_chip``, which needs no TPU):
16 MiB (v4); v5p and v7x have 64 MiB, v5e and v6e 128 MiB. The kernels request it as
their scoped limit (``vmem_limit_bytes``).

GPU (shared memory): Triton stages every operand it loads for a matmul through shared
memory, and software-pipelines the loads inside a loop ``num_stages`` deep, one buffer
per stage; operands transposed in registers (P^T and dS^T in the dK/dV kernel) also pass
through it. That is a model of Triton's allocation, not a measurement: it omits the
small layout-conversion scratch. An H100 has 228 KiB of shared memory per SM, of which
one thread block may use at most 227 KiB (NVIDIA Hopper Tuning Guide, section on the
L1 cache and shared memory).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.experimental.pallas import tpu as pltpu

KiB = 1024
MiB = 1024 * KiB

TPU_CHIPS = (
    pltpu.ChipVersion.TPU_V4,
    pltpu.ChipVersion.TPU_V5E,
    pltpu.ChipVersion.TPU_V5P,
    pltpu.ChipVersion.TPU_V6E,
    pltpu.ChipVersion.TPU_7X,
)
VMEM_BUDGET = min(pltpu.get_tpu_info_for_chip(c, 1).vmem_capacity_bytes for c in TPU_CHIPS)
H100_SMEM_PER_BLOCK = 227 * KiB
LANES, SUBLANES = 128, 8


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def vmem_bytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes a VMEM buffer of ``shape`` takes: its last two dims padded to whole
    (8 x packing, 128) tiles, packing = 4 // itemsize (2 for bfloat16)."""
    itemsize = np.dtype(dtype).itemsize
    *lead, rows, cols = (1, *shape) if len(shape) == 1 else shape
    sublanes = SUBLANES * max(4 // itemsize, 1)
    return math.prod(lead) * _round_up(rows, sublanes) * _round_up(cols, LANES) * itemsize


@dataclasses.dataclass(frozen=True)
class VmemPlan:
    """The VMEM one TPU kernel needs, in bytes."""

    name: str
    blocks: int  # input and output blocks, double-buffered
    scratch: int  # accumulators that persist across the grid's "arbitrary" axis
    temporaries: int  # [bq, bk] float32 intermediates (an estimate)

    @property
    def total(self) -> int:
        return self.blocks + self.scratch + self.temporaries

    def check(self, budget: int = VMEM_BUDGET) -> VmemPlan:
        """Returns self; raises ValueError when the total exceeds ``budget``."""
        if self.total > budget:
            raise ValueError(
                f"{self.name}: blocks need {self.total / MiB:.1f} MiB of VMEM "
                f"({self.blocks / MiB:.1f} buffers, {self.scratch / MiB:.1f} scratch, "
                f"{self.temporaries / MiB:.1f} temporaries), over the {budget / MiB:.0f} MiB "
                "budget; use smaller BlockSizes"
            )
        return self


def vmem_plan(name: str, blocks, scratch, temporaries: int) -> VmemPlan:
    """The plan of a kernel whose pipelined blocks and scratch buffers are given as
    (shape, dtype) pairs."""
    return VmemPlan(
        name=name,
        blocks=2 * sum(vmem_bytes(s, d) for s, d in blocks),
        scratch=sum(vmem_bytes(s, d) for s, d in scratch),
        temporaries=temporaries,
    )


def triton_smem_bytes(kernel: str, bq: int, bk: int, h: int, itemsize: int, stages: int) -> int:
    """Shared memory of one program of the GPU kernels (:mod:`flash_loop`), in bytes.

    Args:
        kernel: "fwd", "dq" or "dkdv".
        bq, bk: the kernel's query and key block rows.
        h: head dim as the kernel sees it (padded to a power of two >= 16).
        itemsize: bytes per element of q, k, v.
        stages: Triton's ``num_stages``.
    """
    q_tile, k_tile = bq * h * itemsize, bk * h * itemsize
    if kernel == "fwd":  # streams K, V; Q resident
        return stages * 2 * k_tile + q_tile
    if kernel == "dq":  # streams K, V; Q, dO resident
        return stages * 2 * k_tile + 2 * q_tile
    if kernel == "dkdv":  # streams Q, dO (+ f32 lse, delta); K, V resident; P^T, dS^T
        return stages * (2 * q_tile + 2 * bq * 4) + 2 * k_tile + 2 * bq * bk * itemsize
    raise ValueError(f"unknown kernel {kernel!r}")
