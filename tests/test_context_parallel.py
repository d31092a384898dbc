"""Context parallelism: ring and all-gather attention over a sequence split 2, 4 or 8 ways
give the reference attention's output and gradients (float32), causal or not, grouped
queries, packed documents crossing shard boundaries, sliding windows, zigzag layout; and
whole packed training steps with mesh.sequence > 1 (alone, with fsdp, with tensor) give
one device's losses and parameter updates (``helpers.runs.assert_same_run``).

A missing block fails the step comparison: with the ring's last step skipped (one block
of keys never seen), sequence8's losses were 8.8e-4 off and its updates 0.48 of their
scale."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.runs import STEPS, assert_same_run, packed_batches, program_for
from helpers.runs import train as train_steps
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxtrain.kernels.attention import xla_attention
from jaxtrain.plan import state_plan
from jaxtrain.sharding.context import local_context_attention, zigzag

B, L, N, K, H = 2, 48, 4, 2, 8


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, L, N, H)).astype(np.float32)
    k, v = (rng.normal(size=(B, L, K, H)).astype(np.float32) for _ in range(2))
    # Documents of uneven lengths; their boundaries fall inside shards and across them.
    bounds = np.sort(rng.choice(np.arange(1, L), size=4, replace=False))
    segments = np.stack([np.searchsorted(bounds, np.arange(L), side="right")] * B)
    segments[1] = segments[1][::-1].copy()  # a different packing in the second row
    cotangent = rng.normal(size=(B, L, N, H)).astype(np.float32)
    return q, k, v, segments.astype(np.int32), cotangent


def sharded(ways, mode, causal, window, packed, layout, query_chunk=512, impl="xla"):
    mesh = Mesh(np.asarray(jax.devices()[:ways]), ("sequence",))
    order = zigzag(L, ways) if layout == "zigzag" else np.arange(L)
    seq, idx = P(None, "sequence"), P("sequence")

    def local(q, k, v, index, segments):
        return local_context_attention(
            q, k, v, index, segments if packed else None, mode=mode, causal=causal,
            window=window, zigzag=layout == "zigzag", query_chunk=query_chunk, impl=impl,
        )  # fmt: skip

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, idx, seq),
                           out_specs=seq, check_vma=False)  # fmt: skip

    def run(q, k, v, segments):
        permuted = [x[:, order] for x in (q, k, v, segments)]
        out = mapped(*permuted[:3], jnp.asarray(order, jnp.int32), permuted[3])
        return jnp.zeros_like(out).at[:, order].set(out)  # back to sequence order

    return run


def reference(causal, window, packed):
    def run(q, k, v, segments):
        return xla_attention(q, k, v, segment_ids=segments if packed else None,
                             causal=causal, window=window)  # fmt: skip

    return run


def value_and_grads(fn, q, k, v, segments, cotangent):
    """fn's output and the gradients of sum(output * cotangent), in one compile."""

    @jax.jit
    def run(q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, segments), q, k, v)
        return out, pullback(cotangent)

    return run(q, k, v)


CASES = {
    "causal": (True, None, False),
    "bidirectional": (False, None, False),
    "causal packed": (True, None, True),
    "causal window": (True, 7, False),
    "bidirectional window packed": (False, 5, True),
    "bidirectional packed": (False, None, True),
}
MATRIX = [  # (mode, ways, layout, case, query chunk)
    ("ring", 2, "zigzag", "causal packed", 4),  # 24 local queries, 12 per zigzag half
    ("ring", 4, "contiguous", "causal packed", 3),
    ("ring", 8, "zigzag", "causal packed", 512),
    ("ring", 8, "zigzag", "bidirectional", 512),
    ("ring", 4, "zigzag", "causal window", 512),
    ("ring", 8, "contiguous", "bidirectional window packed", 512),
    ("all_gather", 4, "zigzag", "causal", 4),
    ("all_gather", 8, "zigzag", "bidirectional window packed", 512),
]


@functools.cache
def expected(case):
    causal, window, packed = CASES[case]
    q, k, v, segments, cotangent = inputs()
    return value_and_grads(reference(causal, window, packed), q, k, v, segments, cotangent)


@pytest.mark.parametrize(
    "mode,ways,layout,case,chunk", MATRIX, ids=["-".join(map(str, m)) for m in MATRIX]
)
def test_context_parallel_attention_equals_the_reference(mode, ways, layout, case, chunk):
    causal, window, packed = CASES[case]
    q, k, v, segments, cotangent = inputs()
    want, want_grads = expected(case)
    ring = sharded(ways, mode, causal, window, packed, layout, chunk)
    got, got_grads = value_and_grads(ring, q, k, v, segments, cotangent)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


