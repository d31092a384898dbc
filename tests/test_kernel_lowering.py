"""The flash-attention kernels reach both device compilers from this CPU machine, at real
shapes, and fit the chips' on-chip memory.

``jax.export`` with ``platforms=["cuda"]`` lowers Pallas to Triton (through jaxlib's
Triton bindings) and with ``["tpu"]`` to Mosaic, allocating nothing (ShapeDtypeStruct
inputs), so a kernel that cannot lower fails here rather than on a cluster. The device
compile that follows is not run, so the VMEM (TPU) and shared-memory (GPU) footprints are
computed from the block shapes (:mod:`jaxtrain.kernels.flash_budget`) and asserted.
Triton kernels lower to the ``__gpu$xla.gpu.triton`` custom call, which JAX's export does
not promise to keep stable across versions; the test disables that serialisation check
only, which does not touch lowering.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.kernels import flash_attention, flash_tpu
from jaxtrain.kernels.flash import BlockSizes, plan
from jaxtrain.kernels.flash_budget import (
    H100_SMEM_PER_BLOCK,
    VMEM_BUDGET,
    KiB,
    MiB,
    triton_smem_bytes,
)
from jaxtrain.kernels.flash_loop import NUM_STAGES

TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkdv")

# (head dim, length, heads, kv heads, segments, window, causal, dtype): MHA, GQA, MQA;
# packed documents; a causal and a bidirectional sliding window; 8k to 128k tokens.
CASES = [
    (64, 8192, 8, 8, False, None, True, "bfloat16"),
    (128, 32768, 16, 4, True, None, True, "bfloat16"),
    (128, 16384, 8, 2, False, 1024, False, "float32"),
    (256, 131072, 8, 1, True, 4096, True, "bfloat16"),
]


def case_id(case):
    h, length, n, kv, seg, window, causal, dtype = case
    parts = [f"h{h}", f"{length // 1024}k", f"n{n}k{kv}", "causal" if causal else "bidir"]
    parts += ["seg"] * seg + [f"win{window}"] * (window is not None) + [dtype]
    return "-".join(parts)


def abstract_inputs(case):
    h, length, n, kv, seg, _, _, dtype = case
    q = jax.ShapeDtypeStruct((1, length, n, h), jnp.dtype(dtype))
    k = jax.ShapeDtypeStruct((1, length, kv, h), jnp.dtype(dtype))
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32) if seg else None
    return q, k, ids


def export(case, platform: str) -> str:
    """The StableHLO text of forward + backward (a vjp) lowered for ``platform``."""
    _, _, _, _, _, window, causal, _ = case
    q, k, ids = abstract_inputs(case)
    family = "gpu" if platform == "cuda" else "tpu"

    options = dict(causal=causal, window=window, platform=family, interpret=False)

    def attn(q, k, v, ids):
        return flash_attention(q, k, v, segment_ids=ids, **options)

    def value_and_grads(q, k, v, ids, cotangent):
        out, pullback = jax.vjp(lambda q, k, v: attn(q, k, v, ids), q, k, v)
        return out, pullback(cotangent)

    checks = [TRITON] if platform == "cuda" else []
    exported = jax.export.export(
        jax.jit(value_and_grads), platforms=[platform], disabled_checks=checks
    )
    return exported(q, k, k, ids, q).mlir_module()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lowers_to_mosaic_for_tpu(case):
    text = export(case, "tpu")
    assert re.findall(r'kernel_name = "(\w+)"', text) == list(KERNELS)
    # Each kernel asks Mosaic for the budgeted scoped VMEM, no more.
    limits = re.findall(r"scoped_memory_configs.*?size\\22: (\d+)", text)
    assert limits == [str(VMEM_BUDGET)] * 3, limits


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lowers_to_triton_for_gpu(case):
    text = export(case, "cuda")
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert re.findall(r'name = "(flash_attention_\w+)"', text) == list(KERNELS)


def padded(case, platform: str):
    """(plan, padded heads-major q and k structs) at the default blocks."""
    _, _, _, _, seg, window, causal, _ = case
    q, k, _ = abstract_inputs(case)
    p = plan(q, k, segments=seg, causal=causal, window=window, platform=platform, interpret=False)
    b, _, n, h = q.shape
    q_hm = jax.ShapeDtypeStruct((b, n, p.q_pad, p.h_pad), q.dtype)
    k_hm = jax.ShapeDtypeStruct((b, k.shape[2], p.k_pad, p.h_pad), k.dtype)
    return p, q_hm, k_hm


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tpu_vmem_fits_and_does_not_grow_with_length(case):
    p, q, k = padded(case, "tpu")
    plans = flash_tpu.vmem_plans(p.spec, q, k)
    for vmem in plans:
        print(f"{case_id(case)} {vmem.name}: {vmem.total / MiB:.2f} MiB of {VMEM_BUDGET / MiB:.0f}")
        assert vmem.total <= VMEM_BUDGET
    # The same call at 1/16 of the length needs the same VMEM: nothing holds a whole head.
    short = (*case[:1], case[1] // 16, *case[2:])
    p_short, q_short, k_short = padded(short, "tpu")
    assert flash_tpu.vmem_plans(p_short.spec, q_short, k_short) == plans


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_shared_memory_fits_an_h100(case):
    p, q, _ = padded(case, "gpu")
    st, size = p.spec, q.dtype.itemsize
    blocks = {"fwd": (st.bq, st.bk), "dq": (st.bq_bwd, st.bk_bwd), "dkdv": (st.bq_bwd, st.bk_bwd)}
    for kernel, (bq, bk) in blocks.items():
        smem = triton_smem_bytes(kernel, bq, bk, p.h_pad, size, NUM_STAGES)
        print(f"{case_id(case)} {kernel} {bq}x{bk}: {smem / KiB:.0f} KiB of 227")
        assert smem <= H100_SMEM_PER_BLOCK


def test_gpu_defaults_shrink_only_where_shared_memory_demands():
    assert BlockSizes.default("gpu", 128, jnp.bfloat16) == BlockSizes(128, 128, 128, 64)
    assert BlockSizes.default("gpu", 256, jnp.bfloat16) == BlockSizes(128, 64, 64, 64)
    assert BlockSizes.default("tpu", 256, jnp.float32) == BlockSizes(128, 128, 128, 128)


def test_tpu_blocks_over_the_vmem_budget_are_refused():
    q = jax.ShapeDtypeStruct((1, 8192, 8, 256), jnp.float32)
    big = BlockSizes(q=1024, k=2048, q_bwd=128, k_bwd=128)
    attn = jax.jit(lambda q: flash_attention(q, q, q, block_sizes=big, platform="tpu"))
    with pytest.raises(ValueError, match=r"flash_attention_fwd: blocks need .* MiB of VMEM"):
        jax.eval_shape(attn, q)


def assert_sweeps_fetch_only_visible(index, visible, outer: int, inner: int, what: str):
    """For each outer block o, the inner sweep's block indices ``index(o, 0..inner-1)``
    change exactly (visible blocks - 1) times, the visible range being ``visible(o)``."""
    steps = jnp.arange(inner, dtype=jnp.int32)
    fetched = hidden = 0
    for o in range(outer):
        blocks = np.asarray(jax.vmap(lambda j, o=o: index(jnp.int32(o), j))(steps))
        lo, hi = (int(x) for x in visible(jnp.int32(o)))
        runs = 1 + int(np.count_nonzero(np.diff(blocks)))
        assert runs == max(hi - lo, 1), (what, o, blocks, lo, hi)
        fetched, hidden = fetched + runs, hidden + inner - max(hi - lo, 0)
    print(f"{what}: {fetched} fetches for {outer * inner} steps ({hidden} hidden)")


@pytest.mark.parametrize(
    "causal, window, q_len, k_len",
    [
        (True, None, 2048, 2048),
        (True, 300, 2048, 2048),
        (False, 300, 2048, 2048),
        (True, None, 1000, 1900),  # fewer queries than keys
    ],
)
def test_tpu_index_maps_fetch_no_hidden_block(causal, window, q_len, k_len):
    """A grid step whose block the mask hides asks for the block its neighbour holds, so
    the pipeline (which copies only on a change of block index) never fetches it."""
    q = jax.ShapeDtypeStruct((1, q_len, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, k_len, 2, 128), jnp.bfloat16)
    p = plan(q, k, causal=causal, window=window, platform="tpu", interpret=False)
    st, mask = p.spec, p.spec.mask
    nq, nk = p.q_pad // st.bq, p.k_pad // st.bk
    assert_sweeps_fetch_only_visible(
        flash_tpu.key_block(st, st.bq, st.bk, nk),
        lambda i: mask.key_blocks(i * st.bq, st.bq, st.bk, nk),
        nq,
        nk,
        "forward: key blocks per query block",
    )
    nq, nk = p.q_pad // st.bq_bwd, p.k_pad // st.bk_bwd
    assert_sweeps_fetch_only_visible(
        flash_tpu.query_block(st, st.bq_bwd, st.bk_bwd, nq),
        lambda j: mask.query_blocks(j * st.bk_bwd, st.bk_bwd, st.bq_bwd, nq),
        nk,
        nq,
        "dK/dV: query blocks per key block",
    )


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_ring_block_with_log_sum_exp_lowers(platform):
    """What a context-parallel ring asks of the kernel at Llama 3 8B's 128k over 8 devices
    (one device's 16k block, GQA, packed keys of another block): output and log-sum-exp,
    both differentiated, lower through the same three kernels."""
    q = jax.ShapeDtypeStruct((1, 16384, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 16384, 8, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 16384), jnp.int32)
    lse = jax.ShapeDtypeStruct((1, 16384, 32), jnp.float32)
    family = "gpu" if platform == "cuda" else "tpu"

    def value_and_grads(q, k, v, q_ids, k_ids, cotangents):
        def attn(q, k, v):
            return flash_attention(
                q, k, v, segment_ids=q_ids, kv_segment_ids=k_ids, causal=False,
                platform=family, interpret=False, return_lse=True,
            )  # fmt: skip

        out, pullback = jax.vjp(attn, q, k, v)
        return out, pullback(cotangents)

    checks = [TRITON] if platform == "cuda" else []
    exported = jax.export.export(
        jax.jit(value_and_grads), platforms=[platform], disabled_checks=checks
    )
    text = exported(q, k, k, ids, ids, (q, lse)).mlir_module()
    names = r'kernel_name = "(\w+)"' if platform == "tpu" else r'name = "(flash_attention_\w+)"'
    assert re.findall(names, text) == list(KERNELS)