KERNEL_MATRIX = [  # (ways, case, whether every block is the kernel's)
    (2, "causal packed", True),
    (4, "bidirectional packed", True),
    (2, "causal window", False),  # a window's masks depend on where a block sits
]


@pytest.mark.parametrize(
    "ways,case,kernel", KERNEL_MATRIX, ids=[f"{w}-{c}" for w, c, _ in KERNEL_MATRIX]
)
def test_ring_blocks_by_the_flash_kernel_equal_the_reference(ways, case, kernel):
    """``impl="pallas"``: the ring's blocks go through the Pallas flash kernel
    (interpreted on CPU), its log-sum-exp folding the partial results and taking their
    gradient; output and gradients equal the reference. A window keeps XLA blocks."""
    causal, window, packed = CASES[case]
    q, k, v, segments, cotangent = inputs()
    want, want_grads = expected(case)
    ring = sharded(ways, "ring", causal, window, packed, "zigzag", impl="pallas")
    jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(lambda *x: ring(*x, segments), *a)[0])(q, k, v))
    assert ("pallas_call" in jaxpr) == kernel
    got, got_grads = value_and_grads(ring, q, k, v, segments, cotangent)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_zigzag_layout():
    order = zigzag(16, 4)
    assert order.reshape(4, 4).tolist() == [
        [0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]
    ]  # fmt: skip
    with pytest.raises(ValueError):
        zigzag(12, 4)


# Whole training steps: mesh.sequence > 1 (with fsdp, tensor) against one device.
STEP_LAYOUTS = {
    "sequence8": ("mesh.fsdp=1", "mesh.sequence=8"),
    "sequence2_fsdp4": ("mesh.fsdp=4", "mesh.sequence=2"),
    "sequence2_tensor2_fsdp2": (
        "mesh.preset=fsdp_tp",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "mesh.sequence=2",
    ),  # fmt: skip
}


def train(overrides, devices):
    program = program_for(["data.packing=true", *overrides], devices)
    return train_steps(program, packed_batches(program, program.config.train.steps)), program


@functools.cache
def one_device_packed():
    return train(["mesh.fsdp=1"], jax.devices()[:1])[0]


@pytest.mark.parametrize("layout", STEP_LAYOUTS)
def test_training_steps_equal_one_device(layout):
    result, program = train(STEP_LAYOUTS[layout], jax.devices())
    assert_same_run(result, one_device_packed())
    # ZeRO over the context-parallel ways too: the state is split over fsdp x sequence.
    params, opt_state = state_plan(program)
    for rows in (params, opt_state):
        total, split = (
            sum(getattr(r, f) for r in rows) for f in ("bytes_total", "bytes_per_device")
        )
        assert split < total / (4 if layout == "sequence2_tensor2_fsdp2" else 6)
    if program.mesh.shape["sequence"] == 8:
        # The ring sends K/V blocks [B, L/8, K, H] around (collective-permute) and
        # gathers no K/V. (The [B, L] batch arrays are gathered to be laid out zigzag.)
        hlo = program.compile()[0].as_text()
        kv = r"= f32\[\d+,\d+,\d+,\d+\]\S* "
        assert re.findall(kv + "collective-permute\\(", hlo)
        assert not re.findall(kv + "all-gather\\(", hlo)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.family=bert", "train.objective=mlm", "mesh.sequence=2"], "mesh.sequence"),
        (["data.seq_len=12", "mesh.sequence=4"], "data.seq_len"),
        (["mesh.sequence=3"], "mesh"),
        (["model.context_parallel=ulysses"], "model.context_parallel"),
    ],
)
def test_bad_context_parallel_config_names_its_key(overrides, key):
    from jaxtrain import config
    from jaxtrain.errors import UserError

    with pytest.raises(UserError, match=f"^{re.escape(key)}"):
        config.load(None, [*STEPS, *overrides]).check_devices(8)


def test_all_gather_mode_gathers_kv_instead_of_a_ring():
    from jaxtrain import config
    from jaxtrain.sharding import make_mesh
    from jaxtrain.train import build_program

    overrides = ["mesh.fsdp=1", "mesh.sequence=8", "model.context_parallel=all_gather"]
    cfg = config.load(None, [*STEPS, "data.packing=true", *overrides])
    program = build_program(cfg, make_mesh(cfg))
    text = program.train_step.lower(program.abstract_state, program.abstract_batch()).as_text()
    assert "all_gather" in text and "collective_permute" not in text
